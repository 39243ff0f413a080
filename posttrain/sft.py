"""Supervised fine-tuning: a thin recipe over the shared training core, plus what all post-training recipes share.

    keye sft --config configs/posttrain/sft-tiny.yaml [key.sub=value ...] [--resume]
    keye merge-lora RUN/checkpoints/step-000100 --out DIR      # adapters folded in: load_pretrained(DIR) opens it

SFT *is* the core's ``objective: lm`` loop (`keye.training.Trainer`): multi-turn chats with images and videos, the loss
on assistant tokens only (`keye.processing.KeyeProcessor` labels them), thinking and non-thinking data mixed by the
weights of ``data.sources``. What this module adds:

- `PostTrainConfig`: `TrainConfig` plus ``lora_parts``, LoRA target modules in the vision tower and the projector (the
  LLM's are the core's ``lora.target_modules``); `inject_part_lora` puts adapters on all three parts with one peft call.
- `PostTrainer`: `Trainer` with part-wise LoRA and a recipe-chosen data stream (RL prompts, preference pairs), the base
  class of the RL and DPO recipes, which reuse its setup, freezing, optimizer, atomic checkpoints, resume and export.
- `thinking_record` / `write_thinking_mix`: a chat in thinking (``/think``, ``<think>...</think>`` answer) or
  non-thinking (``/no_think``, empty think block) form.
- `merge_lora_checkpoint`: ``keye merge-lora``.

Not for the loss or the loop (`keye.training`), or sampling and RL losses (`keye.posttrain.rollout`, ``gspo``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from keye.errors import ConfigError
from keye.training import Trainer, load_config
from keye.training.config import LoraConfig, TrainConfig, recipe_class

logger = logging.getLogger(__name__)

__all__ = [
    "LoraPartsConfig",
    "PostTrainConfig",
    "PostTrainer",
    "SFTConfig",
    "config_from_dict",
    "inject_part_lora",
    "lora_target_regex",
    "merge_lora_checkpoint",
    "resolve_media",
    "run",
    "thinking_record",
    "write_thinking_mix",
]

# Module-name prefix of each part of a Keye model.
PARTS = {"llm": "language_model", "vision": "vision", "projector": "projector"}
NO_THINK_BLOCK = "<think>\n\n</think>\n\n"  # what KeyeProcessor pre-fills for think=False


@dataclass
class LoraPartsConfig:
    """LoRA target modules (module-name suffixes) in the vision tower and the projector; the LLM's targets are
    ``lora.target_modules``. Empty: no adapters in that part. Rank, alpha and dropout are ``lora``'s."""

    vision: list[str] = field(default_factory=list)  # e.g. [q_proj, v_proj, out_proj, fc1, fc2]
    projector: list[str] = field(default_factory=list)  # e.g. [linear_1, linear_2]
    llm: bool = True  # adapters on the LLM's ``lora.target_modules``


@dataclass
class PostTrainConfig(TrainConfig):
    """`TrainConfig` with part-wise LoRA; the SFT config, and the base of the RL and preference configs."""

    recipe: str = "sft"
    lora_parts: LoraPartsConfig = field(default_factory=LoraPartsConfig)


SFTConfig = PostTrainConfig


def lora_target_regex(lora: LoraConfig, parts: LoraPartsConfig) -> str | None:
    """One peft ``target_modules`` regex (full-matched against module names of the whole model) for every part."""
    import re

    alternatives = []
    for part, names in (
        ("llm", lora.target_modules if parts.llm else []),
        ("vision", parts.vision),
        ("projector", parts.projector),
    ):
        if names:
            suffix = "|".join(re.escape(n) for n in names)
            alternatives.append(rf"{PARTS[part]}\.(?:.*\.)?(?:{suffix})")
    return "|".join(f"(?:{a})" for a in alternatives) or None


