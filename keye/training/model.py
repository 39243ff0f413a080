"""Building the model a run trains: load, change the RoPE base, add LoRA, freeze by config, apply weight deltas.

Freezing is data, not code: `apply_freeze` marks trainable exactly the parameters whose names match
``freeze.trainable`` (and not ``freeze.frozen``); Stage 1's "new token embeddings" is ``freeze.token_rows: special``,
a gradient mask on the rows of the Keye special tokens.

Trained weights travel as delta files (`keye.deltas`): ``init_from`` applies them here.

Not for: the loop (`keye.training.trainer`) or the data (`keye.training.data`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from keye.configuration import KeyeConfig, ModelCard
from keye.deltas import apply_delta, lora_layers, read_tensors
from keye.errors import ConfigError
from keye.modeling import KeyeForConditionalGeneration
from keye.processing import KeyeProcessor
from keye.training.config import FreezeConfig, LoraConfig, ModelConfig

logger = logging.getLogger(__name__)

__all__ = [
    "apply_freeze",
    "inject_lora",
    "load_model",
    "merge_lora",
    "set_rope_theta",
    "special_token_ids",
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


def load_model(cfg: ModelConfig, seed: int = 0) -> tuple[KeyeForConditionalGeneration, KeyeProcessor]:
    """The model and processor a run starts from (fp32, train mode), with ``init_from`` deltas applied.

    ``path``: ``keye-tiny``, ``keye-tiny-base`` (keye-tiny without its shipped trained weights), a model folder, or
    ``random:<folder>`` (that folder's config with fresh weights from ``seed``)."""
    from transformers.utils.import_utils import is_flash_attn_2_available

    from keye.pretrained import keye_tiny_base, load_pretrained

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
    if cfg.init_token_rows:
        init_rows_from_pieces(model, processor.tokenizer, cfg.init_token_rows)
    if cfg.card:
        try:
            model.config.model_card = ModelCard.from_dict(
                {**model.config.card.to_dict(), **cfg.card}
            ).to_dict()
        except (TypeError, ValueError) as e:
            raise ConfigError("model.card", str(e)) from None
    if cfg.rope_theta is not None:
        set_rope_theta(model, cfg.rope_theta)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.train(), processor


@torch.no_grad()
def init_rows_from_pieces(model: KeyeForConditionalGeneration, tokenizer, tokens: list[str]) -> None:
    """Set each added token's embedding row to the mean of the rows of its text split as ordinary text.

    Rows that start equal (keye-tiny's new tokens all start at the mean embedding) stay equal under a tied output
    layer: ``<think>`` and ``</think>`` then get the same logit wherever they are predicted."""
    emb = model.get_input_embeddings().weight
    added = tokenizer.get_added_vocab()
    for token in tokens:
        if token not in added:
            raise ConfigError("model.init_token_rows", f"{token!r} is not an added token of this tokenizer")
        # the first character apart, so the tokenizer cannot match the added token itself
        pieces = [
            i for part in (token[:1], token[1:]) for i in tokenizer.encode(part, add_special_tokens=False)
        ]
        emb[added[token]] = emb[pieces].mean(0)


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


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA adapter into its base weight and put the plain ``nn.Linear`` back."""
    for name, m in list(lora_layers(model)):
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
