"""MLVU (dev) as published: reader, official prompts, per-task accuracy, both M-Avg conventions, judged G-Avg.

Layout (the Hugging Face release ``MLVU/MVLU``, folder ``MLVU``)::

    DIR/json/<N>_<task>.json      entries {video, duration, question, candidates, answer, question_type}
    DIR/video/<N>_<task>/<video>  (``video/<task>/`` is accepted too)

Tasks 1_plotQA, 2_needle, 3_ego, 4_count, 5_order, 6_anomaly_reco and 7_topic_reasoning are multiple choice; the
answer is the text of one candidate. 8_sub_scene and 9_summary are generation tasks (8 carries ``scoring_points``).

Prompt (MLVU's own template, github.com/JUNJIE99/MLVU ``multiple_choice_evaluation/choice_bench.py``)::

    Carefully watch this video and pay attention to every detail. Based on your observations, select the best
    option that accurately addresses the question.
    Question: <question>
    Options:
    (A) <candidate 1>
    ...
    Only give the best option.
    Best Option: (

The template puts the first sentence in the system turn and "Best Option: (" at the start of the assistant turn;
through `Predictor.answer` (one user text) the whole template is the user text, as lmms-eval does. The model then
answers "C)" or "C" and `extract_choice` reads it. Generation tasks get "Carefully watch this video and pay attention
to every detail. Based on your observations, answer the given questions." and the question.

Scoring: accuracy per task. M-Avg is reported in both conventions, each named: ``m_avg_macro`` (mean of the
per-task accuracies over the multiple-choice tasks present: lmms-eval's ``mlvu_dev``) and ``m_avg_micro``
(accuracy over all multiple-choice questions: MLVU's template and VLMEvalKit), plus ``m_avg_micro_without_order``
(VLMEvalKit leaves ``order`` out of its M-Avg). Generation answers are kept in samples.jsonl and scored (G-Avg,
mean judge score out of 10 per task, then over tasks) only when a `Judge` is configured.

Not for the MLVU test split (its answers are hidden).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from keye.errors import KeyeInputError
from keye.eval.task import GENERATION, MC, Question, Task, accuracy, accuracy_by, register_task
from keye.extract import option_letters

__all__ = ["MLVU", "Judge", "MC_TASKS", "GENERATION_TASKS", "mlvu_prompt", "read_mlvu"]

MC_TASKS = ("plotQA", "needle", "ego", "count", "order", "anomaly_reco", "topic_reasoning")
GENERATION_TASKS = ("sub_scene", "summary")

MC_SYSTEM = (
    "Carefully watch this video and pay attention to every detail. "
    "Based on your observations, select the best option that accurately addresses the question."
)
GENERATION_SYSTEM = "Carefully watch this video and pay attention to every detail. Based on your observations, answer the given questions."
MC_TAIL = "Only give the best option."
ANSWER_CUE = "Best Option: ("


@runtime_checkable
class Judge(Protocol):
    """Scores a free-form answer, 0 to 10 (MLVU's judges give accuracy + relevance, or completeness + reliability,
    each 1-5). Implementations typically call an LLM; none is configured by default."""

    name: str

    def score(
        self, *, task: str, question: str, reference: str, prediction: str, scoring_points: str | None
    ) -> float: ...


def mlvu_prompt(question: str, candidates: Sequence[str] | None) -> str:
    """The official MLVU prompt: multiple choice when ``candidates`` are given, else the generation prompt."""
    if candidates is None:
        return f"{GENERATION_SYSTEM}\n{question}"
    letters = option_letters(len(candidates))
    options = [f"({letter}) {c}" for letter, c in zip(letters, candidates)]
    return "\n".join([MC_SYSTEM, f"Question: {question}", "Options:", *options, MC_TAIL, ANSWER_CUE])


_JSON_NAME = re.compile(r"(\d+)_(\w+)\.json")


def read_mlvu(root: str | Path) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """``[(file stem, task, entries)]`` of ``root/json/<N>_<task>.json``, in task-number order, validated."""
    root = Path(root)
    files = []
    for path in (root / "json").glob("*.json"):
        if m := _JSON_NAME.fullmatch(path.name):
            files.append((int(m.group(1)), m.group(2), path))
    if not files:
        raise KeyeInputError(root, "no MLVU task file (looked for json/<N>_<task>.json)")
    out = []
    for _, task, path in sorted(files):
        if task not in MC_TASKS + GENERATION_TASKS:
            raise KeyeInputError(path, f"unknown MLVU task {task!r}; known: {MC_TASKS + GENERATION_TASKS}")
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise KeyeInputError(path, f"cannot read: {e}") from e
        required = ("video", "question", "answer") + (("candidates",) if task in MC_TASKS else ())
        for i, entry in enumerate(entries):
            missing = [k for k in required if k not in entry]
            if missing:
                raise KeyeInputError(path, f"entry {i} lacks {missing}")
            if task in MC_TASKS and str(entry["answer"]) not in [str(c) for c in entry["candidates"]]:
                raise KeyeInputError(
                    path, f"entry {i}: answer {entry['answer']!r} is not one of the candidates"
                )
        out.append((path.stem, task, entries))
    return out


@register_task
@dataclass
class MLVU(Task):
    """MLVU dev from the published folder ``data``; ``judge`` scores the generation tasks (none: not scored)."""

    name = "mlvu"

    data: Path
    judge: Judge | None = None

    def __post_init__(self):
        self.data = Path(self.data)

    def config(self) -> dict[str, Any]:
        return {"data": str(self.data.resolve()), "judge": None if self.judge is None else self.judge.name}

    def _video_folder(self, stem: str, task: str) -> str:
        for folder in (f"video/{stem}", f"video/{task}"):
            if (self.data / folder).is_dir():
                return folder
        return f"video/{stem}"

    def load(self) -> list[Question]:
        questions = []
        for stem, task, entries in read_mlvu(self.data):
            folder = self._video_folder(stem, task)
            for i, entry in enumerate(entries):
                common = {
                    "question_id": f"{stem}/{i}",
                    "video": f"{folder}/{entry['video']}",
                    "question": entry["question"],
                    "fields": {"task": task, "question_type": str(entry.get("question_type", task))},
                }
                if task in MC_TASKS:
                    candidates = [str(c) for c in entry["candidates"]]
                    letters = option_letters(len(candidates))
                    target = letters[candidates.index(str(entry["answer"]))]
                    options = tuple(f"{letter}. {c}" for letter, c in zip(letters, candidates))
                    questions.append(Question(**common, target=target, options=options, kind=MC))
                else:
                    extra = {"scoring_points": entry.get("scoring_points")}
                    questions.append(
                        Question(**common, target=str(entry["answer"]), kind=GENERATION, extra=extra)
                    )
        return questions

    def video_path(self, question: Question) -> Path:
        return self.data / question.video

    def prompt(self, question: Question, frame_times: Sequence[float] | None) -> str:
        if question.kind == GENERATION:
            return mlvu_prompt(question.question, None)
        return mlvu_prompt(question.question, [o[3:] for o in question.options])

    def score_generation(self, question: Question, response: str) -> float | None:
        if self.judge is None:
            return None
        points = question.extra.get("scoring_points")
        return float(
            self.judge.score(
                task=question.fields["task"],
                question=question.question,
                reference=question.target,
                prediction=response,
                scoring_points=None if points is None else str(points),
            )
        )

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        mc = [r for r in records if r["kind"] == MC]
        per_task = accuracy_by(mc, "task", MC_TASKS)
        without_order = [r for r in mc if r["task"] != "order"]
        summary: dict[str, Any] = {
            "m_avg_macro": sum(t["acc"] for t in per_task.values()) / len(per_task) if per_task else 0.0,
            "m_avg_micro": accuracy(mc)["acc"],
            "m_avg_micro_without_order": accuracy(without_order)["acc"],
        }
        definitions = {
            "m_avg_macro": f"M-Avg, macro: mean of the per-task accuracies of {len(per_task)} multiple-choice tasks "
            "(lmms-eval mlvu_dev)",
            "m_avg_micro": f"M-Avg, micro: accuracy over all {len(mc)} multiple-choice questions (MLVU template)",
            "m_avg_micro_without_order": "M-Avg, micro, without the order task (VLMEvalKit)",
        }
        groups: dict[str, Any] = {"task": per_task}
        generation = [r for r in records if r["kind"] == GENERATION]
        if generation:
            # A failed video scores 0 (below the judges' minimum of 2), like a wrong multiple-choice answer.
            scored = [r for r in generation if r.get("judge_score") is not None or r["error"] is not None]
            if self.judge is None or not scored:
                definitions["g_avg"] = "G-Avg: not scored (no judge configured); answers are in samples.jsonl"
                summary["g_avg"] = None
            else:
                by_task: dict[str, list[float]] = {}
                for r in scored:
                    by_task.setdefault(r["task"], []).append(float(r["judge_score"] or 0.0))
                means = {t: sum(v) / len(v) for t, v in by_task.items()}
                summary["g_avg"] = sum(means.values()) / len(means)
                definitions["g_avg"] = (
                    f"G-Avg: mean over generation tasks of the mean {self.judge.name} score (0-10)"
                )
                groups["generation_score"] = {
                    t: {"score": m, "total": len(by_task[t])} for t, m in means.items()
                }
        return {"summary": summary, "definitions": definitions, "overall": accuracy(mc), "groups": groups}
