"""Vision tokens and keye-tiny prefill latency: uniform vs Slow-Fast vs +DynTok (vs Clapper's token count).

For 32, 64 and 128 sampled frames of one generated 64 s video, side by side in this run:
  - uniform sampling (every frame slow), Slow-Fast, Slow-Fast + DynTok: vision tokens and prefill latency
    (vision tower + LLM prefill of the whole prompt, keye-tiny, median of ``repeat``);
  - Clapper: tokens per frame of its TimePerceiver (not yet used at inference, so no latency).
Goals (issue 4): DynTok keeps <= 45% of tokens; Clapper <= 61 tokens per frame; prefill at 64 frames compressed <= 1/2
of uncompressed.

Run: ``python -m bench.bench_compression`` (part of ``make bench``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch


def main(repeat: int = 3) -> dict:
    from keye import load_pretrained
    from keye.compression import compress_inputs
    from keye.encoders.clapper import ClapperConfig, clapper_tokens
    from keye.synthetic import make_demo_video

    video = Path(tempfile.mkdtemp(prefix="keye-bench-")) / "bench_64s.mp4"
    make_demo_video(video, seed=2, duration=64.0, size=(360, 640), fps=8)
    model, processor = load_pretrained("keye-tiny")
    clapper = ClapperConfig(llm_width=model.config.text.hidden_size)
    results = {}
    print(f"{'frames':>6} {'mode':10} {'tokens':>7} {'tok/frame':>9} {'prefill ms':>10}")
    for n in (32, 64, 128):
        # keye-tiny's context is 8k tokens: a budget of 48 tokens per frame keeps every mode inside it
        settings = dict(fps=n / 64.0, max_frames=n, token_budget=48 * n, min_tokens=16, max_tokens=64)
        row = {}
        for mode, slowfast, compress in (("uniform", False, "none"), ("slowfast", True, "none"),
                                         ("+dyntok", True, "dyntok")):  # fmt: skip
            msgs = [{"role": "user", "content": [{"type": "video", "video": str(video)},
                                                 {"type": "text", "text": "What happens?"}]}]  # fmt: skip
            inputs = processor(msgs, slowfast=slowfast, **settings)
            frames = len(inputs.videos[0].frames)

            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                with torch.inference_mode():
                    x, tokens = compress_inputs(model, inputs, compress)
                    model(**x, use_cache=True, logits_to_keep=1)
                times.append(time.perf_counter() - t0)
            row[mode] = dict(frames=frames, tokens=tokens, prefill_s=statistics.median(times))
            print(
                f"{frames:6d} {mode:10} {tokens:7d} {tokens / frames:9.1f} {row[mode]['prefill_s'] * 1000:10.0f}"
            )
        grids = [(g[1] // 2, g[2] // 2) for g in inputs["video_grid_thw"].tolist()]
        row["clapper_tokens_per_frame"] = clapper_tokens(grids, clapper) / len(grids)
        row["dyntok_kept"] = row["+dyntok"]["tokens"] / row["slowfast"]["tokens"]
        row["prefill_ratio"] = row["+dyntok"]["prefill_s"] / row["slowfast"]["prefill_s"]
        print(
            f"{'':6} clapper    {row['clapper_tokens_per_frame']:.1f} tokens/frame (goal <= 61); DynTok keeps "
            f"{row['dyntok_kept']:.0%} (goal <= 45%); prefill DynTok/Slow-Fast {row['prefill_ratio']:.2f} "
            f"(goal <= 0.5 at 64 frames)"
        )
        results[n] = row
    return results


if __name__ == "__main__":
    main()
