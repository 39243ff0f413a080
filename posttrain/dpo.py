"""Preference alignment on image and video pairs: DPO and MPO, ``keye dpo --config configs/posttrain/dpo-tiny.yaml``.

A manifest line is ``{"id", "messages": [... ending with the user turn, media relative to the manifest], "chosen":
"...", "rejected": "..."}``. A micro-batch encodes ``pairs_per_step`` pairs as ``2B`` chats (prompt + chosen, prompt +
rejected; `keye.training.data.encode_sample`, so labels mark exactly the response tokens), runs the policy (with grad)
and a frozen copy of the initial policy (the reference) over them, sums each response's token log-probs and applies
`dpo_loss` or `mpo_loss` (`keye.posttrain.preference`). MPO's quality-term shift ``delta`` is a moving average
(`RewardShift`) logged every step and restored from the metrics on resume.

The recipe supplies only its micro-batches of pairs and their summed loss to the training core's loop
(`keye.training.Trainer.train`), which owns accumulation (``grad_accum`` micro-batches: the mean over all their pairs),
clipping, precision, the schedule, checkpoints, resume and export. Not for the losses (`keye.posttrain.preference`) or for making pairs (`write_preference_pairs`
makes synthetic ones).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from keye.errors import ConfigError, KeyeInputError
from keye.posttrain.preference import RewardShift, dpo_loss, mpo_loss
from keye.posttrain.rollout import response_logprobs
from keye.posttrain.sft import PostTrainConfig, PostTrainer, inject_part_lora, resolve_media
from keye.processing import IGNORE_INDEX
from keye.training import load_config
from keye.training.data import MixSchedule, collate_padded, encode_sample, read_manifest
from keye.training.losses import model_inputs

logger = logging.getLogger(__name__)

__all__ = ["DPOConfig", "DPOTrainer", "PairSource", "PreferenceConfig", "run", "write_preference_pairs"]


@dataclass
class PreferenceConfig:
    loss: str = "dpo"  # dpo | mpo
    beta: float = 0.1
    pairs_per_step: int = 2
    # MPO: w_pref * DPO + w_quality * BCO quality + w_gen * SFT (InternVL's defaults)
    w_pref: float = 0.8
    w_quality: float = 0.2
    w_gen: float = 1.0
    shift_momentum: float = 0.99  # the quality term's reward shift (moving average)

    def __post_init__(self):
        if self.loss not in ("dpo", "mpo"):
            raise ConfigError("dpo.loss", f"must be 'dpo' or 'mpo', got {self.loss!r}")
        if self.pairs_per_step < 1:
            raise ConfigError("dpo.pairs_per_step", "must be >= 1")


@dataclass
class DPOConfig(PostTrainConfig):
    recipe: str = "dpo"
    dpo: PreferenceConfig = field(default_factory=PreferenceConfig)


def _why_bad(rec) -> str | None:
    if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list) or not rec["messages"]:
        return "no 'messages' list"
    if rec["messages"][-1].get("role") != "user":
        return "the messages must end with the user turn"
    for key in ("chosen", "rejected"):
        if not isinstance(rec.get(key), str) or not rec[key].strip():
            return f"no {key!r} response text"
    return None


class PairSource:
    """One preference manifest; malformed lines are skipped with a warning naming the line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        kept, _ = read_manifest(self.path, _why_bad, what="preference pairs")
        self.records: list[tuple[int, dict]] = [(n, rec) for n, _, rec in kept]

    def __len__(self) -> int:
        return len(self.records)


class PairStream:
    """Preference pairs mixed by source weight: position -> one encoded (chosen, rejected) pair, or None if skipped."""

    def __init__(self, cfg, processor, seed: int):
        self.cfg, self.processor = cfg, processor
        self.sources = [PairSource(s.path) for s in cfg.sources]
        self.schedule = MixSchedule([len(s) for s in self.sources], [s.weight for s in cfg.sources], seed)
        self.overrides = {
            k: v
            for k, v in (("fps", cfg.fps), ("max_frames", cfg.max_frames), ("token_budget", cfg.token_budget))
            if v is not None
        }
        self.skipped = 0
        self.stats = None

    def pair(self, position: int) -> tuple[dict, dict] | None:
        s, row = self.schedule(position)
        source = self.sources[s]
        line, rec = source.records[row]
        try:
            return tuple(
                encode_sample(
                    self.processor,
                    {"messages": [*rec["messages"], {"role": "assistant", "content": rec[key]}]},
                    source.path.parent,
                    **self.overrides,
                )
                for key in ("chosen", "rejected")
            )
        except (KeyeInputError, OSError, ValueError) as e:
            logger.warning("%s:%d: skipped pair: %s", source.path, line, e)
            self.skipped += 1
            return None


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's labelled (response) tokens ``(B,)`` and their counts ``(B,)``."""
    device = next(model.parameters()).device
    inputs = model_inputs(batch, device)
    logits = model(**inputs, use_cache=False).logits  # (B, T, V)
    mask = batch["labels"].to(device) != IGNORE_INDEX  # (B, T); position 0 is a prompt token
    lp = response_logprobs(logits, inputs["input_ids"], mask)  # (B, T)
    return lp.sum(1), mask.sum(1)


