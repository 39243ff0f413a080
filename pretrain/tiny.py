"""Train keye-tiny end to end on 2 CPU cores and write its shipped weights: ``python -m keye.pretrain.tiny``.

    data      synthetic videos (seed 1000) and images (seed 1001), 112x112, 4 s at 8 fps, at most 2 shapes per scene,
              no on-screen text, large objects (`TINY_DATA`), every question of each: manifests of captions, open answers,
              Video-MME-style multiple choice (answered as `mc_answer`: the answer, then the letter), all of a
              medium's questions as one multi-turn chat, and text-only multiple choice; 10,000 more images (seed 1002)
              for Stage 0
    stage 0   configs/pretrain/stage0{,_motion}_tiny.yaml (keye.pretrain.labels): the vision tower learns the generator's labels per vision token and the projector
              SmolLM2's embeddings of those words and of the token's place (no LLM); first on the 10,000 images,
              then on the videos and images above; last the projector alone, with its temporal branch, learns to
              add the word of the way a frame's scene moves (and drops the place); it is also Stage 1's projector
              alignment
    stage 2-3 configs/pretrain/stage{2a,2,3}_tiny.yaml through the pretraining recipe (each resumable): 2a images
              first (a curriculum), then the multi-task mix, then annealing
    stage 4-5 keye-tiny v2, the generator's defaults (`V2_DATA`: up to four smaller shapes, on-screen text; data under
              ``<data>/v2``): stage4{,_motion}_tiny.yaml as Stage 0 again from Stage 0's tower, tokens on the text
              also learning its word and background tokens their frame's count word, the first regime's media
              trained on too; stage5_tiny.yaml a fresh LoRA on the v2 mix with a share of the first regime
    asset     the stages' delta files composed into one (vision tower, projector, new token rows, LoRA factors: no
              SmolLM2 weight) -> keye/assets/keye-tiny.safetensors (``--asset`` elsewhere)
    eval      `evaluate_open`: open-ended accuracy per question type on a seed never trained on, at keye-tiny's first
              regime or the generator's defaults (``--eval-regime``); the multiple-choice score comes from the
              harness: ``keye eval synthetic --seed 7 --n 1000`` (add ``--max-objects 2 --text-prob 0
              --object-scale 0.3 0.42`` for the first regime)

Interrupted? Run the same command again: finished stages are skipped, the running one resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections import defaultdict
from pathlib import Path

import torch

__all__ = ["build_asset", "evaluate_open", "main", "prepare_data"]

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
STAGES = [
    "stage0_tiny",
    "stage0_motion_tiny",
    "stage2a_tiny",
    "stage2_tiny",
    "stage3_tiny",
    "stage4_tiny",
    "stage4_motion_tiny",
    "stage5_tiny",
]  # Stage 1 (projector alignment) is part of Stage 0 here; 4-5: the generator's defaults (keye-tiny v2)
TRAIN_SEEDS = {"video": 1000, "image": 1001, "stage0": 1002}
V2_SEEDS = {"video": 1003, "image": 1004, "stage0": 1005}
# keye-tiny's regime of the generator (its training data and the held-out questions it is measured on): at most two
# shapes per scene, 1-3 scenes, no on-screen text, objects 0.3-0.42 of the 112-pixel frame (34-47 px, more than one
# 28x28 merged token; at the default 0.16-0.24 one token holds a whole object). Larger objects alone did not teach the
# tower shapes (Stage 0's word_shape 30 -> 34%); Stage 0's own 10,000 images did (87%, keye.pretrain.labels).
# `keye eval synthetic --max-objects 2 --text-prob 0 --object-scale 0.3 0.42` asks the same.
TINY_DATA = {"max_objects": 2, "text_prob": 0.0, "object_scale": (0.3, 0.42)}
# keye-tiny v2 (stages 4-5, under ``<data>/v2``): the generator's defaults, as `keye eval synthetic` and the demo's
# examples draw them: up to four shapes of 0.16-0.24 of the frame (one 28x28 merged token each at 112x112), on-screen
# text in half the scenes.
V2_DATA = {"max_objects": 4, "text_prob": 0.5, "object_scale": None}
# The Video-MME prompt, as the harness builds it (keye.eval.videomme; recipes do not import the harness).
MC_INSTRUCTION = (
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter (A, B, C, or D) of the correct option."
)
MC_CUE = "The best answer is:"


def mc_answer(qa) -> str:
    """keye-tiny's multiple-choice answer: the answer first, then its letter ("purple, so the answer is D.").
    SmolLM2-135M does not learn to emit the letter directly: 60 steps of text-only multiple choice (the answer written
    in the prompt) stayed at chance (31%, always one letter), while answer-first reached 77% with the letter matching
    the named option 98% of the time. The harness reads the letter ("the answer is D")."""
    return f"{qa.answer}, so the answer is {qa.answer_letter}."


def _chat(media: dict | None, user: str, answer: str, meta: dict) -> dict:
    content = [media, {"type": "text", "text": user}] if media else user
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "meta": meta,
    }


def _multi_turn(media: dict, sample, rng: random.Random) -> dict:
    """All of a medium's questions as one chat (each turn open-ended or multiple choice at random): the frames are
    encoded once for several trained answers."""
    qas = list(sample.questions)
    rng.shuffle(qas)
    messages: list[dict] = []
    for i, qa in enumerate(qas):
        if rng.random() < 0.5:
            user, answer = qa.question, qa.answer
        else:
            user, answer = "\n".join([MC_INSTRUCTION, qa.question, *qa.options, MC_CUE]), mc_answer(qa)
        content = [media, {"type": "text", "text": user}] if i == 0 else user
        messages += [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
    return {"messages": messages, "meta": {"qtype": "multi"}}


def _write_regime(
    root: Path, seeds: dict, scene: dict, n_video: int, n_image: int, n_stage0: int, workers: int
):
    """One regime's media (``scene``: the generator's difficulty) and manifests under ``root``."""
    from keye.synthetic import generate_dataset, load_samples

    # before the DONE check: data written before Stage 0 had images of its own gets them too
    if n_stage0 and not (root / "stage0" / "image" / "samples.jsonl").exists():
        generate_dataset(
            root / "stage0" / "image", seed=seeds["stage0"], n=n_stage0, kinds=("image",), size=(112, 112),
            workers=workers, **scene,
        )  # fmt: skip
    if (root / "DONE").exists():
        return
    for kind, n in (("video", n_video), ("image", n_image)):
        if not (root / kind / "samples.jsonl").exists():
            generate_dataset(
                root / kind, seed=seeds[kind], n=n, kinds=(kind,), size=(112, 112), fps=8, duration=4.0,
                per_sample="all", workers=workers, **scene,
            )  # fmt: skip
    for kind in ("video", "image"):
        samples = load_samples(root / kind / "samples.jsonl")
        out = defaultdict(list)
        rng = random.Random(seeds[kind])
        for s in samples:
            media = {"type": kind, kind: str(Path(s.media).resolve().relative_to(root.resolve()))}
            out["caption"].append(_chat(media, f"Describe the {kind}.", s.caption, {"qtype": "caption"}))
            out["multi"].append(_multi_turn(media, s, rng))
            for qa in s.questions:
                meta = {"qtype": qa.qtype, "answer": qa.answer}
                out["open"].append(_chat(media, qa.question, qa.answer, meta))
                mc = "\n".join([MC_INSTRUCTION, qa.question, *qa.options, MC_CUE])
                out["mc"].append(_chat(media, mc, mc_answer(qa), meta))
                # the answer format without vision: the answer is in a written description
                if kind == "video":
                    text = f"The video: {s.caption}\n{mc}"
                    out["text_mc"].append(_chat(None, text, mc_answer(qa), meta))
        for name, lines in out.items():
            path = root / (f"{name}_{kind}.jsonl" if name != "text_mc" else "text_mc.jsonl")
            path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "DONE").write_text("ok\n")


def prepare_data(root: Path, n_video: int, n_image: int, workers: int = 2, n_stage0: int = 10_000) -> Path:
    """Generate the media and write the manifests under ``root`` (skipped when already there), and Stage 0's own
    ``n_stage0`` still images under ``root/stage0`` (labels only, no manifest is trained on); the same for keye-tiny
    v2's regime (`V2_DATA`, seeds `V2_SEEDS`) under ``root/v2`` (``n_stage0 * 0.6`` still images)."""
    root = Path(root)
    _write_regime(root, TRAIN_SEEDS, TINY_DATA, n_video, n_image, n_stage0, workers)
    _write_regime(root / "v2", V2_SEEDS, V2_DATA, n_video, n_image, int(n_stage0 * 0.6), workers)
    return root