def inject_part_lora(model: nn.Module, lora: LoraConfig, parts: LoraPartsConfig) -> None:
    """LoRA adapters (``lora.r``, ``alpha``, ``dropout``) on the target modules of the LLM, vision tower and projector.

    The core's `keye.training.model.inject_lora` reaches only the LLM; this is the same peft call on the whole model
    with a regex per part. Adapter names end in ``.lora_A/B.default.weight``, as there.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    if lora.r <= 0:
        if parts.vision or parts.projector:
            raise ConfigError("lora_parts", "adapters in the vision tower/projector need lora.r > 0")
        return
    targets = lora_target_regex(lora, parts)
    if targets is None:
        raise ConfigError("lora", "lora.r > 0 but no target modules in any part")
    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets
    )
    inject_adapter_in_model(peft_cfg, model)


class PostTrainer(Trainer):
    """`Trainer` with part-wise LoRA (`add_adapters`); a recipe's own data stream comes through `make_stream`."""

    cfg: PostTrainConfig

    def add_adapters(self, model) -> None:
        inject_part_lora(model, self.cfg.lora, self.cfg.lora_parts)

    def export(self) -> Path | None:
        """The core's export (``final/weights.safetensors`` + ``final/model``) plus ``final/train_config.json``."""
        final = super().export()
        if final is not None and self.acc.is_main_process:
            (final / "train_config.json").write_text(json.dumps(asdict(self.cfg), indent=2))
        return final


# ----------------------------------------------------------------------------------------------------------------------
# Thinking / non-thinking data
# ----------------------------------------------------------------------------------------------------------------------


def _append_text(content, text: str):
    return content + text if isinstance(content, str) else [*content, {"type": "text", "text": text}]


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p["type"] == "text")


def thinking_record(record: dict, reasoning: str | list[str] | None) -> dict:
    """``record`` in thinking form (``reasoning`` given: every user turn ends in `` /think``, every answer becomes
    ``<think>\\n{reasoning}\\n</think>\\n\\n`` + ``{answer}``) or non-thinking form (None: `` /no_think`` and an empty
    think block, the block `KeyeProcessor` pre-fills at inference). The block and the answer are two text parts, so
    they tokenize as at inference. A list gives one reasoning per assistant turn."""
    n_answers = sum(m["role"] == "assistant" for m in record["messages"])
    if isinstance(reasoning, list) and len(reasoning) != n_answers:
        raise ValueError(f"{record.get('id')}: {len(reasoning)} reasonings for {n_answers} assistant turns")
    reasons = iter(reasoning if isinstance(reasoning, list) else [reasoning] * n_answers)
    messages = []
    for m in record["messages"]:
        m = dict(m)
        if m["role"] == "user":
            m["content"] = _append_text(m["content"], " /think" if reasoning is not None else " /no_think")
        elif m["role"] == "assistant":
            why = next(reasons)
            block = NO_THINK_BLOCK if why is None else f"<think>\n{why}\n</think>\n\n"
            # Two parts, tokenized apart as at inference, where the block is pre-filled: one string would tokenize
            # "</think>\n\nB" as "</think>", "\n", "\n", "B" and never show the model the pre-fill's "\n\n" token.
            m["content"] = [{"type": "text", "text": block}, {"type": "text", "text": _text_of(m["content"])}]
        messages.append(m)
    return {**record, "messages": messages}


def _synthetic_reasoning(meta: dict, kind: str) -> str:
    """A short, correct chain of thought for a synthetic question, from its labels."""
    if meta.get("qtype") == "caption":
        return (
            f"I should list each scene of the {kind} in order: its objects, their motion and the background."
        )
    reason = f"The question asks about {meta.get('qtype', 'the content')}. Looking at the {kind}, it is {meta['answer']}."
    if meta.get("style") == "mc" and meta.get("answer_letter"):
        reason += f" That is option {meta['answer_letter']}."
    return reason


