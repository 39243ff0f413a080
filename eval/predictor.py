"""The one interface between the harness and a model: `Predictor`.

The harness never touches a model, a processor or a tensor; it asks a `Predictor` to prepare a video once and to
answer prompts about it. `keye.predictor.KeyePredictor` implements it over keye's public API (load_pretrained,
processor, generation); `keye.eval.testing.ScriptedPredictor` is the test double.

Not for building prompts (the tasks do that) or scoring (the tasks and `extract` do that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = ["Prediction", "Predictor", "Subtitle"]

# (start seconds, end seconds, text) of one subtitle line.
Subtitle = tuple[float, float, str]


@dataclass(frozen=True)
class Prediction:
    """One generated answer: its text, how many tokens were generated, and how long generation took."""

    text: str
    num_tokens: int
    latency_s: float


@runtime_checkable
class Predictor(Protocol):
    """A model as the harness sees it.

    Contract:
    - `prepare_video` decodes and encodes a video ONCE and returns an opaque handle (it may hold vision features or
      the KV cache of the prompt prefix); the harness calls it once per video and asks all of that video's questions
      against the handle. It raises `keye.errors.KeyeInputError` (e.g. `VideoDecodeError`) for a missing, corrupt or
      undecodable video: the harness records the reason and goes on. Any other exception is treated as a bug and
      stops the run (which can be resumed).
    - ``subtitles`` is the video's full subtitle track when the benchmark's "with subtitles" setting is on, else
      ``None``. The harness itself already puts the official subtitle text (the lines at the sampled frames) in the
      prompt, so a predictor must not add it again; it may use the track for other purposes (logging, an
      interleaved variant behind its own option).
    - ``fps``, ``max_frames``, ``token_budget``: None means the model's own defaults.
    - `answer` generates greedily from the prepared video and ``prompt`` (the user turn's text; the predictor places
      the video before it, applies the chat template and switches reasoning on or off with ``think``). It may raise
      `KeyeInputError` (e.g. `ContextLengthError`) for that one question.
    - `sampled_frame_times` gives the timestamps (seconds) of the frames the model actually sees, used to choose the
      subtitle lines that go into the prompt.
    """

    name: str

    def prepare_video(
        self,
        video_path: str,
        *,
        fps: float | None,
        max_frames: int | None,
        token_budget: int | None,
        compress: str,
        subtitles: list[Subtitle] | None,
    ) -> Any: ...

    def answer(self, prepared: Any, prompt: str, *, max_new_tokens: int, think: bool) -> Prediction: ...

    def sampled_frame_times(self, prepared: Any) -> list[float]: ...