def stage_output(stage: str, overrides: list[str]) -> Path:
    """The output folder of ``configs/pretrain/<stage>.yaml`` (with ``overrides``)."""
    from keye.training import load_config
    from keye.training.config import recipe_config_class

    path = CONFIGS / f"{stage}.yaml"
    return Path(load_config(path, overrides, cls=recipe_config_class(path)).output_dir)


def run_stages(stages: list[str], overrides: list[str]) -> None:
    from keye.pretrain.recipe import run

    for stage in stages:
        out = stage_output(stage, overrides)
        if (out / "final" / "weights.safetensors").exists():
            logger.info("%s: already trained (%s/final)", stage, out)
            continue
        t0 = time.perf_counter()
        run(CONFIGS / f"{stage}.yaml", overrides, resume=True)
        logger.info("%s: %.1f min", stage, (time.perf_counter() - t0) / 60)


def build_asset(stage_dirs: list[Path], out: Path) -> Path:
    """Compose the stages' delta files into the one file keye-tiny ships, in fp16 (half of fp32's size; applied to
    the fp32 model, its answers matched the fp32 file's on the held-out questions compared: README)."""
    from safetensors.torch import save_file

    from keye.deltas import compose_deltas, read_tensors

    delta = compose_deltas([read_tensors(d / "final") for d in stage_dirs])
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in delta.items()}, str(out))
    logger.info("%s: %d tensors, %.1f MB", out, len(delta), out.stat().st_size / 1e6)
    return out


