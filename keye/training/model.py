"""Building the model a run trains: load, change the RoPE base, add LoRA, freeze by config, apply weight deltas.

Freezing is data, not code: `apply_freeze` marks trainable exactly the parameters whose names match
``freeze.trainable`` (and not ``freeze.frozen``); Stage 1's "new token embeddings" is ``freeze.token_rows: special``,
a gradient mask on the rows of the Keye special tokens.

A *delta file* (safetensors) is how trained weights travel between stages and into ``keye-tiny``'s shipped asset
without copying the frozen base: plain tensors replace the parameter of that name; ``<module>.weight.lora_A`` /
``.lora_B`` pairs (scaling folded into B) add ``B @ A`` to the weight; ``<name>.rows`` + ``<name>.row_values``
replace only those rows. `apply_delta` reads all three; `trained_delta` writes them.

Not for: the loop (`keye.training.trainer`) or the data (`keye.training.data`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from keye.configuration import KeyeConfig
from keye.errors import ConfigError
from keye.modeling import KeyeForConditionalGeneration
from keye.processing import KeyeProcessor
from keye.training.config import FreezeConfig, LoraConfig, ModelConfig

logger = logging.getLogger(__name__)

__all__ = [
    "apply_delta",
    "apply_freeze",
    "compose_deltas",
    "inject_lora",
    "keye_tiny_base",
    "load_model",
    "merge_lora",
    "read_tensors",
    "set_rope_theta",
    "special_token_ids",
    "trained_delta",
]

EMBED = "language_model.embed_tokens.weight"


def set_rope_theta(model: KeyeForConditionalGeneration, theta: float) -> None:
    """Context extension: a new RoPE base for the text model (config and rotary buffers)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    text = model.config.text_config
    old = text.rope_parameters["rope_theta"]
    text.rope_parameters = {**text.rope_parameters, "rope_theta": float(theta)}
    device = model.language_model.rotary_emb.inv_freq.device
    model.language_model.rotary_emb = Qwen2VLRotaryEmbedding(text).to(device)
    logger.info("RoPE base %g -> %g", old, theta)


def keye_tiny_base() -> Path:
    """keye-tiny before training: SmolLM2 + the Keye tokens + the seeded random vision tower and projector, whatever
    asset is shipped (so that retraining keye-tiny starts where the shipped weights started)."""
    from keye.pretrained import TINY_RECIPE_VERSION, build_keye_tiny, keye_home

    folder = keye_home() / "keye-tiny-base"
    version = folder / "recipe_version.txt"  # a folder built by an older recipe may lack a module
    if (
        not (folder / "config.json").exists()
        or not version.exists()
        or version.read_text() != TINY_RECIPE_VERSION
    ):
        folder.parent.mkdir(parents=True, exist_ok=True)
        build_keye_tiny(folder, vision_weights=None)
        version.write_text(TINY_RECIPE_VERSION)
    return folder


def load_model(cfg: ModelConfig, seed: int = 0) -> tuple[KeyeForConditionalGeneration, KeyeProcessor]:
    """The model and processor a run starts from (fp32, train mode), with ``init_from`` deltas applied.

    ``path``: ``keye-tiny``, ``keye-tiny-base`` (keye-tiny without its shipped trained weights), a model folder, or
    ``random:<folder>`` (that folder's config with fresh weights from ``seed``)."""
    from transformers.utils.import_utils import is_flash_attn_2_available

    from keye.pretrained import load_pretrained

    if cfg.attn_implementation is None:  # weights load on the CPU; the run moves them to the GPU
        use_flash = torch.cuda.is_available() and is_flash_attn_2_available()
        cfg = replace(cfg, attn_implementation="flash_attention_2" if use_flash else "sdpa")
    if cfg.path == "keye-tiny-base":
        model, processor = load_pretrained(
            keye_tiny_base(), device="cpu", dtype=torch.float32, attn_implementation=cfg.attn_implementation
        )
    elif cfg.path.startswith("random:"):
        folder = Path(cfg.path[len("random:") :])
        config = KeyeConfig.from_pretrained(folder)
        if cfg.attn_implementation:
            config._attn_implementation = cfg.attn_implementation
        torch.manual_seed(seed)
        model = KeyeForConditionalGeneration(config)
        processor = KeyeProcessor.from_pretrained(folder)
    else:
        model, processor = load_pretrained(
            cfg.path, device="cpu", dtype=torch.float32, attn_implementation=cfg.attn_implementation
        )
    for path in cfg.init_from:
        apply_delta(model, read_tensors(path))
    if cfg.rope_theta is not None:
        set_rope_theta(model, cfg.rope_theta)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.train(), processor


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


