"""Model merging: weighted parameter averaging of same-architecture checkpoints (Keye-VL-1.5 merges models trained
on different data mixtures).

Inputs are model folders (``model.safetensors``: the result is a model folder, with the first input's config and
tokenizer) or delta/checkpoint folders and files (``weights.safetensors``, ``trainable.safetensors``). Every input must
hold the same tensor names and shapes. Integer tensors (e.g. the row indices of a delta file) must be equal and are
copied. LoRA factor pairs cannot be averaged factor by factor (B @ A is not linear in them): merge the exported
``final/model`` folders, where LoRA is folded in, instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from keye.deltas import read_tensors
from keye.errors import ConfigError

__all__ = ["merge_checkpoints"]


def merge_checkpoints(paths: list[str | Path], weights: list[float] | None, out: str | Path) -> Path:
    """Write ``sum_i w_i * tensors_i`` (weights normalised to sum 1; default equal) to ``out``; returns the file."""
    from safetensors.torch import save_file

    if len(paths) < 2:
        raise ConfigError("merge", "give at least two checkpoints")
    weights = weights or [1.0] * len(paths)
    if len(weights) != len(paths):
        raise ConfigError("--weights", f"{len(weights)} weights for {len(paths)} checkpoints")
    if sum(weights) <= 0 or any(w < 0 for w in weights):
        raise ConfigError("--weights", f"weights must be >= 0 with a positive sum, got {weights}")
    w = [x / sum(weights) for x in weights]
    states = [read_tensors(p) for p in paths]
    keys = set(states[0])
    for p, s in zip(paths[1:], states[1:]):
        if set(s) != keys:
            diff = sorted(keys ^ set(s))[:5]
            raise ConfigError(p, f"tensor names differ from {paths[0]}: {diff}")
    if any(".lora_" in k for k in keys):
        raise ConfigError(paths[0], "holds LoRA factors; merge the exported final/model folders instead")
    merged = {}
    for k in sorted(keys):
        ts = [s[k] for s in states]
        for p, t in zip(paths[1:], ts[1:]):
            if t.shape != ts[0].shape:
                raise ConfigError(p, f"{k}: shape {tuple(t.shape)} != {tuple(ts[0].shape)}")
        if ts[0].is_floating_point():
            acc = sum(wi * t.double() for wi, t in zip(w, ts))
            merged[k] = acc.to(ts[0].dtype).contiguous()
        else:
            if not all(torch.equal(t, ts[0]) for t in ts[1:]):
                raise ConfigError(k, "integer tensors differ between checkpoints")
            merged[k] = ts[0]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = Path(paths[0])
    if first.is_dir() and (first / "model.safetensors").exists():
        for f in first.iterdir():  # config, tokenizer, processor settings
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy2(f, out / f.name)
        target = out / "model.safetensors"
        save_file(merged, str(target), metadata={"format": "pt"})
    else:
        target = out / "weights.safetensors"
        save_file(merged, str(target))
    return target
