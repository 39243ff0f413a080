"""``keye eval ...``: the harness's command line. `add_parser` hangs it under keye's CLI.

    keye eval videomme --data DIR [--subtitles]   Video-MME from its published folder
    keye eval mlvu --data DIR                     MLVU dev from its published folder
    keye eval synthetic --seed S --n N            write the synthetic Video-MME-format benchmark and evaluate it
    keye eval compare OUT1 OUT2                   two finished runs side by side

Common: ``--config FILE`` (YAML of `EvalConfig`, e.g. ``configs/eval/videomme.yaml``) and ``key=value`` overrides, and a
flag per field: --model (default keye-tiny), --out, --limit, --fps, --max-frames, --token-budget, --compress, --think,
--max-new-tokens, --no-reuse-video (or --prepare-per-question), --no-progress.
The model is built in one place, `build_predictor`, through ``keye.eval.keye_predictor.make_predictor`` (imported lazily so
that ``keye --help`` stays fast).

Not for the metrics or the run loop (`runner`, the tasks).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from keye.config import load
from keye.eval.runner import COMPRESS, EvalSettings
from keye.flags import add_flags, given

__all__ = ["EvalConfig", "add_parser", "build_predictor", "eval_config", "main"]


@dataclass(frozen=True)
class EvalConfig(EvalSettings):
    """A ``keye eval`` run: the model, the run folder, how many questions, and how the model sees and answers
    (`EvalSettings`). From ``--config FILE`` (YAML, e.g. ``configs/eval/videomme.yaml``), then ``key=value``
    overrides, then the flags given (each generated from a field: ``--model``, ``--max-frames``, ``--think``, ...)."""

    model: str = "keye-tiny"  # model name or checkpoint folder
    out: str | None = None  # run folder (None: runs/eval/<task>-<model>); a rerun resumes it
    limit: int | None = None  # only the first N questions
    progress: bool = True

    def settings(self) -> EvalSettings:
        return EvalSettings(**{f.name: getattr(self, f.name) for f in fields(EvalSettings)})


_HELP = {
    "model": "model name or checkpoint folder (default: keye-tiny)",
    "out": "run folder (default: runs/eval/<task>-<model>); reruns resume it",
    "limit": "only the first N questions",
    "fps": "frames per second (default: the model's processor setting)",
    "max_frames": "frame cap (default: the model's processor setting)",
    "token_budget": "vision tokens per video (default: the model's processor setting)",
    "compress": f"vision token compression: {', '.join(COMPRESS)} (default: none)",
    "think": "let the model reason (<think>) before answering",
    "max_new_tokens": "answer length cap (default: 16 multiple choice, 512 open)",
    "reuse_video": "encode each video once for all its questions (default; --no-reuse-video is an ablation)",
    "progress": "progress bar (default: on)",
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="YAML of EvalConfig fields (configs/eval/)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (after --config)")
    add_flags(parser, EvalConfig, help=_HELP, show_defaults=False)
    parser.add_argument(
        "--prepare-per-question",
        dest="reuse_video",
        action="store_false",
        default=None,
        help="ablation: encode the video again for every question (--no-reuse-video)",
    )


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """The run's `EvalConfig`: ``--config``, then the overrides, then the flags the user gave."""
    cfg = load(EvalConfig, args.config, args.overrides)
    return replace(cfg, **given(args, EvalConfig))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``eval`` and its subcommands to keye's CLI; each sets ``func`` (``func(args) -> exit status``)."""
    from keye.synthetic import add_object_scale_argument

    parser = subparsers.add_parser("eval", help="evaluate on Video-MME, MLVU or the synthetic benchmark")
    sub = parser.add_subparsers(
        dest="eval_command", required=True, metavar="{videomme,mlvu,synthetic,compare}"
    )

    videomme = sub.add_parser("videomme", help="Video-MME from its published folder")
    videomme.add_argument(
        "--data", type=Path, required=True, help="folder with videomme/*.parquet, data/, subtitle/"
    )
    videomme.add_argument("--subtitles", action="store_true", help='the "w/ subs" setting')
    _common(videomme)

    mlvu = sub.add_parser("mlvu", help="MLVU dev from its published folder")
    mlvu.add_argument("--data", type=Path, required=True, help="folder with json/<N>_<task>.json and video/")
    _common(mlvu)

    synthetic = sub.add_parser(
        "synthetic", help="write the synthetic benchmark (Video-MME format) and evaluate it"
    )
    synthetic.add_argument("--seed", type=int, required=True)
    synthetic.add_argument("--n", type=int, required=True, help="number of questions")
    synthetic.add_argument("--data", type=Path, help="where to write the benchmark (default: OUT/benchmark)")
    synthetic.add_argument(
        "--max-objects", type=int, help="at most this many shapes per scene (generator default: 4)"
    )
    synthetic.add_argument(
        "--text-prob", type=float, help="share of scenes with on-screen text (generator default: 0.5)"
    )
    add_object_scale_argument(synthetic)
    _common(synthetic)

    compare = sub.add_parser("compare", help="two finished runs side by side")
    compare.add_argument("out1", type=Path)
    compare.add_argument("out2", type=Path)

    for p in (videomme, mlvu, synthetic, compare):
        p.set_defaults(func=main)
    return parser