def special_token_ids(config: KeyeConfig) -> list[int]:
    """Ids of the Keye special tokens named in the config (Stage 1's "new token embeddings")."""
    names = [
        "vision_start_token_id",
        "vision_end_token_id",
        "vision_pad_token_id",
        "image_token_id",
        "video_token_id",
        "frame_token_id",
        "fast_start_token_id",
        "fast_end_token_id",
        "think_start_token_id",
        "think_end_token_id",
    ]
    ids = {getattr(config, n) for n in names} - {None}
    return sorted(i for i in ids if i < config.text.vocab_size)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA (peft injects the adapters; merging back is by hand so the result is a plain Keye model)
# ----------------------------------------------------------------------------------------------------------------------


def inject_lora(model: KeyeForConditionalGeneration, cfg: LoraConfig) -> None:
    """Add LoRA adapters to the text model's ``cfg.target_modules`` (names end in ``.lora_A/B.default.weight``)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    if cfg.r <= 0:
        return
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules
    )
    # Only the text model: the vision tower has q_proj/v_proj of its own.
    inject_adapter_in_model(peft_cfg, model.language_model)


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def lora_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{<module>.weight.lora_A: (r, in), <module>.weight.lora_B: (out, r) * scaling}`` of every LoRA layer."""
    out = {}
    for name, m in _lora_layers(model):
        for adapter in m.lora_A:
            a = m.lora_A[adapter].weight.detach()
            b = m.lora_B[adapter].weight.detach() * m.scaling[adapter]
            out[f"{name}.weight.lora_A"] = a.clone()
            out[f"{name}.weight.lora_B"] = b.clone()
    return out


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA adapter into its base weight and put the plain ``nn.Linear`` back."""
    for name, m in list(_lora_layers(model)):
        m.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.get_base_layer())


# ----------------------------------------------------------------------------------------------------------------------
# Freezing
# ----------------------------------------------------------------------------------------------------------------------


def apply_freeze(model: nn.Module, cfg: FreezeConfig, config: KeyeConfig) -> list[str]:
    """Set ``requires_grad`` from the regex lists; returns the trainable parameter names (an error if none)."""
    trainable = [re.compile(p) for p in cfg.trainable]
    frozen = [re.compile(p) for p in cfg.frozen]
    names = []
    for name, p in model.named_parameters():
        on = any(r.match(name) for r in trainable) and not any(r.match(name) for r in frozen)
        p.requires_grad_(on)
        if on:
            names.append(name)
    if not names:
        raise ConfigError("freeze.trainable", f"no parameter matches {cfg.trainable} (minus {cfg.frozen})")
    if cfg.token_rows == "special" and EMBED in names:
        weight = dict(model.named_parameters())[EMBED]
        mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        mask[special_token_ids(config)] = 1
        # Rows outside the mask get zero gradient; with weight decay 0 on embeddings (see trainer), Adam leaves them
        # exactly unchanged.
        weight.register_hook(lambda g: g * mask.to(g.dtype))
        weight._keye_rows = torch.tensor(special_token_ids(config))  # what `trained_delta` exports
    return names


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