def evaluate_open(
    model,
    processor,
    *,
    seed: int,
    n: int,
    media_dir: Path,
    qtypes: tuple[str, ...] | None = None,
    scene: dict | None = None,
) -> dict:
    """Open-ended accuracy: the question alone, a short greedy answer, correct when it names the true answer and
    no other option. Questions of videos ``syn-video-<seed>-<i>`` in order (as the synthetic benchmark takes them),
    drawn at ``scene`` (the generator's difficulty; default `TINY_DATA`, keye-tiny's own regime)."""
    from tqdm.auto import tqdm

    from keye.synthetic import make_video_sample

    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    asked, index = 0, 0
    model.eval()
    bar = tqdm(total=n, desc="open-ended", unit="q")
    while asked < n:
        s = make_video_sample(
            media_dir, seed, index=index, size=(112, 112), fps=8, duration=4.0, **(scene or TINY_DATA)
        )
        index += 1
        video = processor.load_video(s.media)  # the model's own frame settings, as the harness uses
        for qa in s.questions:
            if asked >= n:
                break
            asked += 1
            if qtypes is not None and qa.qtype not in qtypes:
                continue
            msgs = [
                {
                    "role": "user",
                    "content": [{"type": "video", "video": video}, {"type": "text", "text": qa.question}],
                }
            ]
            inputs = processor(msgs)
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            ok = qa.is_correct(processor.decode(out[0, inputs["input_ids"].shape[1] :]))
            per[qa.qtype][0] += int(ok)
            per[qa.qtype][1] += 1
            bar.update()
    bar.close()
    result = {k: {"correct": c, "n": t, "acc": 100.0 * c / t} for k, (c, t) in sorted(per.items())}
    c = sum(v[0] for v in per.values())
    t = sum(v[1] for v in per.values())
    result["overall"] = {"correct": c, "n": t, "acc": 100.0 * c / max(t, 1)}
    return result


def load_with_asset(asset: Path | None):
    """keye-tiny as `load_pretrained` builds it without an asset, plus ``asset`` applied (None: untrained)."""
    from keye.deltas import apply_delta, read_tensors
    from keye.modeling import KeyeForConditionalGeneration
    from keye.pretrained import keye_tiny_base
    from keye.processing import KeyeProcessor

    folder = keye_tiny_base()
    model = KeyeForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa"
    )
    if asset is not None:
        apply_delta(model, read_tensors(asset))
    return model.eval(), KeyeProcessor.from_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keye.pretrain.tiny", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data", type=Path, default=Path("runs/keye-tiny/data"))
    parser.add_argument("--n-video", type=int, default=2400)
    parser.add_argument("--n-image", type=int, default=1200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--stages", nargs="+", default=STAGES, help="the stages to run, in order; the asset composes them"
    )
    parser.add_argument(
        "--asset",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "keye" / "assets" / "keye-tiny.safetensors",
    )
    parser.add_argument("--eval-seed", type=int, default=7, help="a seed never used in training")
    parser.add_argument("--eval-n", type=int, default=0, help="open-ended questions to score (0: skip)")
    parser.add_argument("--eval-only", action="store_true", help="skip data and training; only evaluate")
    parser.add_argument(
        "--eval-models", nargs="+", choices=("untrained", "trained"), default=["untrained", "trained"]
    )
    parser.add_argument(
        "--eval-regime",
        choices=("tiny", "default"),
        default="tiny",
        help="the questions' difficulty: keye-tiny v1's regime, or the generator's defaults (keye eval synthetic)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every stage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    if not args.eval_only:
        prepare_data(args.data, args.n_video, args.n_image, args.workers)
        logger.info("data ready: %.1f min", (time.perf_counter() - t0) / 60)
        run_stages(args.stages, args.overrides)
        dirs = [stage_output(s, args.overrides) for s in args.stages]  # v1 alone: stages 0-3
        if all((d / "final" / "weights.safetensors").exists() for d in dirs):
            build_asset(dirs, args.asset)
        logger.info("total: %.1f min", (time.perf_counter() - t0) / 60)
    if args.eval_n:
        models = [("untrained", None)] + ([("trained", args.asset)] if args.asset.exists() else [])
        for name, asset in (m for m in models if m[0] in args.eval_models):
            model, processor = load_with_asset(asset)
            scene = TINY_DATA if args.eval_regime == "tiny" else V2_DATA
            media = args.data.parent / f"eval-{args.eval_regime}"
            res = evaluate_open(
                model, processor, seed=args.eval_seed, n=args.eval_n, media_dir=media, scene=scene
            )
            print(name, json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
