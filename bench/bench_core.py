"""Core latency benchmark for keye-tiny on a generated 30 s 640x360 video.

Prints a latency breakdown (decode, preprocess, vision, prefill, decode tokens/s) and two ratios measured side by
side in this one run:
  - keye decode tokens/s vs plain `LlamaForCausalLM.generate` on the same SmolLM2 weights and prompt length
    (goal >= 0.9);
  - second-turn vs first-turn latency (time to the first answer token) on the same video (goal <= 1/5): the
    second turn reuses the KV cache.

Run: ``python -m bench.bench_core`` (``make bench`` runs every benchmark).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch


def _timed(fn, repeat: int = 1):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> dict:
    from transformers import LlamaForCausalLM

    from keye import load_pretrained
    from keye.chat import ChatSession
    from keye.pretrained import smollm2_gguf
    from keye.synthetic import make_demo_video

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="keye-bench-"))
    video = tmp / "bench_30s_640x360.mp4"
    make_demo_video(video, seed=1, duration=30.0, size=(360, 640), fps=24)
    model, processor = load_pretrained("keye-tiny")
    new_tokens = 32
    results: dict = {}

    # 1. decode + Slow-Fast planning, 2. patchify, 3. vision tower + projector
    t_decode, vin = _timed(lambda: processor.load_video(str(video)))
    t_pre, (pixels, grids) = _timed(lambda: processor.preprocess_video(vin))
    grid = torch.tensor(grids)
    with torch.inference_mode():
        t_vision, _ = _timed(lambda: model.encode_vision(pixels, grid), repeat=3)
    inputs = processor(
        [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": vin},
                    {"type": "text", "text": "What happens in the video?"},
                ],
            }
        ]
    )
    prompt_len = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        t_prefill, _ = _timed(lambda: model(**inputs, use_cache=True, logits_to_keep=1), repeat=3)
    results.update(
        frames=len(vin.frames),
        vision_tokens=int((inputs["input_ids"] == model.config.video_token_id).sum()),
        prompt_tokens=prompt_len,
        decode_s=t_decode,
        preprocess_s=t_pre,
        vision_s=t_vision,
        prefill_s=t_prefill,
    )

    # Decode speed, side by side with plain transformers Llama on the same weights and prompt length.
    gguf = smollm2_gguf()
    ref = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    text_ids = torch.randint(100, 40000, (1, prompt_len))

    def tokens_per_s(m) -> float:
        """Decode rate from the difference of two generation lengths (the prefill cancels out)."""

        def gen(n: int) -> float:
            t0 = time.perf_counter()
            m.generate(
                input_ids=text_ids,
                attention_mask=torch.ones_like(text_ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
            )
            return time.perf_counter() - t0

        with torch.inference_mode():
            gen(2)  # warm-up
            return (new_tokens - 4) / (gen(new_tokens) - gen(4))

    ours, theirs = [], []
    for _ in range(3):  # interleaved, so both see the same machine load
        ours.append(tokens_per_s(model))
        theirs.append(tokens_per_s(ref))
    results.update(keye_tokens_per_s=statistics.median(ours), llama_tokens_per_s=statistics.median(theirs))
    results["decode_ratio"] = results["keye_tokens_per_s"] / results["llama_tokens_per_s"]

    # First vs second turn on the same video: time to the first answer token. The second turn reuses the KV cache
    # (no decoding, no vision tower, no re-prefill of the video).
    session = ChatSession(model, processor)
    t1, _ = _timed(lambda: session.ask("What happens in the video?", videos=[str(video)], max_new_tokens=1))
    t2, _ = _timed(lambda: session.ask("What colour is the first shape?", max_new_tokens=1))
    results.update(first_turn_s=t1, second_turn_s=t2, turn_ratio=t2 / t1)

    print("keye-tiny on a generated 30 s 640x360 video")
    print(
        f"  frames {results['frames']}, vision tokens {results['vision_tokens']}, prompt {prompt_len} tokens"
    )
    for k in ("decode_s", "preprocess_s", "vision_s", "prefill_s"):
        print(f"  {k:14s} {results[k] * 1000:8.1f} ms")
    print(
        f"  decode speed   keye {results['keye_tokens_per_s']:.1f} tok/s vs LlamaForCausalLM "
        f"{results['llama_tokens_per_s']:.1f} tok/s -> ratio {results['decode_ratio']:.2f} (goal >= 0.9)"
    )
    print(
        f"  turns          first {t1:.2f} s, second {t2:.2f} s -> ratio {results['turn_ratio']:.3f} (goal <= 0.2)"
    )
    return results


if __name__ == "__main__":
    main()
