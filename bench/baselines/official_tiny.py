"""A tiny random checkpoint in the official Keye-VL-1.5 layout, and the media the fidelity fixture is made on.

Used twice, and importing nothing from keye so that neither use depends on keye's own code:

- by ``make_fidelity_fixtures.py``, which runs the official implementation on it to make the fixture;
- by ``tests/test_fidelity.py``, which rebuilds the same folder and sends it through ``keye convert --from-keye``.

Weights come from NumPy's legacy ``RandomState`` (its stream is frozen across NumPy versions), stored in bf16 as the
released checkpoint is; the fixture records their sha256 so a test knows it rebuilt the same checkpoint. The
tokenizer (a small byte-level BPE with Qwen's special tokens), the configs and the video are committed files under
``tests/fixtures/fidelity/official-tiny`` and ``tests/fixtures/fidelity/media``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "fidelity"
CHECKPOINT_FILES = FIXTURE / "official-tiny"  # config.json, tokenizer and processor files (no weights)
MEDIA = FIXTURE / "media"
WEIGHTS_SEED = 20261205

# Special tokens in the order the Qwen vocabulary has them (ids differ: this vocabulary is small).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
    "<|frame|>",
    "<|fast_start|>",
    "<|fast_end|>",
]

TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    mrope_section=[2, 3, 3],
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=14,
    image_size=70,  # a 5x5 position table, bilinearly resized to every grid
    layer_norm_eps=1e-6,
    spatial_merge_size=2,
)
PACKING_POSITIONS = 32768  # the official vision embeddings always carry this (unused) table


def official_shapes(vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the official layout for the tiny config."""
    v, t = VISION, TEXT
    d, f, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "visual.vision_model.embeddings.patch_embedding.weight": (d, 3, p, p),
        "visual.vision_model.embeddings.patch_embedding.bias": (d,),
        "visual.vision_model.embeddings.position_embedding.weight": ((v["image_size"] // p) ** 2, d),
        "visual.vision_model.embeddings.packing_position_embedding.weight": (PACKING_POSITIONS, d),
        "visual.vision_model.post_layernorm.weight": (d,),
        "visual.vision_model.post_layernorm.bias": (d,),
        # the SigLIP pooling head: shipped, never used
        "visual.vision_model.head.probe": (1, 1, d),
        "visual.vision_model.head.layernorm.weight": (d,),
        "visual.vision_model.head.layernorm.bias": (d,),
    }
    for i in range(v["num_hidden_layers"]):
        pre = f"visual.vision_model.encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[pre + f"self_attn.{name}.weight"] = (d, d)
            shapes[pre + f"self_attn.{name}.bias"] = (d,)
        for name in ("layer_norm1", "layer_norm2"):
            shapes[pre + f"{name}.weight"] = (d,)
            shapes[pre + f"{name}.bias"] = (d,)
        shapes[pre + "mlp.fc1.weight"] = (f, d)
        shapes[pre + "mlp.fc1.bias"] = (f,)
        shapes[pre + "mlp.fc2.weight"] = (d, f)
        shapes[pre + "mlp.fc2.bias"] = (d,)
    m = 4 * d
    shapes.update(
        {
            "mlp_AR.pre_norm.weight": (m,),
            "mlp_AR.pre_norm.bias": (m,),
            "mlp_AR.linear_1.weight": (m, m),
            "mlp_AR.linear_1.bias": (m,),
            "mlp_AR.linear_2.weight": (t["hidden_size"], m),
            "mlp_AR.linear_2.bias": (t["hidden_size"],),
        }
    )
    h, hd = t["hidden_size"], t["head_dim"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    shapes["model.embed_tokens.weight"] = (vocab, h)
    for i in range(t["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        shapes[pre + "self_attn.q_proj.weight"] = (q, h)
        shapes[pre + "self_attn.k_proj.weight"] = (kv, h)
        shapes[pre + "self_attn.v_proj.weight"] = (kv, h)
        shapes[pre + "self_attn.o_proj.weight"] = (h, q)
        shapes[pre + "self_attn.q_norm.weight"] = (hd,)
        shapes[pre + "self_attn.k_norm.weight"] = (hd,)
        shapes[pre + "mlp.gate_proj.weight"] = (t["intermediate_size"], h)
        shapes[pre + "mlp.up_proj.weight"] = (t["intermediate_size"], h)
        shapes[pre + "mlp.down_proj.weight"] = (h, t["intermediate_size"])
        shapes[pre + "input_layernorm.weight"] = (h,)
        shapes[pre + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab, h)
    return shapes


def _init(rng: np.random.RandomState, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name.endswith(("norm.weight", "layer_norm1.weight", "layer_norm2.weight", "layernorm.weight")):
        return 1.0 + 0.1 * rng.standard_normal(
            shape
        )  # norms near one, not exactly (a wrong eps or axis shows)
    if name.endswith(".bias"):
        return 0.05 * rng.standard_normal(shape)
    if "embed_tokens" in name or "lm_head" in name:
        return 0.5 * rng.standard_normal(shape)
    if "position_embedding" in name:
        return 0.2 * rng.standard_normal(shape)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    return rng.standard_normal(shape) / np.sqrt(fan_in)


def write_weights(folder: Path) -> str:
    """Write ``model.safetensors`` (bf16) into ``folder`` from the fixed seed; return its sha256."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((folder / "config.json").read_text())
    rng = np.random.RandomState(WEIGHTS_SEED)
    state = {
        name: torch.from_numpy(_init(rng, name, shape).astype(np.float32)).to(torch.bfloat16)
        for name, shape in official_shapes(config["vocab_size"]).items()
    }
    path = folder / "model.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_checkpoint(out: Path) -> str:
    """The committed config/tokenizer/processor files plus regenerated weights in ``out``; returns the weights' sha."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for f in CHECKPOINT_FILES.iterdir():
        shutil.copy2(f, out / f.name)
    return write_weights(out)


def natural_image(height: int, width: int, seed: int) -> np.ndarray:
    """A deterministic RGB ``(H, W, 3)`` uint8 picture with smooth shading, edges and fine texture."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.002, 0.03), rng.uniform(0.002, 0.03), rng.uniform(0, 6.28)
        img[..., c] = 128 + 70 * np.sin(x * fx + ph) * np.cos(y * fy - ph)
    for _ in range(6):  # hard-edged discs
        cy, cx, r = (
            rng.uniform(0, height),
            rng.uniform(0, width),
            rng.uniform(0.05, 0.25) * min(height, width),
        )
        colour = rng.uniform(0, 255, 3)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = colour
    img += rng.normal(0, 12, img.shape)  # sensor-like noise
    return np.clip(img, 0, 255).astype(np.uint8)


# The media the fixture prompts use: small committed files, or generated on the fly (the large image).
LARGE_IMAGE = dict(
    height=1500, width=2000, seed=11
)  # resized twice by the official pipeline: 868x1148, not 840x1148


def write_large_image(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(natural_image(**LARGE_IMAGE)).save(path)
    return path
