"""Test doubles for the harness: `ScriptedPredictor` (answers from a script, counts calls, can simulate a kill) and
small helpers to build fixtures. Used by keye's tests and by anyone checking the harness without a model.

``python -m keye.eval.testing DATA OUT`` evaluates the Video-MME folder DATA with a deterministic scripted predictor;
the data-parallel test launches it under ``accelerate launch``.

Not for scoring real models.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from keye.eval.predictor import Prediction, Subtitle

__all__ = [
    "ScriptedPredictor",
    "SimulatedKill",
    "hash_policy",
    "probe_video",
    "table_policy",
    "write_test_video",
    "write_test_videos",
]

# A policy maps (video path, prompt) to the model's raw answer text.
Policy = Callable[[str, str], str]


class SimulatedKill(BaseException):
    """Stands in for a killed process: a BaseException, so the harness does not record it as a failed sample."""


def probe_video(path: str | Path) -> float:
    """Duration in seconds of a video whose first frame decodes (`keye.encoders.video`); `VideoDecodeError` naming
    the file otherwise."""
    from keye.encoders.video import decode, index

    idx = index(path)
    next(decode(path, [0], video_index=idx))
    return idx.duration


def hash_policy(video_path: str, prompt: str) -> str:
    """A fixed pseudo-random letter per (video file name, prompt): the same answer in every process and run."""
    return "ABCD"[zlib.crc32(f"{Path(video_path).name}\n{prompt}".encode()) % 4]


def table_policy(table: Mapping[str, str], default: str = "") -> Policy:
    """Answer ``table[key]`` for the first key that occurs in the prompt (e.g. the question's text)."""

    def respond(video_path: str, prompt: str) -> str:
        for key, response in table.items():
            if key in prompt:
                return response
        return default

    return respond


@dataclass
class _Prepared:
    video_path: str
    duration: float
    frame_times: list[float]
    subtitles: list[Subtitle] | None


class ScriptedPredictor:
    """A `Predictor` whose answers come from ``policy`` and whose videos are only probed (duration, one frame).

    Counts ``prepare_calls`` per video file name and ``answer_calls``; with ``kill_after=k`` the (k+1)-th answer
    raises `SimulatedKill`. Frames are "sampled" uniformly: ``min(max_frames, duration * fps)`` of them from t = 0.
    """

    def __init__(
        self, policy: Policy = hash_policy, *, kill_after: int | None = None, name: str = "scripted"
    ):
        self.policy = policy
        self.kill_after = kill_after
        self.name = name
        self.prepare_calls: Counter[str] = Counter()
        self.answer_calls = 0
        self.prompts: list[str] = []

    def prepare_video(
        self,
        video_path: str,
        *,
        fps: float | None,
        max_frames: int | None,
        token_budget: int | None,
        compress: str,
        subtitles: list[Subtitle] | None,
    ) -> _Prepared:
        self.prepare_calls[Path(video_path).name] += 1
        duration = probe_video(video_path)
        n = max(1, min(max_frames or 1365, int(duration * (fps or 2.0))))
        return _Prepared(video_path, duration, [i * duration / n for i in range(n)], subtitles)

    def answer(self, prepared: _Prepared, prompt: str, *, max_new_tokens: int, think: bool) -> Prediction:
        if self.kill_after is not None and self.answer_calls >= self.kill_after:
            raise SimulatedKill(f"killed after {self.kill_after} answers")
        self.answer_calls += 1
        self.prompts.append(prompt)
        text = self.policy(prepared.video_path, prompt)
        return Prediction(text=text, num_tokens=len(text.split()), latency_s=0.0)

    def sampled_frame_times(self, prepared: _Prepared) -> list[float]:
        return list(prepared.frame_times)


def write_test_video(
    path: str | Path, *, seconds: float = 4.0, fps: int = 8, size: int = 32, seed: int = 0
) -> Path:
    """A small H.264 clip of flat colours changing every second (fast to write and to probe)."""
    import numpy as np

    from keye.encoders.video import write_video

    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(int(seconds) + 1, 3), dtype=np.uint8)
    frames = (np.broadcast_to(colours[int(i / fps)], (size, size, 3)) for i in range(round(seconds * fps)))
    return write_video(path, frames, fps)


def write_test_videos(root: str | Path, relative_paths: Iterable[str], **kwargs) -> None:
    """`write_test_video` at each ``root/relative_path`` (seeded by position)."""
    for seed, rel in enumerate(relative_paths):
        write_test_video(Path(root) / rel, seed=seed, **kwargs)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from keye.eval.runner import run
    from keye.eval.videomme import VideoMME

    parser = argparse.ArgumentParser(prog="python -m keye.eval.testing", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="a Video-MME folder")
    parser.add_argument("out")
    parser.add_argument("--subtitles", action="store_true")
    args = parser.parse_args(argv)
    run(
        VideoMME(Path(args.data), use_subtitles=args.subtitles), ScriptedPredictor(), args.out, progress=False
    )


if __name__ == "__main__":
    main()
