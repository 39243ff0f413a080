"""``keye sft``, ``rl``, ``dpo``, ``merge-lora``, ``posttrain-data`` and ``posttrain-eval``: `add_parser` hangs them
under keye's CLI.

    keye posttrain-data --out runs/posttrain/data [--seed 0] [--n 64]      # synthetic SFT / RL / preference manifests
    keye sft --config configs/posttrain/sft-tiny.yaml [key.sub=value ...] [--resume]
    keye rl  --config configs/posttrain/gspo-tiny.yaml [...]
    keye dpo --config configs/posttrain/dpo-tiny.yaml [...]                 # mpo-tiny.yaml: dpo.loss: mpo
    keye merge-lora RUN/checkpoints/step-000100 --out DIR [--base MODEL]   # or RUN/final
    keye posttrain-eval --model DIR --manifest runs/posttrain/data/rl_heldout.jsonl [--no-think] [--n 100]
    keye posttrain-eval --model DIR --manifest runs/posttrain/data/thyme_heldout.jsonl --tools --verifier normalized

The module also runs on its own: ``python -m keye.posttrain.cli sft --config ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["add_parser", "main", "prepare_data"]


def _recipe(name: str):
    def run(args: argparse.Namespace) -> int:
        import importlib

        module = importlib.import_module(f"keye.posttrain.{name}")
        final = module.run(args.config, args.overrides, resume=args.resume)
        if final is not None:
            print(f"exported {final}")
        return 0

    return run


def _merge_lora(args: argparse.Namespace) -> int:
    from keye.posttrain.sft import merge_lora_checkpoint

    out = merge_lora_checkpoint(args.checkpoint, args.out, base=args.base)
    print(f"merged adapters -> {out}")
    return 0


def prepare_data(
    out: str,
    seed: int = 0,
    n: int = 64,
    size: int = 112,
    duration: float = 2.0,
    *,
    fps: float = 4,
    max_objects: int = 4,
    text_prob: float = 0.5,
    object_scale: list[float] | tuple[float, float] | None = None,
    rl_qtypes: list[str] | None = None,
    tool_n: int = 128,
    tool_sft_n: int = 600,
) -> dict:
    """Synthetic post-training data under ``out``: ``media/`` (videos and images with every question), SFT
    ``think.jsonl`` / ``no_think.jsonl``, RL ``rl_prompts.jsonl`` (multiple choice, with hints), ``rl_heldout.jsonl``
    (another seed), ``pairs.jsonl`` (preference pairs), and the Thyme tool-use task (`write_tool_task`: the colour of
    a small shape in a corner, a width in pixels, a tiny number; ``tool_n`` prompts, three quarters as many held out) as
    ``thyme_prompts.jsonl`` / ``thyme_heldout.jsonl`` and its tool-use SFT conversations
    (`write_tool_sft`, ``tool_sft_n`` of them, run in the sandbox; skipped with a warning without one) as
    ``thyme_sft/manifest.jsonl``.
    ``fps``/``max_objects``/
    ``text_prob``/``object_scale`` set the generator (keye-tiny was trained at 8 fps, 4 s, 2 objects, no text, objects
    0.3-0.42 of the frame); ``rl_qtypes`` keeps only those question types in the two RL manifests."""
    from pathlib import Path

    from keye.posttrain.dpo import write_preference_pairs
    from keye.posttrain.rl import write_rl_prompts
    from keye.posttrain.sft import write_thinking_mix
    from keye.posttrain.tooltask import write_tool_sft, write_tool_task
    from keye.synthetic import generate_dataset
    from keye.tools.sandbox import SandboxUnavailableError

    out = Path(out)
    common = dict(
        size=(size, size),
        fps=fps,
        duration=duration,
        max_objects=max_objects,
        text_prob=text_prob,
        object_scale=object_scale,
        per_sample="all",
        progress=False,
    )
    train = generate_dataset(out / "train", seed=seed, n=n, question_style="mixed", **common)
    mc = generate_dataset(out / "mc", seed=seed, n=n, question_style="mc", **common)
    held = generate_dataset(
        out / "heldout", seed=seed + 10_000, n=max(8, n // 4), question_style="mc", **common
    )
    paths = write_thinking_mix(train, out)
    paths["rl_prompts"] = write_rl_prompts(mc, out / "rl_prompts.jsonl", qtypes=rl_qtypes)
    paths["rl_heldout"] = write_rl_prompts(held, out / "rl_heldout.jsonl", qtypes=rl_qtypes)
    paths["pairs"] = write_preference_pairs(mc, out / "pairs.jsonl", seed=seed)
    thyme = write_tool_task(out / "thyme", n=tool_n, seed=seed, size=size)
    thyme_held = write_tool_task(
        out / "thyme_heldout", n=max(3, tool_n * 3 // 4), seed=seed + 10_000, size=size
    )
    paths["thyme_prompts"] = write_rl_prompts(thyme, out / "thyme_prompts.jsonl")
    paths["thyme_heldout"] = write_rl_prompts(thyme_held, out / "thyme_heldout.jsonl")
    try:
        paths["thyme_sft"] = write_tool_sft(out / "thyme_sft", n=tool_sft_n, seed=seed + 20_000, size=size)
    except SandboxUnavailableError as e:  # the traces hold real sandbox output; everything else is written
        logging.getLogger(__name__).warning("thyme_sft not written: %s", e)
    return paths


def _eval(args: argparse.Namespace) -> int:
    import json

    from keye import load_pretrained
    from keye.posttrain.rewards import make_verifier
    from keye.posttrain.rl import evaluate_accuracy

    model, processor = load_pretrained(args.model)
    overrides = {"max_frames": args.max_frames} if args.max_frames else {}
    if args.tools:
        return _eval_tools(args, model, processor, overrides)
    args.max_new_tokens = args.max_new_tokens or 8
    result = evaluate_accuracy(
        model,
        processor,
        args.manifest,
        make_verifier(args.verifier),
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        think=args.think,
        overrides=overrides,
    )
    print(json.dumps({"model": args.model, "manifest": args.manifest, "think": args.think, **result}))
    return 0


def _eval_tools(args: argparse.Namespace, model, processor, overrides: dict) -> int:
    """``--tools``: the tool loop (greedy, real sandbox) and the same questions without tools, side by side."""
    import json
    from pathlib import Path

    from keye.posttrain.prompts import evaluate_accuracy
    from keye.posttrain.rewards import make_verifier
    from keye.posttrain.thyme import evaluate_tools
    from keye.tools.sandbox import SandboxConfig

    verifier = make_verifier(args.verifier)
    with_tools = evaluate_tools(
        model, processor, args.manifest, verifier, n=args.n, max_rounds=args.max_rounds,
        max_new_tokens=args.max_new_tokens or 256, sandbox=SandboxConfig(), think=args.think, **overrides,
    )  # fmt: skip
    traces = with_tools.pop("traces")
    without = evaluate_accuracy(
        model, processor, args.manifest, verifier, n=args.n, max_new_tokens=16, think=args.think,
        overrides=overrides,
    )  # fmt: skip
    if args.traces:
        Path(args.traces).write_text("".join(json.dumps(t) + "\n" for t in traces))
    print(
        json.dumps({"model": args.model, "manifest": args.manifest, "tools": with_tools, "no_tools": without})
    )
    return 0


def _data(args: argparse.Namespace) -> int:
    paths = prepare_data(
        args.out,
        args.seed,
        args.n,
        args.size,
        args.duration,
        fps=args.fps,
        max_objects=args.max_objects,
        text_prob=args.text_prob,
        object_scale=args.object_scale,
        rl_qtypes=args.rl_qtypes,
        tool_n=args.tool_n,
        tool_sft_n=args.tool_sft_n,
    )
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sft``, ``rl``, ``dpo``, ``merge-lora``, ``posttrain-data`` and ``posttrain-eval``; each sets ``func(args) -> status``."""
    from keye.synthetic import add_object_scale_argument

    for name, module, help_ in (
        ("sft", "sft", "supervised fine-tuning (full or LoRA) from a YAML config"),
        ("rl", "rl", "GSPO reinforcement learning on verifiable image/video prompts"),
        ("dpo", "dpo", "preference alignment (DPO or MPO) on image/video pairs"),
    ):
        p = subparsers.add_parser(name, help=help_)
        p.add_argument("--config", required=True, help=f"configs/posttrain/<{name}>.yaml")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
        p.add_argument(
            "--resume", action="store_true", help="continue from the last checkpoint in output_dir"
        )
        p.set_defaults(func=_recipe(module))

    m = subparsers.add_parser("merge-lora", help="fold LoRA adapters into a plain model folder")
    m.add_argument(
        "checkpoint", metavar="ADAPTER_CKPT", help="checkpoints/step-N folder or an export (final/)"
    )
    m.add_argument("--out", required=True, metavar="DIR")
    m.add_argument("--base", help="base model (default: the run's model.path)")
    m.set_defaults(func=_merge_lora)

    e = subparsers.add_parser(
        "posttrain-eval", help="greedy accuracy on a prompt manifest (verifiable answers)"
    )
    e.add_argument("--model", default="keye-tiny")
    e.add_argument("--manifest", required=True, help="e.g. runs/posttrain/data/rl_heldout.jsonl")
    e.add_argument(
        "--verifier", default="choice", help="a registered verifier (choice, number, normalized, ...)"
    )
    e.add_argument("--n", type=int, default=100, help="first N lines")
    e.add_argument(
        "--max-new-tokens", type=int, help="per answer (default 8), per model turn with --tools (default 256)"
    )
    e.add_argument("--max-frames", type=int, default=8)
    e.add_argument(
        "--tools",
        action="store_true",
        help="answer through the Thyme tool loop (sandbox; --max-new-tokens per turn) and also without tools",
    )
    e.add_argument("--max-rounds", type=int, default=2, help="--tools: code rounds per conversation")
    e.add_argument("--traces", metavar="FILE", help="--tools: write every conversation as JSON lines")
    think = e.add_mutually_exclusive_group()
    think.add_argument("--think", dest="think", action="store_const", const=True, help="append /think")
    think.add_argument("--no-think", dest="think", action="store_const", const=False, help="/no_think")
    e.set_defaults(func=_eval, think=None)

    d = subparsers.add_parser("posttrain-data", help="write synthetic SFT / RL / preference manifests")
    d.add_argument("--out", default="runs/posttrain/data", metavar="DIR")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--n", type=int, default=64, help="videos and images (each with every question)")
    d.add_argument("--size", type=int, default=112, help="frame side in pixels")
    d.add_argument("--duration", type=float, default=2.0, help="video length in seconds")
    d.add_argument("--fps", type=float, default=4, help="video frame rate")
    d.add_argument("--max-objects", type=int, default=4, help="at most this many shapes per scene")
    d.add_argument("--text-prob", type=float, default=0.5, help="share of scenes with on-screen text")
    add_object_scale_argument(d)
    d.add_argument(
        "--rl-qtypes",
        nargs="+",
        metavar="QTYPE",
        help="RL manifests keep only these (colour, count, motion, ...)",
    )
    d.add_argument(
        "--tool-n", type=int, default=128, help="Thyme task prompts (three quarters as many held out)"
    )
    d.add_argument(
        "--tool-sft-n",
        type=int,
        default=600,
        help="tool-use SFT conversations (thyme_sft/; each runs the sandbox)",
    )
    d.set_defaults(func=_data)


def main(argv: list[str] | None = None) -> int:
    from keye.cli import layer_main

    return layer_main(add_parser, "python -m keye.posttrain.cli", argv)


if __name__ == "__main__":
    sys.exit(main())
