"""Video-MME as published: reader, official prompts (with and without subtitles), subtitle selection, metrics.

Layout (the Hugging Face release ``lmms-lab/Video-MME``)::

    DIR/videomme/test-00000-of-00001.parquet   (or any *.parquet directly in DIR or DIR/videomme)
    DIR/data/<videoID>.mp4
    DIR/subtitle/<videoID>.srt

Parquet columns: video_id, duration (short|medium|long), domain, sub_category, url, videoID, question_id, task_type,
question, options (["A. ...", "B. ...", "C. ...", "D. ..."]), answer (a letter).

Prompts follow the benchmark's README (github.com/BradyFU/Video-MME, "Evaluation Pipeline"): without subtitles::

    Select the best answer to the following multiple-choice question based on the video. Respond with only the
    letter (A, B, C, or D) of the correct option.
    <question>
    A. ...
    ...
    The best answer is:

and with subtitles the same prompt under ``This video's subtitles are listed below:`` and the subtitle lines. The
lines are those whose [start, end) interval contains a sampled frame's time, in time order, each once, with the
SRT's ``<font>`` markup removed: the rule of lmms-eval's ``videomme_w_subtitle`` (which also writes "based on the
video and the subtitles" and a space after "below:"; we keep the README's wording). A video without an .srt file
gets "No subtitles available", as in lmms-eval.

Scoring: accuracy over all questions (a failed video or an unparsable answer is wrong), overall and per duration,
domain, sub-category and task type, like lmms-eval. The official script divides by the questions whose answer
parsed; that figure is reported too, as ``accuracy_over_parsed``.

Not for downloading the benchmark.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keye.errors import KeyeInputError
from keye.eval.predictor import Subtitle
from keye.eval.task import MC, Question, Task, accuracy, accuracy_by, register_task

__all__ = [
    "COLUMNS",
    "VideoMME",
    "find_parquets",
    "parse_srt",
    "read_videomme",
    "select_subtitles",
    "videomme_prompt",
]

COLUMNS = (
    "video_id",
    "duration",
    "domain",
    "sub_category",
    "url",
    "videoID",
    "question_id",
    "task_type",
    "question",
    "options",
    "answer",
)

INSTRUCTION = (
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter (A, B, C, or D) of the correct option."
)
ANSWER_CUE = "The best answer is:"
SUBTITLE_HEADER = "This video's subtitles are listed below:"
NO_SUBTITLES = "No subtitles available"

DURATIONS = ("short", "medium", "long")
DOMAINS = (
    "Knowledge",
    "Film & Television",
    "Sports Competition",
    "Artistic Performance",
    "Life Record",
    "Multilingual",
)
TASK_TYPES = (
    "Temporal Perception",
    "Spatial Perception",
    "Attribute Perception",
    "Action Recognition",
    "Object Recognition",
    "OCR Problems",
    "Counting Problem",
    "Temporal Reasoning",
    "Spatial Reasoning",
    "Action Reasoning",
    "Object Reasoning",
    "Information Synopsis",
)
GROUP_FIELDS = ("duration", "domain", "sub_category", "task_type")


def find_parquets(root: str | Path) -> list[Path]:
    """The question files of a Video-MME folder: ``*.parquet`` in it or in its ``videomme/`` folder."""
    root = Path(root)
    files = sorted(root.glob("*.parquet")) + sorted((root / "videomme").glob("*.parquet"))
    if not files:
        raise KeyeInputError(root, "no Video-MME parquet file (looked for *.parquet and videomme/*.parquet)")
    return files


def read_videomme(root: str | Path) -> list[dict[str, Any]]:
    """The rows of every parquet file of a Video-MME folder, in file order, validated.

    ``options`` comes back as a list of str. Raises `KeyeInputError` naming the file for a missing column, a
    malformed option list or an answer that is not one of the options' letters.
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for path in find_parquets(root):
        frame = pd.read_parquet(path)
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise KeyeInputError(path, f"missing Video-MME columns {missing}")
        for row in frame[list(COLUMNS)].to_dict(orient="records"):
            options = [str(o) for o in row["options"]]
            letters = [o[:1] for o in options]
            if letters != [chr(ord("A") + i) for i in range(len(options))] or not all(
                o[1:3] == ". " for o in options
            ):
                raise KeyeInputError(
                    path, f"question {row['question_id']}: options must read 'A. ...': {options}"
                )
            if row["answer"] not in letters:
                raise KeyeInputError(
                    path, f"question {row['question_id']}: answer {row['answer']!r} not in {letters}"
                )
            rows.append({k: (options if k == "options" else str(v)) for k, v in row.items()})
    return rows


_SRT_TIME = re.compile(r"(\d+):(\d{2}):(\d{2})[,.](\d{1,3})")


def _srt_seconds(stamp: str) -> float:
    m = _SRT_TIME.fullmatch(stamp.strip())
    if m is None:
        raise ValueError(f"bad SRT time {stamp!r}")
    h, mi, s, ms = m.groups()
    return int(h) * 3600 + int(mi) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000


