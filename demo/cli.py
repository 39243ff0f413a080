"""`keye demo`: serve the Gradio chat demo.

    keye demo [--model M] [--host 127.0.0.1] [--port 7860] [--share]
              [--max-upload-mb 200] [--max-duration 600] [--concurrency 1] [--queue-size 16]

`add_parser` is wired into `keye.cli`; the module also runs on its own: ``python -m keye.demo.cli demo ...``.
Gradio is imported only when the command runs, so ``keye --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_parser", "main", "run_command"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``demo`` to `subparsers`; the handler is set as the ``func`` default."""
    p = subparsers.add_parser("demo", help="chat with a model in the browser (Gradio)")
    p.add_argument("--model", default="keye-tiny", help="model name or folder (default: keye-tiny)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: the whole network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--max-upload-mb", type=float, default=200.0, metavar="MB", help="largest file accepted")
    p.add_argument("--max-duration", type=float, default=600.0, metavar="S", help="longest video accepted")
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="answers generated at once (one model is shared)",
    )
    p.add_argument(
        "--queue-size", type=int, default=16, metavar="N", help="requests that may wait; more are refused"
    )
    p.set_defaults(func=run_command)
    return p


def run_command(args: argparse.Namespace) -> int:
    """Handler of ``keye demo``: load the model, serve until interrupted."""
    # Gradio reports usage to its servers unless told not to; the demo must work offline and stay quiet.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from keye.demo.app import Limits, run

    limits = Limits(
        max_upload_mb=args.max_upload_mb,
        max_duration_s=args.max_duration,
        concurrency=args.concurrency,
        queue_size=args.queue_size,
    )
    run(args.model, host=args.host, port=args.port, share=args.share, limits=limits)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keye")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
