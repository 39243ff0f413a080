"""Run a task against a predictor: one prepare per video, a JSONL line per question, resume, failures recorded,
data-parallel shards merged, harness overhead measured, results.json and a report written.

Output folder::

    OUT/run.json           what was run (task config, model, settings): a resumed run must match it
    OUT/samples.jsonl      one line per question (the merged, benchmark-ordered log once the run ends)
    OUT/samples.rankR.jsonl  rank R's live log in a multi-process run (merged into samples.jsonl, then removed)
    OUT/results.json       every metric, counts, failures, settings, timing, versions
    OUT/report.md, OUT/figures/*.png

Resume: lines already in OUT are never asked again; a line torn by a kill is dropped and its question asked again.
Metrics come only from the records, so a resumed run's metrics equal an uninterrupted run's.

Failures: `Predictor.prepare_video`/`answer` raising `keye.errors.KeyeInputError` (missing, corrupt or
undecodable video; too long a prompt) is recorded on every affected question with the reason, scored wrong, counted
under ``counts.failed``, and the run goes on. Any other exception is a bug and stops the run.

Data parallel: under ``accelerate launch`` (or torchrun) each process takes every WORLD_SIZE-th video, writes its own
log, and process 0 merges the logs (each question once) and scores. A single process never imports torch here.

Not for building prompts or metrics (tasks) or loading a model (the predictor).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from keye.errors import ConfigError, KeyeInputError
from keye.eval.predictor import Predictor
from keye.eval.task import GENERATION, MC, RECORD_KEYS, Question, Task
from keye.extract import extract_choice

__all__ = ["COMPRESS", "EvalSettings", "run", "read_samples"]

COMPRESS = ("none", "dyntok", "clapper")


@dataclass(frozen=True)
class EvalSettings:
    """How the model sees each video and answers.

    ``fps``, ``max_frames`` and ``token_budget`` ``None`` use the model's own processor settings (keye-tiny's are
    small; Keye-VL-1.5's are 2 fps, 1365 frames, 65536 tokens).

    ``max_new_tokens`` ``None`` means 16 for a multiple-choice answer (as lmms-eval) and 512 for a generation
    answer, plus 2048 with ``think``. ``reuse_video=False`` prepares the video again for every question: an ablation
    that measures what encoding once saves, never the way to score.
    """

    fps: float | None = None
    max_frames: int | None = None
    token_budget: int | None = None
    compress: str = "none"
    think: bool = False
    max_new_tokens: int | None = None
    reuse_video: bool = True

    def __post_init__(self):
        if self.compress not in COMPRESS:
            raise ConfigError("compress", f"must be one of {', '.join(COMPRESS)}, got {self.compress!r}")
        for name in ("fps", "max_frames", "token_budget"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")

    def new_tokens(self, kind: str) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return (16 if kind == MC else 512) + (2048 if self.think else 0)


# ---------------------------------------------------------------------------------------------------------------------
# Sample logs


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL log. Every write ends with a newline, so text after the last newline is a line torn by a
    kill and is ignored (`_drop_torn_tail` cuts it before appending); a corrupt complete line is an error."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise KeyeInputError(
                path, f"line {i + 1} is not JSON ({e}); delete the line to ask it again"
            ) from e
    return records


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line so that appending starts on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _log_files(out: Path) -> list[Path]:
    return [out / "samples.jsonl", *sorted(out.glob("samples.rank*.jsonl"))]


def read_samples(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every question already answered (or failed) in ``out_dir``: ``{question_id: record}``, each id once."""
    done: dict[str, dict[str, Any]] = {}
    for path in _log_files(Path(out_dir)):
        for record in _read_jsonl(path):
            done.setdefault(record["question_id"], record)
    return done


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# Processes


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    state: Any = None

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def _distributed() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch  # only multi-process runs need torch here
    from accelerate import PartialState

    # Without a GPU, accelerate sets up gloo (MULTI_CPU) only when asked for the CPU explicitly.
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != world:
        raise RuntimeError(
            f"WORLD_SIZE is {world} but accelerate set up {state.num_processes} process(es) "
            f"({state.distributed_type}); was PartialState created earlier without cpu=True on a machine without GPUs?"
        )
    return _Dist(state.process_index, state.num_processes, state)


