"""Convert checkpoints between keye's layout and the official Keye-VL-1.5 layout.

Parameter names differ only by prefix:

    keye                      Keye-VL-1.5
    vision.*                  visual.vision_model.*
    projector.*               mlp_AR.*
    language_model.*          model.*
    lm_head.*                 lm_head.*

The official checkpoint also carries the unused SigLIP pooling head (``visual.vision_model.head.*``), which is
dropped on import (and reported). The config is a flat Qwen3-style text config with ``vision_config`` nested,
``rope_scaling.mrope_section`` and the special token ids; Keye-VL-1.5 ties a frame's temporal position to its place
in the sequence, which keye expresses as ``tokens_per_second = None``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from keye.configuration import KeyeConfig

PREFIXES = [
    ("vision.", "visual.vision_model."),
    ("projector.", "mlp_AR."),
    ("language_model.", "model."),
    ("lm_head.", "lm_head."),
]
DROPPED_KEYE_PREFIXES = ("visual.vision_model.head.",)
TEXT_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "attention_bias",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
]  # fmt: skip
VISION_FIELDS = [
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "image_size",
    "patch_size", "hidden_act", "layer_norm_eps", "spatial_merge_size",
]  # fmt: skip
TOKEN_FIELDS = [
    "vision_start_token_id", "vision_end_token_id", "vision_pad_token_id", "image_token_id", "video_token_id",
    "frame_token_id", "fast_start_token_id", "fast_end_token_id",
]  # fmt: skip
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "keye_processor.json", "generation_config.json"]  # fmt: skip


def rename(key: str, to_keye: bool) -> str:
    for ours, theirs in PREFIXES:
        src, dst = (ours, theirs) if to_keye else (theirs, ours)
        if key.startswith(src):
            return dst + key[len(src) :]
    raise KeyError(f"parameter {key!r} has no mapping between the keye and Keye-VL-1.5 layouts")


def _read_state(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors files")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def config_to_keye(config: KeyeConfig) -> dict:
    text, vision = config.text_config, config.vision_config
    out = {k: getattr(text, k) for k in TEXT_FIELDS}
    out.update(
        architectures=["KeyeVL1_5ForConditionalGeneration"],
        model_type="KeyeVL1_5",
        rope_theta=text.rope_theta,
        rope_scaling={"type": "mrope", "mrope_section": text.mrope_section},
        use_qk_norm=text.qk_norm,
        vision_config={**{k: getattr(vision, k) for k in VISION_FIELDS}, "model_type": "siglip_vision_model"},
        packing_position_embedding_size=vision.packing_position_embedding_size,
        keye_tokens_per_second=config.tokens_per_second,
        **{k: getattr(config, k) for k in TOKEN_FIELDS},
    )
    return out


def config_from_keye(d: dict) -> KeyeConfig:
    text = {k: d[k] for k in TEXT_FIELDS if k in d}
    rope = d.get("rope_scaling") or {}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(d.get("rope_theta", 1e6))}
    if "mrope_section" in rope:
        text["rope_parameters"]["mrope_section"] = list(rope["mrope_section"])
    text["qk_norm"] = d.get("use_qk_norm", True)  # Keye-VL-1.5's LLM is Qwen3 (q/k norm)
    vision = {k: v for k, v in d["vision_config"].items() if k in VISION_FIELDS}
    vision["packing_position_embedding_size"] = d.get("packing_position_embedding_size", 32768)
    tokens = {k: d[k] for k in TOKEN_FIELDS if d.get(k) is not None}
    return KeyeConfig(
        vision_config=vision,
        text_config=text,
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        tokens_per_second=d.get("keye_tokens_per_second"),
        **tokens,
    )


def to_keye(src: str | Path, out: str | Path) -> dict:
    """A keye model folder -> the official Keye-VL-1.5 layout. Returns a report."""
    src, out = Path(src), Path(out)
    config = KeyeConfig.from_pretrained(src)
    state = {rename(k, to_keye=True): v.contiguous() for k, v in _read_state(src).items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_to_keye(config), indent=2) + "\n")
    _copy_tokenizer(src, out)
    return {"tensors": len(state), "dropped": []}


def from_keye(src: str | Path, out: str | Path) -> dict:
    """An official Keye-VL-1.5 folder -> a keye model folder that `load_pretrained` opens. Returns a report."""
    from keye.modeling import KeyeForConditionalGeneration

    src, out = Path(src), Path(out)
    config = config_from_keye(json.loads((src / "config.json").read_text()))
    raw = _read_state(src)
    dropped = sorted(k for k in raw if k.startswith(DROPPED_KEYE_PREFIXES))
    state = {rename(k, to_keye=False): v for k, v in raw.items() if not k.startswith(DROPPED_KEYE_PREFIXES)}
    with torch.device("meta"):  # names and shapes only: an 8B checkpoint is never materialised twice
        expected = {k: v.shape for k, v in KeyeForConditionalGeneration(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{src}: checkpoint does not match its config: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    wrong = [k for k, shape in expected.items() if state[k].shape != shape]
    if wrong:
        raise ValueError(f"{src}: shapes differ from the config for {wrong[:8]}")
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    _copy_tokenizer(src, out)
    return {"tensors": len(state), "dropped": dropped}