def write_thinking_mix(manifest: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """From a synthetic chat manifest write ``think.jsonl`` (reasoning from each line's ``meta``) and ``no_think.jsonl``
    next to it in ``out_dir`` (media paths stay relative to the manifest, so ``out_dir`` must be its folder or the paths
    are rewritten). Mix them by ``data.sources`` weights."""
    manifest, out_dir = Path(manifest), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rel = Path(
        os.path.relpath(manifest.parent.resolve(), out_dir.resolve())
    )  # "." when they are the same folder
    think, plain = [], []
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        rec["messages"] = resolve_media(rec["messages"], rel)
        parts = [p for m in rec["messages"] if isinstance(m["content"], list) for p in m["content"]]
        kind = "video" if any(p["type"] == "video" for p in parts) else "image"
        think.append(thinking_record(rec, _synthetic_reasoning(rec["meta"], kind)))
        plain.append(thinking_record(rec, None))
    paths = {"think": out_dir / "think.jsonl", "no_think": out_dir / "no_think.jsonl"}
    for key, recs in (("think", think), ("no_think", plain)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in recs))
    return paths


def resolve_media(messages: list[dict], root: Path) -> list[dict]:
    """Messages with image/video paths joined to ``root`` (manifests hold paths relative to their folder)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [
                {**p, p["type"]: str(Path(root) / p[p["type"]])} if p["type"] in ("image", "video") else p
                for p in content
            ]
        out.append({**m, "content": content})
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Recipe and merge
# ----------------------------------------------------------------------------------------------------------------------


def run(config: str | Path, overrides: list[str] | None = None, resume: bool = False) -> Path | None:
    """SFT run: returns ``<output_dir>/final`` (None with ``export: false``)."""
    cfg = load_config(config, overrides, cls=PostTrainConfig)
    if cfg.objective != "lm":
        raise ConfigError(str(config), f"SFT trains objective 'lm', got {cfg.objective!r}")
    trainer = PostTrainer(cfg).setup(resume=resume)
    trainer.train()
    return trainer.export() if cfg.export else None


def config_from_dict(data: dict, cls: type = PostTrainConfig):
    """A config from the dict a checkpoint's ``state.json`` or ``train_config.json`` holds (checked like a YAML)."""
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in data.items()], cls=cls)


def merge_lora_checkpoint(ckpt: str | Path, out: str | Path, base: str | None = None) -> Path:
    """Fold a LoRA run's adapters into a plain model folder that `keye.load_pretrained` opens.

    ``ckpt``: a checkpoint folder (``checkpoints/step-N``: ``trainable.safetensors`` + ``state.json``) or an export
    (``final/`` or its ``weights.safetensors`` delta). The base model is the run's ``model`` section (``base``
    overrides its ``model.path``).
    """
    from keye.deltas import apply_delta, read_tensors
    from keye.training.model import load_model, merge_lora

    ckpt = Path(ckpt)
    folder = ckpt if ckpt.is_dir() else ckpt.parent
    if (folder / "state.json").exists():
        saved = json.loads((folder / "state.json").read_text())["config"]
    elif (folder / "train_config.json").exists():
        saved = json.loads((folder / "train_config.json").read_text())
    else:
        raise ConfigError(ckpt, "neither a checkpoint (state.json) nor an export (train_config.json)")
    recipe = saved.get("recipe", "sft")  # runs from before recipes were named were SFT runs
    if recipe == "pretrain":
        raise ConfigError(ckpt, "a pretraining run: its export (final/model) is already a plain model folder")
    cfg = config_from_dict(saved, recipe_class(recipe))
    model_cfg = copy.deepcopy(cfg.model)
    if base is not None:
        model_cfg.path, model_cfg.init_from = base, []
    torch.manual_seed(cfg.seed)  # a random: base is rebuilt exactly as the run built it
    model, processor = load_model(model_cfg, seed=cfg.seed)
    if (folder / "state.json").exists():
        inject_part_lora(model, cfg.lora, cfg.lora_parts)
        params = dict(model.named_parameters())
        state = read_tensors(folder / "trainable.safetensors")
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ConfigError(ckpt, f"tensors not in the model: {unknown[:5]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        merge_lora(model)
    else:
        apply_delta(model, read_tensors(ckpt))
    out = Path(out)
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    return out