def parse_srt(path: str | Path) -> list[Subtitle]:
    """``[(start_s, end_s, text)]`` of an SRT file, markup (``<font ...>``) removed, lines of a cue joined by spaces."""
    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise KeyeInputError(path, f"cannot read subtitles: {e}") from e
    subtitles: list[Subtitle] = []
    for block in re.split(r"\r?\n\s*\r?\n", content.strip()):
        lines = [line.strip() for line in block.strip().splitlines()]
        arrow = next((i for i, line in enumerate(lines) if "-->" in line), None)
        if arrow is None:
            continue
        start, end = (part.split()[0] if part.split() else part for part in lines[arrow].split("-->"))
        try:
            t0, t1 = _srt_seconds(start), _srt_seconds(end)
        except ValueError as e:
            raise KeyeInputError(path, f"{e} in cue {lines[0]!r}") from e
        text = " ".join(re.sub(r"<[^>]+>", "", line).strip() for line in lines[arrow + 1 :]).strip()
        if text:
            subtitles.append((t0, t1, text))
    return subtitles


def select_subtitles(subtitles: Sequence[Subtitle], frame_times: Sequence[float]) -> list[str]:
    """The subtitle lines shown at the sampled frames: each cue whose [start, end) holds a frame time, in time order."""
    chosen = [
        (start, i, text)
        for i, (start, end, text) in enumerate(subtitles)
        if any(start <= t < end for t in frame_times)
    ]
    return [text for _, _, text in sorted(chosen)]


def videomme_prompt(
    question: str, options: Sequence[str], subtitle_lines: Sequence[str] | None = None
) -> str:
    """The official Video-MME prompt; ``subtitle_lines`` (possibly empty) switches to the "w/ subs" setting."""
    body = "\n".join([INSTRUCTION, question, *options, ANSWER_CUE])
    if subtitle_lines is None:
        return body
    return f"{SUBTITLE_HEADER}\n" + "\n".join(subtitle_lines) + f"\n{body}"


def _video_file(root: Path, video_id: str) -> Path:
    # The release has a few .MP4 / .mkv files (lmms-eval looks for the same three names).
    for suffix in (".mp4", ".MP4", ".mkv"):
        if (candidate := root / "data" / f"{video_id}{suffix}").exists():
            return candidate
    return root / "data" / f"{video_id}.mp4"


def videomme_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Video-MME metrics: accuracy overall and per duration, domain, sub-category and task type."""
    parsed = [r for r in records if r["extracted"] is not None]
    return {
        "summary": {
            "accuracy": accuracy(records)["acc"],
            "accuracy_over_parsed": accuracy(parsed)["acc"],
        },
        "definitions": {
            "accuracy": "percent correct over all questions; failed videos and unparsable answers count as wrong",
            "accuracy_over_parsed": "percent correct over questions whose answer parsed (official script's divisor)",
        },
        "overall": accuracy(records),
        "groups": {
            "duration": accuracy_by(records, "duration", DURATIONS),
            "domain": accuracy_by(records, "domain", DOMAINS),
            "sub_category": accuracy_by(records, "sub_category"),
            "task_type": accuracy_by(records, "task_type", TASK_TYPES),
        },
    }


@register_task
@dataclass
class VideoMME(Task):
    """Video-MME from the published folder ``data``; ``use_subtitles`` is the "w/ subs" setting."""

    name = "videomme"

    data: Path
    use_subtitles: bool = False

    def __post_init__(self):
        self.data = Path(self.data)
        self._tracks: dict[str, list[Subtitle] | None] = {}

    def load(self) -> list[Question]:
        questions = []
        for row in read_videomme(self.data):
            video = _video_file(self.data, row["videoID"]).relative_to(self.data).as_posix()
            questions.append(
                Question(
                    question_id=row["question_id"],
                    video=video,
                    question=row["question"],
                    target=row["answer"],
                    options=tuple(row["options"]),
                    kind=MC,
                    fields={k: row[k] for k in GROUP_FIELDS},
                    extra={"videoID": row["videoID"]},
                )
            )
        return questions

    def video_path(self, question: Question) -> Path:
        return self.data / question.video

    @property
    def uses_frame_times(self) -> bool:
        return self.use_subtitles

    def subtitle_track(self, question: Question) -> list[Subtitle] | None:
        if not self.use_subtitles:
            return None
        video_id = question.extra["videoID"]
        if video_id not in self._tracks:
            srt = self.data / "subtitle" / f"{video_id}.srt"
            self._tracks[video_id] = parse_srt(srt) if srt.exists() else None
        return self._tracks[video_id]

    def prompt(self, question: Question, frame_times: Sequence[float] | None) -> str:
        if not self.use_subtitles:
            return videomme_prompt(question.question, question.options)
        track = self.subtitle_track(question)
        if track is None:
            lines = [NO_SUBTITLES]
        else:
            if frame_times is None:
                raise ValueError("the subtitle setting needs the sampled frame times")
            lines = select_subtitles(track, frame_times)
        return videomme_prompt(question.question, question.options, lines)

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return videomme_metrics(records)
