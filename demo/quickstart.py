"""`make demo` before the Gradio app exists: generate a sample video and ask keye-tiny about it, streaming.

Run as ``python -m keye.demo.quickstart [--out DIR] [--prompt TEXT]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keye.cli import main as keye_main
from keye.synthetic import make_demo_video


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="outputs/demo", help="where the sample video is written")
    parser.add_argument("--prompt", default="What happens in this video?")
    args = parser.parse_args(argv)
    video = Path(args.out) / "sample.mp4"
    sample = make_demo_video(video, seed=0, duration=10.0)
    print(f"sample video: {video} ({sample.caption})", file=sys.stderr)
    print(f"question: {args.prompt}", file=sys.stderr)
    return keye_main(["chat", "--video", str(video), "--prompt", args.prompt, "--max-new-tokens", "64"])


if __name__ == "__main__":
    sys.exit(main())
