"""Delta files: how trained weights travel between stages, into checkpoints' exports and into keye-tiny's shipped
asset, without copying the frozen base.

A delta file (safetensors) holds plain tensors, which replace the parameter of that name; ``<module>.weight.lora_A`` /
``.lora_B`` pairs (scaling folded into B), which add ``B @ A`` to the weight; and ``<name>.rows`` + ``<name>.row_values``,
which replace only those rows (Stage 1's new token embeddings). `trained_delta` writes all three from a model,
`apply_delta` reads them into a plain model, `compose_deltas` folds several into one, `read_tensors` finds the file.

Not for: building or freezing the model a run trains (`keye.training.model`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from keye.errors import ConfigError

__all__ = ["read_tensors", "lora_layers", "lora_factors", "trained_delta", "apply_delta", "compose_deltas"]


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a delta/checkpoint: a .safetensors file, or a folder holding weights.safetensors / trainable.safetensors
    / model.safetensors (first found)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        for name in ("weights.safetensors", "trainable.safetensors", "model.safetensors"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise ConfigError(path, "no weights.safetensors, trainable.safetensors or model.safetensors here")
    if not path.exists():
        raise ConfigError(path, "no such weights file")
    return load_file(str(path))


def lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def lora_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{<module>.weight.lora_A: (r, in), <module>.weight.lora_B: (out, r) * scaling}`` of every LoRA layer."""
    out = {}
    for name, m in lora_layers(model):
        for adapter in m.lora_A:
            a = m.lora_A[adapter].weight.detach()
            b = m.lora_B[adapter].weight.detach() * m.scaling[adapter]
            out[f"{name}.weight.lora_A"] = a.clone()
            out[f"{name}.weight.lora_B"] = b.clone()
    return out


def trained_delta(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors as a delta file: trainable parameters, LoRA factors, and only the trained rows of a
    row-masked embedding."""
    out = lora_factors(model)
    for name, p in model.named_parameters():
        if not p.requires_grad or ".lora_" in name:
            continue
        rows = getattr(p, "_keye_rows", None)
        if rows is not None:
            out[f"{name}.rows"] = rows.clone()
            out[f"{name}.row_values"] = p.detach()[rows].clone()
        else:
            out[name] = p.detach().clone()
    return {k: v.contiguous() for k, v in out.items()}


def apply_delta(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Apply a delta file (see the module docstring) to a plain (LoRA-free) Keye model: whole tensors first, then
    rows, then LoRA products. Names the model lacks are errors."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    unknown = []

    def target(name: str) -> torch.Tensor | None:
        if name not in params:
            unknown.append(name)
            return None
        return params[name]

    with torch.no_grad():
        for key, value in tensors.items():
            if key.endswith((".lora_A", ".lora_B", ".rows", ".row_values")):
                continue
            if (p := target(key)) is not None:
                if p.shape != value.shape:
                    raise ConfigError(key, f"shape {tuple(value.shape)} != model's {tuple(p.shape)}")
                p.copy_(value)
        for key, value in tensors.items():
            if key.endswith(".rows") and (p := target(key[: -len(".rows")])) is not None:
                p[value] = tensors[key[: -len(".rows")] + ".row_values"].to(p.dtype)
        for key, value in tensors.items():
            if key.endswith(".lora_A") and (p := target(key[: -len(".lora_A")])) is not None:
                b = tensors[key[: -len(".lora_A")] + ".lora_B"]
                p.add_((b.float() @ value.float()).to(p.dtype))  # (out, r) @ (r, in)
    if unknown:
        raise ConfigError(
            "delta", f"tensors not in the model: {unknown[:8]}{'...' if len(unknown) > 8 else ''}"
        )


def compose_deltas(deltas: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One delta equal to applying ``deltas`` in order: later whole tensors and rows win (and drop earlier LoRA on
    that tensor); LoRA pairs of several stages concatenate along the rank (B1 A1 + B2 A2 = [B1 B2] [A1; A2])."""
    out: dict[str, torch.Tensor] = {}
    for delta in deltas:
        for key, value in delta.items():
            if key.endswith((".lora_A", ".lora_B", ".rows", ".row_values")):
                continue
            out[key] = value
            out.pop(f"{key}.lora_A", None)
            out.pop(f"{key}.lora_B", None)
        for key, value in delta.items():
            if key.endswith(".rows"):
                base = key[: -len(".rows")]
                vals = delta[f"{base}.row_values"]
                if base in out:  # a whole tensor already: write the rows into it
                    out[base] = out[base].clone()
                    out[base][value] = vals
                    continue
                rows = dict(
                    zip(
                        out.get(key, torch.empty(0, dtype=torch.long)).tolist(),
                        out.get(f"{base}.row_values", []),
                    )
                )
                rows.update(zip(value.tolist(), vals))
                ids = sorted(rows)
                out[key] = torch.tensor(ids, dtype=torch.long)
                out[f"{base}.row_values"] = torch.stack([rows[i] for i in ids])
            elif key.endswith(".lora_A"):
                base = key[: -len(".lora_A")]
                b = delta[f"{base}.lora_B"]
                if f"{base}.lora_A" in out:
                    out[f"{base}.lora_A"] = torch.cat([out[f"{base}.lora_A"], value], 0)  # (r1 + r2, in)
                    out[f"{base}.lora_B"] = torch.cat([out[f"{base}.lora_B"], b], 1)  # (out, r1 + r2)
                else:
                    out[f"{base}.lora_A"], out[f"{base}.lora_B"] = value, b
    return {k: v.contiguous() for k, v in out.items()}
