"""`keye tools run`: run one snippet in the sandbox from the command line.

    keye tools run --code FILE --image IMG [--image IMG...] [--out DIR] [--json] [--timeout S]
                   [--allow-no-network-isolation] [--no-repair]

FILE is plain Python, or a model turn in the Thyme format whose first ``<code>`` block is run. Exit status: 0 when
the snippet ran to the end, 1 when it failed (exception, limit, timeout), 2 on bad input (a missing file, no code
block) or when the sandbox cannot isolate the snippet here. `add_parser` is wired into `keye.cli`; the module
also runs on its own: ``python -m keye.tools.cli tools run ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_parser", "main", "run_command"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``tools`` (with subcommand ``run``) to `subparsers`; the handler is set as the ``func`` default."""
    tools = subparsers.add_parser(
        "tools", help="Thyme-style image tools: run model-written code in a sandbox"
    )
    sub = tools.add_subparsers(dest="tools_command", metavar="COMMAND", required=True)
    run = sub.add_parser(
        "run",
        help="run one Python snippet on images in the sandbox",
        description="Run one Python snippet in the isolated sandbox. Inside, the inputs are the globals "
        "image_path (the first image) and image_paths (all); PNG/JPEG files the snippet saves in its working "
        "directory are copied to --out.",
    )
    run.add_argument(
        "--code", required=True, metavar="FILE", help="Python file, or a model turn with a <code> block"
    )
    run.add_argument(
        "--image", required=True, action="append", metavar="IMG", help="input image (repeatable)"
    )
    run.add_argument(
        "--out", metavar="DIR", help="folder for the output images (default: a new temporary folder)"
    )
    run.add_argument("--json", action="store_true", help="print the result as one JSON object")
    run.add_argument("--timeout", type=float, metavar="S", help="wall-clock limit in seconds (default 10)")
    run.add_argument(
        "--allow-no-network-isolation",
        action="store_true",
        help="run even where bubblewrap is unusable: NO namespaces, rlimits and a scrubbed environment only",
    )
    run.add_argument("--no-repair", action="store_true", help="run the code exactly as written")
    run.set_defaults(func=run_command)
    return tools


def _fail(message: str) -> int:
    print(f"keye tools run: error: {message}", file=sys.stderr)
    return 2


def run_command(args: argparse.Namespace) -> int:
    """Handler of ``keye tools run``; returns the exit status."""
    from keye.errors import KeyeInputError
    from keye.tools.protocol import parse_turn
    from keye.tools.sandbox import SandboxConfig, SandboxUnavailableError, run_snippet

    code_path = Path(args.code)
    if not code_path.is_file():
        return _fail(f"{code_path}: no such file" if not code_path.exists() else f"{code_path}: not a file")
    for img in args.image:
        if not Path(img).is_file():
            return _fail(f"{img}: no such file" if not Path(img).exists() else f"{img}: not a file")
    try:
        text = code_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return _fail(f"{code_path}: cannot read: {exc}")
    code = text
    if "<code>" in text or text.lstrip().startswith(("```", "~~~")):
        turn = parse_turn(text)
        if turn.code is None:
            return _fail(f"{code_path}: no code block found ({'; '.join(turn.issues)})")
        code = turn.code

    overrides: dict = {
        "allow_no_network_isolation": args.allow_no_network_isolation,
        "repair": not args.no_repair,
    }
    if args.timeout is not None:
        overrides["timeout_s"] = args.timeout
    try:
        config = SandboxConfig(**overrides)
        result = run_snippet(code, args.image, config=config, out_dir=args.out)
    except KeyeInputError as exc:
        return _fail(str(exc))
    except SandboxUnavailableError as exc:
        return _fail(str(exc))

    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        head = "ok" if result.ok else f"FAILED: {result.error}"
        if result.killed_by:
            head += f" [killed_by={result.killed_by}]"
        print(f"{head}  ({result.elapsed_s:.2f} s; {result.isolation})")
        for r in result.repairs:
            print(f"repair: {r}")
        if result.stdout:
            print("--- stdout ---")
            print(result.stdout, end="" if result.stdout.endswith("\n") else "\n")
        if result.stderr and not result.ok:
            print("--- stderr ---")
            print(result.stderr, end="" if result.stderr.endswith("\n") else "\n")
        for path in result.images:
            print(f"image: {path}")
        for w in result.warnings:
            print(f"warning: {w}")
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keye")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
