"""What a benchmark is to the harness: a `Task` (a config dataclass) that reads questions, builds prompts and scores
records; and the registry that names tasks.

To add a benchmark: subclass `Task` as a dataclass, give it a ``name``, implement `load`, `prompt` and `metrics`,
and decorate it with `register_task`. The runner does the rest (grouping by video, resume, failures, timing, the
data-parallel merge, reports).

Not for running a model (`runner`) or parsing answers (`extract`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from keye.eval.predictor import Subtitle

__all__ = [
    "MC",
    "GENERATION",
    "Question",
    "Task",
    "TASKS",
    "accuracy",
    "accuracy_by",
    "get_task",
    "register_task",
]

MC = "multiple_choice"
GENERATION = "generation"

# Keys every sample record has; a task's grouping fields must not collide with them.
RECORD_KEYS = (
    "question_id",
    "video",
    "kind",
    "target",
    "prompt",
    "response",
    "extracted",
    "correct",
    "num_tokens",
    "latency_s",
    "error",
)


@dataclass(frozen=True)
class Question:
    """One benchmark question.

    ``video`` is relative to the task's data folder. ``options`` are the lettered options ("A. red") of a
    multiple-choice question and empty for a generation question; ``target`` is the correct letter or the reference
    text. ``fields`` are the categories the task scores by (e.g. duration, domain) and are copied into the record.
    """

    question_id: str
    video: str
    question: str
    target: str
    options: tuple[str, ...] = ()
    kind: str = MC
    fields: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)  # task-private data, e.g. MLVU scoring points


@dataclass
class Task:
    """A benchmark, configured. Subclasses are dataclasses whose fields are the task's settings."""

    name: ClassVar[str] = ""

    def load(self) -> list[Question]:
        """All questions, in the benchmark's order (deterministic)."""
        raise NotImplementedError

    def video_path(self, question: Question) -> Path:
        """Where the question's video is; it may not exist (the predictor then reports the failure)."""
        raise NotImplementedError

    @property
    def uses_frame_times(self) -> bool:
        """Whether `prompt` needs the sampled frame times (e.g. to choose subtitle lines)."""
        return False

    def subtitle_track(self, question: Question) -> list[Subtitle] | None:
        """The full subtitle track handed to `Predictor.prepare_video`, or ``None``."""
        return None

    def prompt(self, question: Question, frame_times: Sequence[float] | None) -> str:
        """The user turn's text for one question."""
        raise NotImplementedError

    def score_generation(self, question: Question, response: str) -> float | None:
        """A judge's score for a generation answer, or ``None`` when no judge is configured."""
        return None

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Every metric of the task from the sample records.

        Returns ``{"summary": {key: value}, "definitions": {key: text}, "groups": {field: {name: accuracy}}}``.
        """
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The task's settings as plain JSON values (for results.json and the resume check)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value.resolve())
            elif isinstance(value, tuple | list):
                value = list(value)
            elif not isinstance(value, str | int | float | bool | type(None)):
                raise TypeError(
                    f"{type(self).__name__}.{f.name}: override config() to describe a {type(value)}"
                )
            out[f.name] = value
        return out


TASKS: dict[str, type[Task]] = {}

# Modules whose import registers the built-in tasks.
_BUILTIN_MODULES = ("keye.eval.videomme", "keye.eval.mlvu", "keye.eval.synthetic")


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(
            f"task {cls.name!r} is registered twice ({TASKS[cls.name].__name__}, {cls.__name__})"
        )
    TASKS[cls.name] = cls
    return cls


def get_task(name: str, **config: Any) -> Task:
    """Build a registered task by name: ``get_task("videomme", data="/data/Video-MME", use_subtitles=True)``."""
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](**config)


def accuracy(records: Iterable[Mapping[str, Any]]) -> dict[str, float | int]:
    """``{"acc": percent, "correct": c, "total": n}`` over records; failed samples count as wrong."""
    records = list(records)
    correct = sum(bool(r["correct"]) for r in records)
    total = len(records)
    return {"acc": 100.0 * correct / total if total else 0.0, "correct": correct, "total": total}


def accuracy_by(
    records: Iterable[Mapping[str, Any]], key: str, order: Sequence[str] = ()
) -> dict[str, dict[str, float | int]]:
    """Accuracy per value of ``key``: values in ``order`` first (those present), then the others sorted."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(str(r[key]), []).append(r)
    names = [n for n in order if n in groups] + sorted(n for n in groups if n not in order)
    return {n: accuracy(groups[n]) for n in names}
