"""``keye pretrain`` and ``keye merge``: `add_parser` hangs both under keye's CLI.

    keye pretrain --config configs/pretrain/stage1_tiny.yaml [train.key=value ...] [--resume]
    keye merge CKPT CKPT... [--weights 0.5 0.5] --out DIR

Multi-process: ``accelerate launch -m keye.pretrain.cli pretrain --config ...`` or
``torchrun --nproc_per_node N -m keye.pretrain.cli pretrain --config ...`` (the module also runs on its own).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "main"]


def _pretrain(args: argparse.Namespace) -> int:
    from keye.pretrain.recipe import run

    final = run(args.config, args.overrides, resume=args.resume)
    if final is not None:
        print(f"exported {final}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from keye.pretrain.merge import merge_checkpoints

    target = merge_checkpoints(args.checkpoints, args.weights, args.out)
    print(f"merged {len(args.checkpoints)} checkpoints -> {target}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``pretrain`` and ``merge``; each sets ``func`` (``func(args) -> exit status``)."""
    p = subparsers.add_parser("pretrain", help="run a pretraining stage from a YAML config")
    p.add_argument("--config", required=True, help="configs/pretrain/<stage>.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.set_defaults(func=_pretrain)

    m = subparsers.add_parser("merge", help="weighted parameter averaging of same-architecture checkpoints")
    m.add_argument("checkpoints", nargs="+", metavar="CKPT", help="model folders or weight files")
    m.add_argument("--weights", nargs="+", type=float, help="one weight per checkpoint (default: equal)")
    m.add_argument("--out", required=True, metavar="DIR")
    m.set_defaults(func=_merge)


def main(argv: list[str] | None = None) -> int:
    from keye.cli import layer_main

    return layer_main(add_parser, "python -m keye.pretrain.cli", argv)


if __name__ == "__main__":
    sys.exit(main())
