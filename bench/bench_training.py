"""Training throughput, packed vs padded, side by side on the same mixed-length samples.

The same samples (lengths drawn log-uniformly from 24 to 1,024 tokens, like a mix of text turns, images and videos)
go through forward + backward of the same model twice: padded into batches of 8 (each padded to its longest sample)
and packed into rows of 2,048 tokens with per-sample positions. Tokens/s counts only real tokens. The model is a
random 4-layer, 256-wide Keye text model (a stand-in for keye-tiny's decoder that fits in a benchmark's time).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from keye.modeling import KeyeForConditionalGeneration
from keye.processing import IGNORE_INDEX
from keye.training.data import collate_padded, pack_samples
from keye.training.losses import lm_loss_sum
from keye.training.testing import tiny_config

__all__ = ["main", "measure"]


def _model(vocab: int = 8192) -> KeyeForConditionalGeneration:
    torch.manual_seed(0)
    config = tiny_config(
        vocab,
        qk_norm=False,
        text={
            "hidden_size": 256,
            "intermediate_size": 1024,
            "num_hidden_layers": 4,
            "head_dim": 64,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e5},
        },
        vision={"num_hidden_layers": 1},
    )
    config._attn_implementation = "sdpa"
    return KeyeForConditionalGeneration(config).train()


def _samples(n: int, seed: int = 0, vocab: int = 8192) -> list[dict]:
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(24), np.log(1024), n)).astype(int)
    out = []
    for length in lengths:
        ids = torch.from_numpy(rng.integers(0, vocab - 2, length))
        labels = ids.clone()
        labels[: length // 2] = IGNORE_INDEX  # a prompt, then the answer
        pos = torch.arange(length)[None].expand(3, -1).clone()
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return out


def _pack(samples: list[dict], max_length: int) -> list[list[dict]]:
    rows, row, used = [], [], 0
    for s in samples:
        if used + len(s["input_ids"]) > max_length:
            rows.append(row)
            row, used = [], 0
        row.append(s)
        used += len(s["input_ids"])
    return rows + ([row] if row else [])


def measure(batches: list[dict], model) -> float:
    """Real tokens per second of forward + backward over ``batches`` (one warm-up batch first)."""
    lm_loss_sum(model, batches[0])[0].backward()
    model.zero_grad(set_to_none=True)
    start, tokens = time.perf_counter(), 0
    for b in batches:
        loss, n = lm_loss_sum(model, b)
        (loss / max(n, 1)).backward()
        model.zero_grad(set_to_none=True)
        tokens += b["num_tokens"]
    return tokens / (time.perf_counter() - start)


def main(n: int = 64, batch: int = 8, max_length: int = 2048) -> dict:
    model = _model()
    samples = _samples(n)
    padded = [collate_padded(samples[i : i + batch], 0) for i in range(0, n, batch)]
    packed = [pack_samples([row], 0) for row in _pack(samples, max_length)]
    real = sum(len(s["input_ids"]) for s in samples)
    pad_slots = sum(b["input_ids"].numel() for b in padded)
    pack_slots = sum(b["input_ids"].numel() for b in packed)
    tps_pad = measure(padded, model)
    tps_pack = measure(packed, model)
    print(
        f"{n} samples, {real} real tokens; lengths 24-1024 (log-uniform); 4x256 Keye text model, fp32, SDPA"
    )
    print(
        f"  padded  (batches of {batch}):        {pad_slots:6d} slots ({real / pad_slots:5.1%} real)  {tps_pad:8.0f} tokens/s"
    )
    print(
        f"  packed  (rows of {max_length}):        {pack_slots:6d} slots ({real / pack_slots:5.1%} real)  {tps_pack:8.0f} tokens/s"
    )
    print(f"  packed / padded: {tps_pack / tps_pad:.2f}x  (goal >= 1.5x)")
    return {"padded_tokens_per_s": tps_pad, "packed_tokens_per_s": tps_pack, "ratio": tps_pack / tps_pad}


if __name__ == "__main__":
    main()
