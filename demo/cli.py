"""`keye demo`: serve the Gradio chat demo.

    keye demo [--config configs/demo/tiny.yaml] [key=value ...] [--model M] [--host 127.0.0.1] [--port 7860] [--share]
              [--max-upload-mb 200] [--max-duration 600] [--concurrency 1] [--queue-size 16] [--max-new-tokens 1024]

`add_parser` is wired into `keye.cli`; the module also runs on its own: ``python -m keye.demo.cli demo ...``.
Gradio is imported only when the command runs, so ``keye --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from keye.config import load
from keye.demo.limits import Limits
from keye.flags import add_flags, given
from keye.ports import check_port

__all__ = ["DemoConfig", "add_parser", "demo_config", "main", "run_command"]


@dataclass
class DemoConfig:
    """A ``keye demo`` server: from ``--config FILE`` (YAML, e.g. ``configs/demo/tiny.yaml``), then ``key=value``
    overrides, then the flags given (one per field; the limits' flags are flat: ``--max-upload-mb``, ...)."""

    model: str = "keye-tiny"  # model name or folder
    host: str = "127.0.0.1"  # address to listen on (0.0.0.0: the whole network)
    port: int = 7860
    share: bool = False  # also open a public Gradio share link
    limits: Limits = field(default_factory=Limits)


_HELP = {
    "model": "model name or folder (default: keye-tiny)",
    "host": "address to listen on (0.0.0.0: the whole network; default 127.0.0.1)",
    "port": "default 7860",
    "share": "also open a public Gradio share link",
    "max_upload_mb": "largest file accepted, MB (default 200)",
    "max_duration_s": "longest video accepted, seconds (default 600)",
    "concurrency": "answers generated at once; one model is shared (default 1)",
    "queue_size": "requests that may wait; more are refused (default 16)",
    "max_new_tokens": "upper end of the answer-length slider (default 1024)",
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``demo`` to `subparsers`; the handler is set as the ``func`` default."""
    p = subparsers.add_parser("demo", help="chat with a model in the browser (Gradio)")
    p.add_argument("--config", metavar="FILE", help="YAML of DemoConfig fields (configs/demo/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (after --config)")
    add_flags(p, DemoConfig, only=("model", "host", "port", "share"), help=_HELP, show_defaults=False)
    add_flags(p, Limits, rename={"max_duration_s": "max_duration"}, help=_HELP, show_defaults=False)
    p.set_defaults(func=run_command)
    return p


def demo_config(args: argparse.Namespace) -> DemoConfig:
    """The server's `DemoConfig`: ``--config``, then the overrides, then the flags the user gave."""
    cfg = load(DemoConfig, args.config, args.overrides)
    limits = replace(cfg.limits, **given(args, Limits))
    top = {k: v for k, v in given(args, DemoConfig).items() if k != "limits"}
    return replace(cfg, limits=limits, **top)


def run_command(args: argparse.Namespace) -> int:
    """Handler of ``keye demo``: check the port, load the model, serve until interrupted (Ctrl-C or SIGTERM).

    Everything the server writes (generated examples, the tool loop's images, Gradio's uploads) goes into one
    temporary folder, removed on exit, whether the start succeeded or not."""
    cfg = demo_config(args)
    fix = f"choose another: make demo PORT={cfg.port + 1} (or keye demo --port {cfg.port + 1})"
    check_port(cfg.host, cfg.port, "keye demo", fix)
    # Gradio reports usage to its servers unless told not to; the demo must work offline and stay quiet.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` ends the demo like Ctrl-C: the folder is removed
    with tempfile.TemporaryDirectory(prefix="keye-demo-") as work:
        os.environ["GRADIO_TEMP_DIR"] = os.path.join(work, "gradio")  # read when gradio is imported
        from keye.demo.page import run

        try:
            run(
                cfg.model,
                work_dir=Path(work),
                host=cfg.host,
                port=cfg.port,
                share=cfg.share,
                limits=cfg.limits,
            )
        except KeyboardInterrupt:
            return 130
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


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
