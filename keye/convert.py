"""Convert checkpoints between keye's layout and the official Keye-VL-1.5 layout.

Parameter names differ only by prefix:

    keye                      Keye-VL-1.5
    vision.*                  visual.vision_model.*
    projector.*               mlp_AR.*
    language_model.*          model.*
    lm_head.*                 lm_head.*

The official checkpoint also carries the unused SigLIP pooling head (``visual.vision_model.head.*``), which is
dropped on import (and reported). The config is a flat Qwen3-style text config with ``vision_config`` nested,
``rope_scaling`` (``mrope_section`` and the RoPE type) and the special token ids; Keye-VL-1.5 ties a frame's temporal
position to its place in the sequence, which keye expresses as ``tokens_per_second = None``.

``--from-keye`` also writes ``keye_processor.json`` with the official pipeline (`ProcessorSettings.official`, from
the checkpoint's ``preprocessor_config.json``), so a converted model is prompted and preprocessed as Keye-VL-1.5 is
without any flag; ``--to-keye`` writes the official processor files (``preprocessor_config.json``,
``chat_template.json``) beside the tokenizer.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from keye.configuration import KeyeConfig
from keye.errors import ConfigError
from keye.processing import CHAT_TEMPLATE, PROCESSOR_CONFIG, ProcessorSettings

PREFIXES = [
    ("vision.", "visual.vision_model."),
    ("projector.", "mlp_AR."),
    ("language_model.", "model."),
    ("lm_head.", "lm_head."),
]
DROPPED_KEYE_PREFIXES = ("visual.vision_model.head.",)
# Official config keys keye needs, and the defaults the official code applies when an optional one is absent.
TEXT_REQUIRED = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "rope_theta",
]  # fmt: skip
TEXT_OPTIONAL = {
    "head_dim": None,  # hidden_size / num_attention_heads
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
VISION_REQUIRED = [
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size",
    "layer_norm_eps", "hidden_act",
]  # fmt: skip
VISION_OPTIONAL = {"num_channels": 3, "spatial_merge_size": 2}
# keye's token-id field -> the official config key (read from the tokenizer when the config lacks it)
TOKEN_KEYS = {
    "image_token_id": ("image_token_id", "<|image_pad|>"),
    "video_token_id": ("video_token_id", "<|video_pad|>"),
    "vision_start_token_id": ("vision_start_token_id", "<|vision_start|>"),
    "vision_end_token_id": ("vision_end_token_id", "<|vision_end|>"),
    "vision_pad_token_id": ("vision_token_id", "<|vision_pad|>"),
    "frame_token_id": ("frame_token_id", "<|frame|>"),
    "fast_start_token_id": ("fast_start_token_id", "<|fast_start|>"),
    "fast_end_token_id": ("fast_end_token_id", "<|fast_end|>"),
}
ROPE_TYPES_AS_DEFAULT = ("mrope", "default")  # plain RoPE split into M-RoPE sections
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json"]  # fmt: skip
# The official processor's files: written by --to-keye, read (and kept) by --from-keye.
OFFICIAL_PROCESSOR_FILES = ["preprocessor_config.json", "chat_template.json"]


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


def _copy(src: Path, dst: Path, names: list[str]) -> None:
    for name in names:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def config_to_keye(config: KeyeConfig) -> dict:
    """keye's config -> the official flat config.json (text keys at the top, ``vision_config`` nested)."""
    text, vision = config.text_config, config.vision_config
    rope = dict(text.rope_parameters)
    rope_type = rope.pop("rope_type", "default")
    rope_theta = rope.pop("rope_theta")
    out = {k: getattr(text, k) for k in [*TEXT_REQUIRED, *TEXT_OPTIONAL] if k != "rope_theta"}
    out.update(
        architectures=["KeyeVL1_5ForConditionalGeneration"],
        model_type="KeyeVL1_5",
        rope_theta=rope_theta,
        rope_scaling={"type": "mrope" if rope_type == "default" else rope_type, **rope},
        use_qk_norm=text.qk_norm,
        vision_config={
            **{k: getattr(vision, k) for k in [*VISION_REQUIRED, *VISION_OPTIONAL]},
            "model_type": "siglip_vision_model",
        },
        packing_position_embedding_size=vision.packing_position_embedding_size,
        keye_tokens_per_second=config.tokens_per_second,
        **{official: getattr(config, ours) for ours, (official, _) in TOKEN_KEYS.items()},
    )
    return out


def _require(d: dict, keys: list[str], where: str) -> dict:
    missing = [k for k in keys if k not in d]
    if missing:
        raise ConfigError(where, f"missing required key(s) {', '.join(missing)}")
    return {k: d[k] for k in keys}


