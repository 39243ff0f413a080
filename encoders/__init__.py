"""Video and image in, vision tokens out.

`keye.encoders` turns files into frames (``video``, ``image``), frames into patches and patch features (``vision``),
and decides how many tokens each frame may cost (Slow-Fast selection, DynTok, Clapper). It knows nothing of the
language model, the chat template or the CLI.
"""

# The token compressions a prompt can get (`keye.compression` applies them); here so that a CLI can list them
# without loading torch.
COMPRESSIONS = ("none", "dyntok", "clapper")
