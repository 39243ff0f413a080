"""A synthetic benchmark in Video-MME's exact published format, from `keye.synthetic`: the CI benchmark.

`write_synthetic_videomme(root, seed=S, n=N)` writes ``root/videomme/test-00000-of-00001.parquet`` (the Video-MME
columns) and ``root/data/<videoID>.mp4``: videos ``syn-video-<S>-<i>`` for i = 0, 1, ... with all their questions,
until N questions (the last video may contribute only some). Each video is "short", domain "Synthetic", sub-category
its number of scenes; each question's ``qtype`` maps to a Video-MME task type (`TASK_TYPES`). The `Synthetic` task
writes the benchmark if it is not there yet and then evaluates it exactly like Video-MME (same reader, prompt,
extraction and metrics).

Not for training data (``keye.synthetic.generate_dataset``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keye.eval.task import Question, Task, register_task
from keye.eval.videomme import COLUMNS, VideoMME

__all__ = ["TASK_TYPES", "Synthetic", "write_synthetic_videomme"]

# keye.synthetic question type -> the Video-MME task type that asks the same kind of thing.
TASK_TYPES = {
    "colour": "Attribute Perception",
    "shape": "Object Recognition",
    "count": "Counting Problem",
    "motion": "Temporal Perception",
    "order": "Temporal Reasoning",
    "text": "OCR Problems",
}
PARQUET = "videomme/test-00000-of-00001.parquet"
MANIFEST = "synthetic.json"


_KNOBS = ("max_objects", "text_prob", "object_scale")  # the generator's difficulty; recorded only when set


def _manifest(
    seed: int, n: int, size: tuple[int, int], fps: float, duration: float, scene: dict[str, Any]
) -> dict[str, Any]:
    from keye.synthetic import GENERATOR_VERSION

    # Generator knobs are recorded only when set, so benchmarks written before they existed stay valid.
    return {
        "seed": seed,
        "n": n,
        "size": list(size),
        "fps": fps,
        "duration": duration,
        "generator_version": GENERATOR_VERSION,
        **{k: v for k, v in scene.items() if v is not None},
    }


def write_synthetic_videomme(
    root: str | Path,
    *,
    seed: int,
    n: int,
    size: tuple[int, int] = (112, 112),
    fps: float = 8,
    duration: float = 4.0,
    max_objects: int | None = None,
    text_prob: float | None = None,
    object_scale: Sequence[float] | None = None,
) -> Path:
    """Write (or find already written) the synthetic benchmark with ``n`` questions from ``seed``; return ``root``.

    ``max_objects``/``text_prob``/``object_scale`` set the generator's difficulty (None: its defaults, 4 objects, text
    in half the scenes, objects 0.16-0.24 of the frame); keye-tiny is trained and measured at ``max_objects=2,
    text_prob=0, object_scale=(0.3, 0.42)`` (see keye.pretrain.tiny).

    Idempotent and safe when several processes call it at once: the benchmark is built in a private folder and moved
    into place; a ``root`` already holding the same benchmark (``synthetic.json``) is reused as is.
    """
    import pandas as pd

    from keye.synthetic import make_video_sample

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    root = Path(root)
    scale = None if object_scale is None else [float(x) for x in object_scale]
    scene = {"max_objects": max_objects, "text_prob": text_prob, "object_scale": scale}
    manifest = _manifest(seed, n, tuple(size), fps, duration, scene)
    if (root / MANIFEST).exists():
        found = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        if found != manifest:
            raise FileExistsError(f"{root}: holds another synthetic benchmark {found}, not {manifest}")
        return root
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    rows: list[dict[str, Any]] = []
    index = 0
    while len(rows) < n:
        sample = make_video_sample(
            tmp / "data",
            seed,
            index=index,
            size=tuple(size),
            fps=fps,
            duration=duration,
            **{k: v for k, v in scene.items() if v is not None},
        )
        video_id = f"{index + 1:03d}"
        scenes = len(sample.scenes)
        for k, qa in enumerate(sample.questions[: n - len(rows)], start=1):
            rows.append(
                {
                    "video_id": video_id,
                    "duration": "short",
                    "domain": "Synthetic",
                    "sub_category": f"{scenes} scene" + ("s" if scenes > 1 else ""),
                    "url": "",
                    "videoID": sample.id,
                    "question_id": f"{video_id}-{k}",
                    "task_type": TASK_TYPES[qa.qtype],
                    "question": qa.question,
                    "options": list(qa.options),
                    "answer": qa.answer_letter,
                }
            )
        index += 1
    (tmp / PARQUET).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(COLUMNS)).to_parquet(tmp / PARQUET, index=False)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process moved the same benchmark into place first (or root is an unrelated non-empty folder).
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / MANIFEST).exists():
            raise
    return root


@register_task
@dataclass
class Synthetic(Task):
    """The synthetic Video-MME-format benchmark: ``n`` questions from ``seed``, kept in ``data``."""

    name = "synthetic"

    seed: int
    n: int
    data: Path
    size: tuple[int, int] = (112, 112)
    fps: float = 8
    duration: float = 4.0
    max_objects: int | None = None
    text_prob: float | None = None
    object_scale: Sequence[float] | None = None

    def __post_init__(self):
        self.data = Path(self.data)
        self._bench = VideoMME(self.data)

    def config(self) -> dict[str, Any]:
        # Unset difficulty knobs are left out, as in the benchmark's manifest: runs from before they existed resume.
        out = super().config()
        return {k: v for k, v in out.items() if k not in _KNOBS or v is not None}

    def load(self) -> list[Question]:
        write_synthetic_videomme(
            self.data,
            seed=self.seed,
            n=self.n,
            size=self.size,
            fps=self.fps,
            duration=self.duration,
            max_objects=self.max_objects,
            text_prob=self.text_prob,
            object_scale=self.object_scale,
        )
        return self._bench.load()

    def video_path(self, question: Question) -> Path:
        return self._bench.video_path(question)

    def prompt(self, question: Question, frame_times: Sequence[float] | None) -> str:
        return self._bench.prompt(question, frame_times)

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return self._bench.metrics(records)