class DPOTrainer(PostTrainer):
    cfg: DPOConfig

    def make_stream(self, core_stream, data_cfg, processor, seed, **_):
        return PairStream(data_cfg, processor, seed)

    def setup(self, resume: bool = False) -> DPOTrainer:
        super().setup(resume=resume)
        # The reference is the policy before any update (LoRA adapters start at B = 0, so it is the base model).
        self.reference = copy.deepcopy(self._unwrapped()).eval().requires_grad_(False)
        if resume and self.step > 0:
            self._restore_reference()
        delta = self.metrics[-1].get("delta", 0.0) if self.metrics else 0.0
        self.shift = RewardShift(self.cfg.dpo.shift_momentum, delta)
        return self

    def _restore_reference(self) -> None:
        """After a resume the loaded weights are the trained policy: rebuild the reference from the run's start."""
        from keye.training.model import load_model

        torch.manual_seed(self.cfg.seed)
        ref, _ = load_model(self.cfg.model, seed=self.cfg.seed)
        inject_part_lora(ref, self.cfg.lora, self.cfg.lora_parts)  # B = 0: the same function as the base
        self.reference = ref.eval().requires_grad_(False)

    def _batch(self) -> dict:
        """The next ``pairs_per_step`` readable pairs: chosen rows first, then the rejected rows in the same order."""
        pairs, acc = [], self.acc
        while len(pairs) < self.cfg.dpo.pairs_per_step:
            # this rank's pairs: every num_processes-th of the mix, from its own offset (``position`` counts its draws)
            p = self.stream.pair(self.position * acc.num_processes + acc.process_index)
            self.position += 1
            if p is not None:
                pairs.append(p)
        pad = self.processor.tokenizer.pad_token_id
        return collate_padded([c for c, _ in pairs] + [r for _, r in pairs], pad if pad is not None else 0)

    # The core loop (`keye.training.Trainer.train`) owns accumulation, clipping, precision, schedule, checkpoints;
    # this recipe supplies pairs and the preference loss summed over them.
    def micro_batches(self):
        while True:
            yield self._batch()

    def _count(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2  # pairs

    def _micro_loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        d, acc = self.cfg.dpo, self.acc
        b = self._count(batch)
        with torch.no_grad(), acc.autocast():
            ref_lp, _ = sequence_logps(self.reference, batch)
        lp, lengths = self.forward(lambda m: sequence_logps(m, batch))
        logps = (lp[:b], lp[b:], ref_lp[:b].to(lp.device), ref_lp[b:].to(lp.device))
        if d.loss == "dpo":
            loss, stats = dpo_loss(*logps, beta=d.beta)
        else:
            loss, stats = mpo_loss(
                *logps,
                lengths[:b],
                beta=d.beta,
                w_pref=d.w_pref,
                w_quality=d.w_quality,
                w_gen=d.w_gen,
                delta=self.shift.value,
            )
        self._step_logps.append(tuple(x.detach() for x in logps))
        self._step_stats.append((b, stats.as_dict()))
        return loss * b, b  # the pairs' mean loss, summed

    def step_metrics(self, window: list[dict]) -> dict:
        """The step's preference statistics (pair-weighted over its micro-batches), then MPO's reward shift update."""
        n = sum(b for b, _ in self._step_stats)
        keys = [
            k for k in self._step_stats[0][1] if k != "loss"
        ]  # the loop's loss is over every rank's pairs
        out = {k: float(sum(b * float(s[k]) for b, s in self._step_stats) / n) for k in keys}
        if self.cfg.dpo.loss == "mpo":
            merged = [torch.cat(parts) for parts in zip(*self._step_logps)]
            self.shift.update(*merged, beta=self.cfg.dpo.beta)
        self._step_logps, self._step_stats = [], []
        return {**out, "delta": self.shift.value}

    def train(self) -> list[dict]:
        self._step_logps, self._step_stats = [], []
        return super().train()

    def report_skipped(self) -> None:
        if self.stream.skipped:
            logger.warning("skipped %d pairs with unreadable media", self.stream.skipped)


def write_preference_pairs(manifest: str | Path, out: str | Path, *, seed: int = 0) -> Path:
    """Synthetic pairs from a chat manifest with ``meta.options``: chosen = the reference answer, rejected = a wrong
    option (a multiple-choice line answers with letters). Lines without options are left out. Media paths stay valid
    when ``out`` is in the manifest's folder."""
    import os

    manifest, out = Path(manifest), Path(out)
    rel = Path(os.path.relpath(manifest.parent.resolve(), out.parent.resolve()))
    rng = np.random.default_rng(seed)
    lines = []
    for text in manifest.read_text().splitlines():
        rec = json.loads(text)
        meta = rec.get("meta") or {}
        options = meta.get("options") or []
        if len(options) < 2 or not meta.get("answer_letter"):
            continue
        letters = [o.split(".", 1)[0].strip() for o in options]
        values = [o.split(".", 1)[1].strip() if "." in o else o for o in options]
        wrong = [i for i, letter in enumerate(letters) if letter != meta["answer_letter"]]
        k = int(rng.choice(wrong))
        mc = meta.get("style") == "mc"
        prompt = [m for m in rec["messages"] if m["role"] != "assistant"]
        lines.append(
            {
                "id": rec["id"],
                "messages": resolve_media(prompt, rel),
                "chosen": meta["answer_letter"] if mc else str(meta["answer"]),
                "rejected": letters[k] if mc else values[k],
                "meta": meta,
            }
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return out


def run(config: str | Path, overrides: list[str] | None = None, resume: bool = False) -> Path | None:
    """A DPO / MPO run: returns ``<output_dir>/final`` (None with ``export: false``)."""
    cfg = load_config(config, overrides, cls=DPOConfig)
    trainer = DPOTrainer(cfg).setup(resume=resume)
    trainer.train()
    return trainer.export() if cfg.export else None