def build_predictor(model: str) -> Any:
    """The one place the harness builds a model: ``keye.eval.keye_predictor.make_predictor(model_name)``."""
    from keye.eval.keye_predictor import (
        make_predictor,  # the model stack is imported only when a run needs it
    )

    return make_predictor(model)


def _default_out(args: argparse.Namespace, model: str) -> Path:
    model = re.sub(r"[^\w.-]+", "_", Path(model).name or model)
    name = {
        "videomme": "videomme-subs" if getattr(args, "subtitles", False) else "videomme",
        "mlvu": "mlvu",
        "synthetic": f"synthetic-s{getattr(args, 'seed', 0)}-n{getattr(args, 'n', 0)}",
    }[args.eval_command]
    return Path("runs") / "eval" / f"{name}-{model}"


def _build_task(args: argparse.Namespace, out: Path):
    if args.eval_command == "videomme":
        from keye.eval.videomme import VideoMME

        return VideoMME(args.data, use_subtitles=args.subtitles)
    if args.eval_command == "mlvu":
        from keye.eval.mlvu import MLVU

        return MLVU(args.data)
    from keye.eval.synthetic import Synthetic

    return Synthetic(
        seed=args.seed,
        n=args.n,
        data=args.data or out / "benchmark",
        max_objects=args.max_objects,
        text_prob=args.text_prob,
        object_scale=args.object_scale,
    )


def main(args: argparse.Namespace) -> int:
    """Run one ``keye eval`` subcommand; returns the exit status."""
    if args.eval_command == "compare":
        from keye.eval.report import compare

        print(compare(args.out1, args.out2), end="")
        return 0

    from keye.eval.runner import run

    cfg = eval_config(args)
    out = Path(cfg.out) if cfg.out else _default_out(args, cfg.model)
    task = _build_task(args, out)
    predictor = build_predictor(cfg.model)
    results = run(task, predictor, out, settings=cfg.settings(), limit=cfg.limit, progress=cfg.progress)
    summary = ", ".join(
        f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in results["metrics"]["summary"].items()
    )
    counts = results["counts"]
    timing = results["timing"]
    print(f"{task.name} {predictor.name}: {summary}")
    print(
        f"{counts['questions']} questions, {counts['failed']} failed ({counts['failed_videos']} videos), "
        f"{counts['unparsed']} unparsed; {timing['wall_s']:.1f} s, harness overhead "
        f"{100 * timing['harness_overhead_frac']:.1f}%"
    )
    print(f"results: {out / 'results.json'}  report: {out / 'report.md'}")
    return 0
