"""Vision tokens and keye-tiny prefill latency: uniform vs Slow-Fast vs +DynTok vs +Clapper, with a breakdown.

For 32, 64 and 128 sampled frames of one generated 64 s video, side by side in this run:
  - uniform sampling (every frame slow), Slow-Fast, Slow-Fast + DynTok, Slow-Fast + Clapper: vision tokens, the whole
    prompt's tokens (frame markers and timestamps included), and prefill latency (vision tower + compression + LLM
    prefill of the whole prompt, keye-tiny);
  - where the time goes: decoding + planning the video and the processor (patchify, token ids) come before the
    prefill and are shared by the three Slow-Fast modes; the vision tower (+ projector) alone; the LLM prefill alone
    (given the vision tokens); "compress" is the rest of the prefill (DynTok grouping, TimePerceiver, prompt rewrite).
keye-tiny has no trained Clapper: "+clapper" uses the untrained stand-in (pooled tokens, the count a trained one gives,
no perceiver layers); the time a trained TimePerceiver of the paper's size takes on the same tokens is printed beside.

Goals (issue 4): DynTok keeps <= 45% of tokens; Clapper <= 61 tokens per frame (at Keye-VL-1.5's frame sizes, which
`bench_encoders` counts; keye-tiny's fast frames hold fewer tokens than Clapper's 48 queries, so it saves less here);
prefill at 64 frames compressed <= 1/2 of uncompressed, printed against both Slow-Fast and uniform sampling.

Timings are the minimum of ``repeat`` rounds, the modes interleaved within each round: on a shared machine a burst
of load elsewhere then hits every mode alike instead of one, and the least disturbed round is the cost of the code.

Run: ``python -m bench.bench_compression`` (part of ``make bench``).
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

MODES = (("uniform", False, "none"), ("slowfast", True, "none"), ("+dyntok", True, "dyntok"),
         ("+clapper", True, "clapper"))  # fmt: skip


def _timed(times: list[float], fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its wall time appended to ``times``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    times.append(time.perf_counter() - t0)
    return out


def main(repeat: int = 3, frame_counts: tuple[int, ...] = (32, 64, 128)) -> dict:
    from keye import load_pretrained
    from keye.compression import compress_inputs
    from keye.encoders.clapper import ClapperConfig, TimePerceiver
    from keye.synthetic import make_demo_video

    video = Path(tempfile.mkdtemp(prefix="keye-bench-")) / "bench_64s.mp4"
    make_demo_video(video, seed=2, duration=64.0, size=(360, 640), fps=8)
    model, processor = load_pretrained("keye-tiny")
    perceiver = TimePerceiver(ClapperConfig(llm_width=model.config.text.hidden_size)).eval()
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(
        f"{'frames':>6} {'mode':9} {'tokens':>6} {'tok/frame':>9} {'prompt':>6} {'decode':>7} {'process':>7} "
        f"{'vision':>7} {'compress':>8} {'LLM':>7} {'prefill':>8}  (ms)"
    )
    results = {}
    for n in frame_counts:
        # keye-tiny's context is 8k tokens: a budget of 48 tokens per frame keeps every mode inside it
        settings = dict(fps=n / 64.0, max_frames=n, token_budget=48 * n, min_tokens=16, max_tokens=64)
        times: dict = defaultdict(list)  # (mode or Slow-Fast on/off, stage) -> seconds of each round
        prompts = {}  # Slow-Fast on or off -> processed prompt; DynTok and Clapper compress the Slow-Fast one
        for slowfast in (False, True):
            loaded = _timed(
                times[slowfast, "decode"], processor.load_video, str(video), enabled=slowfast, **settings
            )
            msgs = [{"role": "user", "content": [{"type": "video", "video": loaded},
                                                 {"type": "text", "text": "What happens?"}]}]  # fmt: skip
            prompts[slowfast] = _timed(times[slowfast, "process"], processor, msgs)
        row, stats = {}, {}
        with torch.inference_mode():
            for _ in range(repeat):
                for mode, slowfast, compress in MODES:
                    inputs = prompts[slowfast]
                    pixels, grids = inputs["pixel_values_videos"], inputs["video_grid_thw"]
                    refs = inputs.get("video_reference_index")
                    if compress == "none":  # the vision tower alone (the same for the compressed modes)
                        embeds = _timed(times[slowfast, "vision"], model.encode_vision, pixels, grids, refs)

                    def prefill(inputs=inputs, compress=compress):
                        x, tokens = compress_inputs(model, inputs, compress)
                        model(**x, use_cache=True, logits_to_keep=1)
                        return x, tokens

                    x, stats[mode] = _timed(times[mode, "prefill"], prefill)
                    if compress == "none":  # the LLM alone, given the vision tokens
                        x = {k: v for k, v in x.items() if k not in ("pixel_values_videos", "video_grid_thw")}
                        x["video_embeds"] = embeds
                    _timed(times[mode, "llm"], model, **x, use_cache=True, logits_to_keep=1)
                    row.setdefault(mode, {})["prompt"] = int(x["input_ids"].shape[1])
            # what a trained TimePerceiver of the paper's size would add (the untrained stand-in has no layers)
            tokens = model.encode_vision(
                prompts[True]["pixel_values_videos"],
                prompts[True]["video_grid_thw"],
                prompts[True].get("video_reference_index"),
            )
            sizes = [(h // 2, w // 2) for _, h, w in prompts[True]["video_grid_thw"].tolist()]
            frames = list(tokens.split([h * w for h, w in sizes]))
            for _ in range(repeat):
                _timed(times["perceiver"], perceiver, frames, sizes)
        for mode, slowfast, _ in MODES:
            r = row[mode]
            r.update(frames=len(prompts[slowfast].videos[0].frames), tokens=stats[mode])
            for key in ("decode", "process", "vision"):
                r[f"{key}_s"] = min(times[slowfast, key])
            r["llm_s"], r["prefill_s"] = min(times[mode, "llm"]), min(times[mode, "prefill"])
            r["compress_s"] = max(r["prefill_s"] - r["vision_s"] - r["llm_s"], 0.0)
            ms = [r[f"{k}_s"] * 1e3 for k in ("decode", "process", "vision", "compress", "llm", "prefill")]
            print(
                f"{r['frames']:6d} {mode:9} {r['tokens']:6d} {r['tokens'] / r['frames']:9.1f} {r['prompt']:6d} "
                "{:7.0f} {:7.0f} {:7.0f} {:8.0f} {:7.0f} {:8.0f}".format(*ms)
            )
        row["perceiver_s"] = min(times["perceiver"])
        row["dyntok_kept"] = row["+dyntok"]["tokens"] / row["slowfast"]["tokens"]
        for c in ("+dyntok", "+clapper"):
            for base in ("slowfast", "uniform"):
                row[f"prefill_{c[1:]}_vs_{base}"] = row[c]["prefill_s"] / row[base]["prefill_s"]
        print(
            f"{'':6} DynTok keeps {row['dyntok_kept']:.0%} of Slow-Fast's tokens (goal <= 45%); Clapper "
            f"{row['+clapper']['tokens'] / row['+clapper']['frames']:.1f} tokens/frame here (goal <= 61); a "
            f"trained TimePerceiver of the paper's size would add {row['perceiver_s'] * 1e3:.0f} ms"
        )
        print(
            f"{'':6} prefill vs Slow-Fast / vs uniform (goal <= 0.5 at 64 frames): DynTok "
            f"{row['prefill_dyntok_vs_slowfast']:.2f} / {row['prefill_dyntok_vs_uniform']:.2f}, Clapper "
            f"{row['prefill_clapper_vs_slowfast']:.2f} / {row['prefill_clapper_vs_uniform']:.2f}"
        )
        results[n] = row
    return results


if __name__ == "__main__":
    main()