def config_from_keye(d: dict, vocab: dict[str, int] | None = None, where: str = "config.json") -> KeyeConfig:
    """The official config.json -> keye's config. Every key keye needs is read; a missing required one is an error
    naming it (no 8B default fills in). ``vocab`` (the tokenizer's) supplies token ids the config does not carry."""
    text = _require(d, TEXT_REQUIRED, where)
    text.update({k: d.get(k, default) for k, default in TEXT_OPTIONAL.items()})
    rope = dict(d.get("rope_scaling") or {})
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    if "mrope_section" not in rope:
        raise ConfigError(where, "rope_scaling has no mrope_section")
    text["rope_parameters"] = {
        "rope_type": "default" if kind in ROPE_TYPES_AS_DEFAULT else kind,
        "rope_theta": float(text.pop("rope_theta")),
        **rope,
    }
    text["qk_norm"] = d.get("use_qk_norm", True)  # Keye-VL-1.5's LLM is Qwen3 (q/k norm)
    if "vision_config" not in d:
        raise ConfigError(where, "missing required key vision_config")
    vc = d["vision_config"]
    vision = _require(vc, VISION_REQUIRED, f"{where} vision_config")
    vision.update({k: vc.get(k, default) for k, default in VISION_OPTIONAL.items()})
    vision["packing_position_embedding_size"] = d.get("packing_position_embedding_size", 32768)
    tokens = {}
    for ours, (official, token) in TOKEN_KEYS.items():
        if d.get(official) is not None:
            tokens[ours] = d[official]
        elif vocab is not None and token in vocab:
            tokens[ours] = vocab[token]
        elif ours in ("image_token_id", "video_token_id"):
            raise ConfigError(where, f"missing required key {official} (and no {token} in the tokenizer)")
    return KeyeConfig(
        vision_config=vision,
        projector_config={"merge_size": vision["spatial_merge_size"]},
        text_config=text,
        tie_word_embeddings=text["tie_word_embeddings"],
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
    _copy(src, out, TOKENIZER_FILES)
    settings = (
        ProcessorSettings.from_dict(json.loads((src / PROCESSOR_CONFIG).read_text()))
        if (src / PROCESSOR_CONFIG).exists()
        else ProcessorSettings()
    )
    preprocessor, template = official_processor_files(settings)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")
    return {"tensors": len(state), "dropped": []}


def official_processor_files(settings: ProcessorSettings) -> tuple[dict, str]:
    """``preprocessor_config.json`` and the chat template the official processor reads, for keye's settings."""
    preprocessor = {
        "do_resize": True,
        "resample": 3,  # PIL bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [settings.image_mean] * 3,
        "image_std": [settings.image_std] * 3,
        "min_pixels": settings.min_pixels,
        "max_pixels": settings.max_pixels,
        "patch_size": settings.patch_size,
        "temporal_patch_size": 1,
        "merge_size": settings.merge_size,
    }
    template = CHAT_TEMPLATE
    if settings.default_system:
        template = "{%- set default_system = " + json.dumps(settings.default_system) + " %}" + template
    return preprocessor, template


def from_keye(src: str | Path, out: str | Path) -> dict:
    """An official Keye-VL-1.5 folder -> a keye model folder that `load_pretrained` opens. Returns a report."""
    from keye.modeling import KeyeForConditionalGeneration

    src, out = Path(src), Path(out)
    for name in ("config.json", "preprocessor_config.json"):
        if not (src / name).exists():
            raise FileNotFoundError(f"{src}: no {name} (an official Keye-VL-1.5 folder has one)")
    vocab = None  # the special tokens' ids, for those the config does not name
    if (src / "tokenizer.json").exists():
        vocab = {
            t["content"]: t["id"] for t in json.loads((src / "tokenizer.json").read_text())["added_tokens"]
        }
    config = config_from_keye(
        json.loads((src / "config.json").read_text()), vocab, where=str(src / "config.json")
    )
    preprocessor = json.loads((src / "preprocessor_config.json").read_text())
    try:
        settings = ProcessorSettings.official(preprocessor)
    except ValueError as err:
        raise ConfigError(src / "preprocessor_config.json", str(err)) from err
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
    _copy(src, out, TOKENIZER_FILES + OFFICIAL_PROCESSOR_FILES)
    # the official pipeline by default: a converted model is processed as Keye-VL-1.5 processes it
    (out / PROCESSOR_CONFIG).write_text(json.dumps(asdict(settings), indent=2) + "\n")
    return {"tensors": len(state), "dropped": dropped}
