"""``keye eval ...``: the harness's command line. `add_parser` hangs it under keye's CLI.

    keye eval videomme --data DIR [--subtitles]   Video-MME from its published folder
    keye eval mlvu --data DIR                     MLVU dev from its published folder
    keye eval synthetic --seed S --n N            write the synthetic Video-MME-format benchmark and evaluate it
    keye eval compare OUT1 OUT2                   two finished runs side by side

Common flags: --model (default keye-tiny), --out, --limit, --fps, --max-frames, --token-budget, --compress, --think.
The model is built in one place, `build_predictor`, through ``keye.eval.keye_predictor.make_predictor`` (imported lazily so
that ``keye --help`` stays fast).

Not for the metrics or the run loop (`runner`, the tasks).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from keye.eval.runner import COMPRESS, EvalSettings

__all__ = ["add_parser", "build_predictor", "main"]

_DEFAULTS = EvalSettings()


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="keye-tiny", help="model name or checkpoint folder (default: keye-tiny)"
    )
    parser.add_argument(
        "--out", type=Path, help="run folder (default: runs/eval/<task>-<model>); reruns resume it"
    )
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument(
        "--fps", type=float, help="frames per second (default: the model's processor setting)"
    )
    parser.add_argument(
        "--max-frames",
        type=int,
        help="frame cap (default: the model's processor setting)",
    )
    parser.add_argument(
        "--token-budget",
        type=int,
        help="vision tokens per video (default: the model's processor setting)",
    )
    parser.add_argument(
        "--compress", choices=COMPRESS, default=_DEFAULTS.compress, help="vision token compression"
    )
    parser.add_argument(
        "--think", action="store_true", help="let the model reason (<think>) before answering"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, help="answer length cap (default: 16 multiple choice, 512 open)"
    )
    parser.add_argument(
        "--prepare-per-question",
        action="store_true",
        help="ablation: encode the video again for every question (to measure what encoding once saves)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


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


def build_predictor(args: argparse.Namespace) -> Any:
    """The one place the harness builds a model: ``keye.eval.keye_predictor.make_predictor(model_name)``."""
    from keye.eval.keye_predictor import (
        make_predictor,  # the model stack is imported only when a run needs it
    )

    return make_predictor(args.model)


def _default_out(args: argparse.Namespace) -> Path:
    model = re.sub(r"[^\w.-]+", "_", Path(args.model).name or args.model)
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

    out = args.out or _default_out(args)
    task = _build_task(args, out)
    settings = EvalSettings(
        fps=args.fps,
        max_frames=args.max_frames,
        token_budget=args.token_budget,
        compress=args.compress,
        think=args.think,
        max_new_tokens=args.max_new_tokens,
        reuse_video=not args.prepare_per_question,
    )
    predictor = build_predictor(args)
    results = run(task, predictor, out, settings=settings, limit=args.limit, progress=not args.no_progress)
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
