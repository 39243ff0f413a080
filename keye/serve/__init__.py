"""``keye serve``: an OpenAI-compatible server over a keye model (`keye.serve.app`); media parsing in `keye.serve.media`."""