class _Timer:
    """Adds up the seconds spent inside ``with timer:`` blocks (the predictor's calls)."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def __enter__(self):
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1


# ---------------------------------------------------------------------------------------------------------------------
# One question


def _base_record(q: Question) -> dict[str, Any]:
    clash = [k for k in q.fields if k in RECORD_KEYS or k == "judge_score"]
    if clash:
        raise ValueError(f"question {q.question_id}: fields {clash} clash with record keys")
    record = {"question_id": q.question_id, "video": q.video, "kind": q.kind, "target": q.target, **q.fields}
    record.update(
        prompt=None,
        response=None,
        extracted=None,
        correct=False if q.kind == MC else None,
        num_tokens=0,
        latency_s=0.0,
        error=None,
    )
    if q.kind == GENERATION:
        record["judge_score"] = None
    return record


@dataclass
class _Prepared:
    handle: Any = None
    frame_times: list[float] | None = None
    error: str | None = None


def _prepare(
    task: Task, predictor: Predictor, q: Question, settings: EvalSettings, timers: dict[str, _Timer]
) -> _Prepared:
    try:
        track = task.subtitle_track(q)
        with timers["prepare"]:
            handle = predictor.prepare_video(
                str(task.video_path(q)),
                fps=settings.fps,
                max_frames=settings.max_frames,
                token_budget=settings.token_budget,
                compress=settings.compress,
                subtitles=track,
            )
        frame_times = None
        if task.uses_frame_times:
            with timers["frame_times"]:
                frame_times = [float(t) for t in predictor.sampled_frame_times(handle)]
        return _Prepared(handle, frame_times)
    except KeyeInputError as e:
        return _Prepared(error=f"{type(e).__name__}: {e}")


def _ask(
    task: Task,
    predictor: Predictor,
    q: Question,
    prep: _Prepared,
    settings: EvalSettings,
    timers: dict[str, _Timer],
) -> dict[str, Any]:
    """Ask one question about a prepared video; the sample record (failed when the video failed)."""
    record = _base_record(q)
    if prep.error is not None:
        record["error"] = prep.error
        return record
    record["prompt"] = prompt = task.prompt(q, prep.frame_times)
    try:
        with timers["answer"]:
            pred = predictor.answer(
                prep.handle, prompt, max_new_tokens=settings.new_tokens(q.kind), think=settings.think
            )
    except KeyeInputError as e:
        record["error"] = f"{type(e).__name__}: {e}"
        return record
    record.update(response=pred.text, num_tokens=int(pred.num_tokens), latency_s=float(pred.latency_s))
    if q.kind == MC:
        record["extracted"] = extract_choice(pred.text, q.options)
        record["correct"] = record["extracted"] == q.target
    else:
        with timers["judge"]:
            record["judge_score"] = task.score_generation(q, pred.text)
    return record


# ---------------------------------------------------------------------------------------------------------------------
# The run


def _group_by_video(questions: Iterable[Question]) -> list[tuple[str, list[Question]]]:
    groups: dict[str, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.video, []).append(q)
    return list(groups.items())


def _check_run_file(out: Path, identity: dict[str, Any], write: bool) -> None:
    path = out / "run.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != identity:
            diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            raise KeyeInputError(
                out,
                f"holds a different run (differs in {diff}); use another --out or delete the folder to start over",
            )
    elif write:
        _write_atomic(path, json.dumps(identity, indent=2) + "\n")


def _versions() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("keye", "torch", "transformers", "accelerate", "av", "decord", "pandas"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        out["git_commit"] = commit.stdout.strip() if commit.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        out["git_commit"] = None
    return out


def _counts(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    failed = [r for r in records if r["error"] is not None]
    answered = [r for r in records if r["error"] is None]
    unparsed = [r for r in answered if r["kind"] == MC and r["extracted"] is None]
    return {
        "questions": len(records),
        "answered": len(answered),
        "failed": len(failed),
        "failed_videos": len({r["video"] for r in failed}),
        "unparsed": len(unparsed),
    }


def run(
    task: Task,
    predictor: Predictor,
    out_dir: str | Path,
    *,
    settings: EvalSettings | None = None,
    limit: int | None = None,
    progress: bool = True,
    report: bool = True,
) -> dict[str, Any]:
    """Evaluate ``predictor`` on ``task`` (the first ``limit`` questions), resuming whatever ``out_dir`` holds.

    Returns the results (also in ``out_dir/results.json``). Every process of a multi-process launch calls it; each
    gets the same results back.
    """
    t_start = time.perf_counter()
    if not isinstance(predictor, Predictor):
        raise TypeError(f"{type(predictor).__name__} does not implement keye.eval.predictor.Predictor")
    settings = settings or EvalSettings()
    out = Path(out_dir)
    dist = _distributed()
    out.mkdir(parents=True, exist_ok=True)

    all_questions = task.load()
    order = {q.question_id: i for i, q in enumerate(all_questions)}
    if len(order) != len(all_questions):
        raise KeyeInputError(task.name, "question ids are not unique")
    questions = all_questions if limit is None else all_questions[:limit]

    # The limit is left out: a later run with a larger limit reuses the answers already there.
    identity = {
        "task": task.name,
        "task_config": task.config(),
        "model": predictor.name,
        "settings": asdict(settings),
    }
    if dist.rank == 0:
        _check_run_file(out, identity, write=True)
    dist.barrier()
    _check_run_file(out, identity, write=False)

    done = read_samples(out)
    resumed = sum(q.question_id in done for q in questions)
    videos = _group_by_video(questions)[dist.rank :: dist.world]
    todo = [(video, [q for q in qs if q.question_id not in done]) for video, qs in videos]
    todo = [(video, qs) for video, qs in todo if qs]

    timers = {name: _Timer() for name in ("prepare", "frame_times", "answer", "judge")}
    live = out / ("samples.jsonl" if dist.world == 1 else f"samples.rank{dist.rank}.jsonl")
    _drop_torn_tail(live)
    mine = [done[q.question_id] for _, qs in videos for q in qs if q.question_id in done]
    correct = sum(bool(r["correct"]) for r in mine if r["kind"] == MC)
    scored = sum(r["kind"] == MC for r in mine)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=sum(len(qs) for _, qs in todo),
        desc=f"{task.name} [{dist.rank}/{dist.world}]" if dist.world > 1 else task.name,
        unit="q",
        disable=not progress,
        position=dist.rank,
    )
    with live.open("a", encoding="utf-8") as log, bar:
        for _video, qs in todo:
            prep = _prepare(task, predictor, qs[0], settings, timers) if settings.reuse_video else None
            for q in qs:
                if not settings.reuse_video:
                    prep = _prepare(task, predictor, q, settings, timers)
                record = _ask(task, predictor, q, prep, settings, timers)
                log.write(json.dumps(record, ensure_ascii=False) + "\n")
                log.flush()
                if q.kind == MC:
                    scored += 1
                    correct += bool(record["correct"])
                    bar.set_postfix(acc=f"{100.0 * correct / scored:.1f}%", refresh=False)
                bar.update(1)
            prep = None  # let the predictor free the video's features / KV cache

    predictor_s = sum(t.seconds for name, t in timers.items() if name != "judge")
    timing = {
        "rank": dist.rank,
        "wall_s": time.perf_counter() - t_start,
        "predictor_s": predictor_s,
        "prepare_s": timers["prepare"].seconds,
        "frame_times_s": timers["frame_times"].seconds,
        "answer_s": timers["answer"].seconds,
        "judge_s": timers["judge"].seconds,
        "prepare_calls": timers["prepare"].calls,
        "answer_calls": timers["answer"].calls,
        "videos": len(todo),
    }
    _write_atomic(out / f"timing.rank{dist.rank}.json", json.dumps(timing) + "\n")
    dist.barrier()

    if dist.rank == 0:
        results = _finish(
            task,
            predictor,
            out,
            questions=questions,
            order=order,
            identity=identity,
            limit=limit,
            resumed=resumed,
            world=dist.world,
            t_start=t_start,
        )
        if report:
            from keye.eval.report import write_report

            t_report = time.perf_counter()
            write_report(out, results)
            results["timing"]["report_s"] = time.perf_counter() - t_report
            _write_atomic(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    dist.barrier()
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def _finish(
    task: Task,
    predictor: Predictor,
    out: Path,
    *,
    questions: list[Question],
    order: dict[str, int],
    identity: dict[str, Any],
    limit: int | None,
    resumed: int,
    world: int,
    t_start: float,
) -> dict[str, Any]:
    """Process 0: merge the logs into samples.jsonl (benchmark order, each question once), score, write results."""
    t_merge = time.perf_counter()
    done = read_samples(out)
    missing = [q.question_id for q in questions if q.question_id not in done]
    if missing:
        raise RuntimeError(
            f"{out}: {len(missing)} questions have no record after the run (first: {missing[:3]})"
        )
    merged = sorted(done.values(), key=lambda r: order.get(r["question_id"], len(order)))
    _write_atomic(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
    for path in out.glob("samples.rank*.jsonl"):
        path.unlink()

    ranks = []
    for r in range(world):
        path = out / f"timing.rank{r}.json"
        ranks.append(json.loads(path.read_text(encoding="utf-8")))
        path.unlink()
    records = [done[q.question_id] for q in questions]
    metrics = task.metrics(records)
    failures: dict[str, str] = {}
    for r in records:
        if r["error"] is not None:
            failures.setdefault(r["video"], r["error"])
    merge_s = time.perf_counter() - t_merge
    wall = sum(t["wall_s"] for t in ranks) + merge_s
    predictor_s = sum(t["predictor_s"] + t["judge_s"] for t in ranks)
    results = {
        "task": task.name,
        "task_config": identity["task_config"],
        "model": predictor.name,
        "settings": {**identity["settings"], "limit": limit, "processes": world},
        "metrics": metrics,
        "counts": _counts(records),
        "failures": [{"video": v, "reason": reason} for v, reason in failures.items()],
        "timing": {
            # Harness overhead: time in the harness (reading, prompts, parsing, logging, merging, scoring) over
            # the run's time, summed over processes (waits at barriers left out); report writing is timed apart
            # (report_s).
            "wall_s": time.perf_counter() - t_start,
            "process_s": wall,
            "merge_s": merge_s,
            "predictor_s": predictor_s,
            "harness_overhead_s": wall - predictor_s,
            "harness_overhead_frac": (wall - predictor_s) / wall if wall > 0 else 0.0,
            "prepare_calls": sum(t["prepare_calls"] for t in ranks),
            "answer_calls": sum(t["answer_calls"] for t in ranks),
            "resumed_questions": resumed,
            "per_process": ranks,
        },
        "versions": _versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_atomic(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results
