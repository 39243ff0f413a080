"""Tiny, fast training fixtures for tests and benchmarks: a random Keye model folder and a small synthetic data mix.

`tiny_config` is a random-weight config (vision 32 wide, text 64 wide, 2 layers each); `make_tiny_model_folder` writes
one with keye-tiny's tokenizer and processor settings, for ``model.path: random:<folder>``; `make_tiny_data` writes synthetic video/image manifests and a
text-only one; `tiny_train_config` puts both into a `TrainConfig`.
"""

from __future__ import annotations

import json
from pathlib import Path

from keye.training.config import TrainConfig, load_config

__all__ = ["make_tiny_data", "make_tiny_model_folder", "tiny_config", "tiny_train_config"]


def tiny_config(
    vocab: int = 256,
    *,
    qk_norm: bool = True,
    tie: bool = False,
    packing: int = 0,
    text: dict | None = None,
    vision: dict | None = None,
    **config_kwargs,
):
    """A random-weight KeyeConfig small enough for unit tests: vision 32 wide, text 64 wide, 2 layers each. ``text`` /
    ``vision`` override fields of the text / vision config; ``config_kwargs`` go to `KeyeConfig` (without token ids
    the image and video tokens are the vocabulary's last two ids)."""
    from keye.configuration import KeyeConfig, KeyeTextConfig, KeyeVisionConfig

    vision_config = KeyeVisionConfig(
        **{
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 56,
            "packing_position_embedding_size": packing,
            **(vision or {}),
        }
    )
    text_config = KeyeTextConfig(
        **{
            "vocab_size": vocab,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "qk_norm": qk_norm,
            "tie_word_embeddings": tie,
            **(text or {}),
        }
    )
    config_kwargs.setdefault("image_token_id", vocab - 2)
    config_kwargs.setdefault("video_token_id", vocab - 1)
    return KeyeConfig(
        vision_config=vision_config, text_config=text_config, tie_word_embeddings=tie, **config_kwargs
    )


def make_tiny_model_folder(folder: str | Path, *, tie: bool = False) -> Path:
    """A ``random:`` model folder: `tiny_config` with keye-tiny's processor (tokenizer with the Keye tokens)."""
    from keye.configuration import token_id_fields
    from keye.pretrained import resolve
    from keye.processing import KeyeProcessor

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    processor = KeyeProcessor.from_pretrained(resolve("keye-tiny"))
    config = tiny_config(
        len(processor.tokenizer),
        qk_norm=False,
        tie=tie,
        text={
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "pad_token_id": processor.tokenizer.pad_token_id,
        },
        **token_id_fields(processor.token_ids),
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_tiny_data(folder: str | Path, *, n: int = 16, seed: int = 0) -> dict[str, Path]:
    """Synthetic 56x56 videos (1.5 s) and images with questions/captions, plus a text-only manifest."""
    from keye.synthetic import generate_dataset

    folder = Path(folder)
    media = folder / "media"
    if not (media / "manifest.jsonl").exists():
        generate_dataset(
            media, seed=seed, n=n, size=(56, 56), fps=4, duration=1.5, per_sample="all", progress=False
        )
    text = folder / "text.jsonl"
    if not text.exists():
        lines = []
        for i in range(n):
            a, b = i % 7 + 1, i % 5 + 2
            lines.append(
                {
                    "id": f"text-{i}",
                    "messages": [
                        {"role": "user", "content": f"What is {a} plus {b}?"},
                        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                    ],
                }
            )
        text.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {"media": media / "manifest.jsonl", "text": text}


def tiny_train_config(model_folder: Path, data: dict[str, Path], out: Path, *overrides: str) -> TrainConfig:
    """A TrainConfig over the tiny model and data (packing on, 256-token rows), with dotted ``overrides``."""
    base = [
        f"model.path=random:{model_folder}",
        f"output_dir={out}",
        f"data.sources=[{{path: {data['media']}, weight: 3, kind: mixed}}, {{path: {data['text']}, weight: 1, kind: text}}]",
        "data.max_length=256",
        "optim.lr=3e-3",
        "optim.warmup_steps=0",
        "optim.schedule=constant",
        "max_steps=4",
        "save_every=100",
    ]
    return load_config(None, [*base, *overrides])
