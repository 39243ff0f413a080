"""The ``keye`` command line: the one place that wires every layer together.

Each subcommand imports its layer lazily inside its handler, so ``keye --help`` stays fast. Bad input (a missing or
corrupt file, a prompt longer than the context) prints one line naming the input and exits with status 2; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys


def _check_media(videos: list[str], images: list[str]) -> None:
    """Fail fast, before the model loads: every file exists and opens as what it claims to be."""
    from keye.encoders.image import load_image
    from keye.encoders.video import index

    for v in videos:
        index(v)
    for i in images:
        load_image(i)


# ------------------------------------------------------------------------------------------------ chat
def _chat(args) -> int:
    _check_media(args.video, args.image)
    from keye import load_pretrained
    from keye.chat import ChatSession
    from keye.encoders.slowfast import SlowFastConfig
    from keye.flags import given

    model, processor = load_pretrained(args.model)
    overrides = given(args, SlowFastConfig)
    if args.tools:
        return _chat_tools(args, model, processor)
    session = ChatSession(model, processor, think=args.think, compress=args.compress, **overrides)
    gen = {"max_new_tokens": args.max_new_tokens}

    replies = []

    def turn(text: str, images=(), videos=()) -> None:
        if args.stream:
            for piece in session.stream(text, images=images, videos=videos, **gen):
                print(piece, end="", flush=True)
            print()
        else:
            print(session.ask(text, images=images, videos=videos, **gen).text)
        replies.append(session.last_reply)
        if args.stats:
            print(f"[{replies[-1].stats()}]", file=sys.stderr)

    if args.prompt is not None:
        turn(args.prompt, args.image, args.video)
        return 0
    media = {"images": args.image, "videos": args.video}
    print(f"keye chat with {args.model}; empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        turn(text, **media)
        media = {"images": (), "videos": ()}  # media go with the first turn; later turns reuse the KV cache
    if replies:
        print(f"[{_session_stats(replies)}]", file=sys.stderr)
    return 0


def _session_stats(replies) -> str:
    """The end-of-session line of ``keye chat``: turns, median time to first token, decoding speed, tokens."""
    from statistics import median

    ttfts = [r.ttft_s for r in replies if r.ttft_s is not None]
    decode_tokens = sum(r.num_tokens - 1 for r in replies if r.tokens_per_s is not None)
    decode_s = sum(r.seconds - r.ttft_s for r in replies if r.tokens_per_s is not None)
    parts = [f"{len(replies)} turns"]
    if ttfts:
        parts.append(f"median first token after {median(ttfts):.2f} s")
    if decode_s > 0:
        parts.append(f"{decode_tokens / decode_s:.1f} tokens/s")
    last = replies[-1]
    parts.append(f"{sum(r.num_tokens for r in replies)} new tokens")
    parts.append(f"conversation {last.prompt_tokens + last.num_tokens} tokens ({last.vision_tokens} vision)")
    return " · ".join(parts)


def _chat_tools(args, model, processor) -> int:
    """Thyme loop: the model may run Python on the images in the sandbox before answering."""
    from keye.chat import ChatSession
    from keye.tools.loop import TOOL_SYSTEM_PROMPT, run_tool_loop

    if args.prompt is None or not args.image:
        from keye.errors import KeyeInputError

        raise KeyeInputError("--tools", "needs --prompt and at least one --image")
    session = ChatSession(model, processor, think=args.think, system=TOOL_SYSTEM_PROMPT)

    def show(rnd) -> None:
        if args.json:
            return
        print(rnd.text)
        if rnd.result is not None:
            r = rnd.result
            status = "ok" if r.ok else f"failed ({r.killed_by or r.error})"
            print(
                f"[sandbox {status} in {r.elapsed_s:.2f} s; repairs: {r.repairs or 'none'}; images: {r.images}]"
            )
            if r.stdout:
                print(r.stdout.rstrip())

    trace = run_tool_loop(
        session,
        args.prompt,
        args.image,
        max_rounds=args.max_rounds,
        max_new_tokens=args.max_new_tokens,
        on_round=show,
    )
    if args.json:
        print(json.dumps(trace.to_dict()))
    else:
        print(f"answer: {trace.answer} (stopped: {trace.stopped})")
    return 0


# ------------------------------------------------------------------------------------------------ frames
_FRAME_FLAG_HELP = {
    "fps": "sampling rate (effective: min(fps, native fps))",
    "max_frames": "cap on sampled frames",
    "token_budget": "vision tokens for the whole video",
    "enabled": "Slow-Fast selection (--no-slowfast: every frame slow, plain uniform sampling)",
}


def _frames(args) -> int:
    from dataclasses import asdict

    from keye.encoders.slowfast import SlowFastConfig, plan_video
    from keye.flags import given

    overrides = given(args, SlowFastConfig)
    if args.model is None:  # Keye-VL-1.5's own settings, as keye-vl-utils applies them
        cfg, source = SlowFastConfig.official(**overrides), "official"
    else:
        from keye.settings import read_processor_settings

        cfg, source = read_processor_settings(args.model).video_config(**overrides), args.model
    keep = bool(args.plot) or args.compress != "none"  # the plan alone needs no frame kept
    plan, frames = plan_video(args.video, cfg, keep_frames=keep)
    if args.compress != "none":
        from keye import load_pretrained
        from keye.compression import compressed_video_tokens
        from keye.processing import VideoInput

        model, processor = load_pretrained(args.model or "keye-tiny")
        video = VideoInput(frames, [f.time for f in plan.frames], [f.kind for f in plan.frames], plan)
        plan.compress = args.compress
        plan.tokens_after_compression = compressed_video_tokens(model, processor, video, args.compress)
    report = {**plan.to_dict(), "settings": {"source": source, **asdict(cfg)}}
    if args.plot:
        from keye.encoders.filmstrip import save_filmstrip

        save_filmstrip(plan, frames, args.plot)
    if args.json:
        print(json.dumps(report))
        return 0
    kinds = [f["kind"] for f in report["frames"]]
    official = "Keye-VL-1.5's official settings (as keye-vl-utils 1.5.2)"
    print(f"settings: {official if source == 'official' else f'{source} (its processor)'}")
    print(
        f"{report['video']}: {report['duration']:.1f} s at {report['native_fps']:.2f} fps, sampled at "
        f"{report['sample_fps']:.2f} fps -> {len(kinds)} frames ({kinds.count('slow')} slow, {kinds.count('fast')} fast)"
    )
    print(
        f"tokens per frame: slow {report['slow_tokens_per_frame']}, fast {report['fast_tokens_per_frame']}; "
        f"total {report['total_tokens']} of budget {report['budget']}; after {report['compress']}: "
        f"{report['tokens_after_compression']}"
    )
    for f in report["frames"]:
        print(f"  {f['index']:6d}  {f['time']:8.2f} s  {f['kind']:4s}  {f['tokens']:4d} tokens")
    if args.plot:
        print(f"film strip: {args.plot}")
    return 0


# ------------------------------------------------------------------------------------------------ info
def _info(args) -> int:
    import torch
    import transformers
    from transformers.utils.import_utils import is_flash_attn_2_available

    import keye
    from keye.pretrained import _tiny_cache_dir, keye_home, smollm2_gguf

    try:
        import decord  # noqa: F401

        decoder = "PyAV (decord installed: backend='decord')"
    except ImportError:
        decoder = "PyAV (decord not installed)"
    cuda = torch.cuda.is_available()
    try:
        gguf = str(smollm2_gguf())
    except FileNotFoundError as e:
        gguf = f"missing: {e}"
    info = {
        "keye": keye.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)",
        "attention": "flash_attention_2" if cuda and is_flash_attn_2_available() else "sdpa",
        "video_decoder": decoder,
        "default_model": "keye-tiny",
        "keye_tiny_cache": str(_tiny_cache_dir()),
        "keye_tiny_built": (_tiny_cache_dir() / "config.json").exists(),
        "keye_home": f"{keye_home()} ({_size_mb(keye_home()):.0f} MB; set KEYE_HOME to move it)",
        "smollm2_gguf": gguf,
    }
    try:
        from keye.tools.sandbox import isolation_report

        info["sandbox"] = isolation_report()
    except ImportError:
        info["sandbox"] = "unavailable"
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for k, v in info.items():
            print(f"{k:18s} {v}")
    return 0


def _size_mb(folder) -> float:
    """Bytes under ``folder`` (0 if it does not exist), in MB."""
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6


# ------------------------------------------------------------------------------------------------ convert
def _convert(args) -> int:
    from keye.convert import from_keye, to_keye

    report = from_keye(args.from_keye, args.out) if args.from_keye else to_keye(args.to_keye, args.out)
    print(f"wrote {report['tensors']} tensors to {args.out}")
    if report["dropped"]:
        print(f"dropped {len(report['dropped'])} unused tensors: {', '.join(report['dropped'][:4])} ...")
    return 0


def layer_main(add_parser, prog: str, argv: list[str] | None = None) -> int:
    """``python -m keye.<layer>.cli ...``: one layer's subcommands as a module, which torchrun and
    ``accelerate launch -m`` need; INFO logging, bad input as one line and exit status 2."""
    from keye.errors import KeyeInputError

    parser = argparse.ArgumentParser(prog=prog)
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyeInputError as e:
        print(f"keye: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    from keye.encoders import COMPRESSIONS  # light: no torch for `keye --help`
    from keye.encoders.slowfast import SlowFastConfig
    from keye.flags import add_flags

    parser = argparse.ArgumentParser(prog="keye", description="Keye-VL-style video-language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="ask questions about videos and images")
    p.add_argument("--model", default="keye-tiny", help="model name or folder (default: keye-tiny)")
    p.add_argument("--video", action="append", default=[], help="video file (repeatable)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--prompt", help="ask once and exit; without it, an interactive multi-turn session")
    think = p.add_mutually_exclusive_group()
    think.add_argument(
        "--think", dest="think", action="store_true", default=None, help="reasoning mode (/think)"
    )
    think.add_argument("--no-think", dest="think", action="store_false", help="answer directly (/no_think)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--stream", action=argparse.BooleanOptionalAction, default=True, help="stream tokens as generated"
    )
    add_flags(
        p,
        SlowFastConfig,
        only=("fps", "max_frames", "token_budget"),
        help=_FRAME_FLAG_HELP,
        show_defaults=False,
    )
    p.add_argument(
        "--compress",
        choices=COMPRESSIONS,
        default="none",
        help="video token compression (clapper: the model's TimePerceiver, or an untrained one that pools)",
    )
    p.add_argument("--tools", action="store_true", help="Thyme mode: the model may run Python on the images")
    p.add_argument(
        "--max-rounds", type=int, default=4, help="code rounds before an answer is demanded (--tools)"
    )
    p.add_argument("--json", action="store_true", help="with --tools: print the whole trace as JSON")
    p.add_argument(
        "--stats",
        action="store_true",
        help="after each answer, print time to first token, tokens/s and prompt/vision token counts to stderr "
        "(an interactive session prints totals at its end anyway)",
    )
    p.set_defaults(func=_chat)

    p = sub.add_parser("frames", help="show which frames Slow-Fast selection samples, and their token costs")
    p.add_argument("video")
    p.add_argument(
        "--model",
        help="plan as this model's processor does (keye-tiny or a model folder); default: Keye-VL-1.5's official "
        "settings, as keye-vl-utils. With --compress, the model that compresses (default keye-tiny)",
    )
    # every Slow-Fast setting as a flag (keye.encoders.slowfast.SlowFastConfig); the ones given replace the settings
    # in force (the official ones, or --model's)
    add_flags(p, SlowFastConfig, rename={"enabled": "slowfast"}, help=_FRAME_FLAG_HELP, show_defaults=False)
    p.add_argument(
        "--compress",
        choices=COMPRESSIONS,
        default="none",
        help="report the video's tokens after this compression (runs the model's vision tower; no prompt)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="OUT.png", help="draw a film strip with slow/fast marks and timestamps")
    p.set_defaults(func=_frames)

    p = sub.add_parser("info", help="versions, device, attention backend, default model location")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info)

    p = sub.add_parser("convert", help="convert to or from the official Keye-VL-1.5 checkpoint layout")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-keye", metavar="DIR", help="official Keye-VL-1.5 folder -> keye folder")
    src.add_argument("--to-keye", metavar="DIR", help="keye folder -> official Keye-VL-1.5 layout")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=_convert)

    from keye.demo.cli import add_parser as add_demo
    from keye.eval.cli import add_parser as add_eval
    from keye.posttrain.cli import add_parser as add_posttrain
    from keye.pretrain.cli import add_parser as add_pretrain
    from keye.serve.cli import add_parser as add_serve
    from keye.tools.cli import add_parser as add_tools

    add_tools(sub)
    add_eval(sub)
    add_pretrain(sub)
    add_posttrain(sub)
    add_demo(sub)
    add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if not args.debug:
        # Quiet libraries without importing them (transformers alone costs a second): their own messages are not
        # the one-line errors this CLI prints. transformers reads these variables when it loads.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        # FFmpeg's decoder chatter, which keye.encoders.video routes to these loggers
        logging.getLogger("libav").setLevel(logging.CRITICAL)
    try:
        return args.func(args) or 0
    except BrokenPipeError:  # `keye frames video.mp4 | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        from keye.errors import KeyeInputError

        if args.debug:
            raise
        if isinstance(e, KeyeInputError):
            print(f"keye: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, (FileNotFoundError, NotADirectoryError)):
            print(f"keye: error: {e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
