"""The training data stream: JSONL chat manifests -> mixed, processed, packed (or padded) micro-batches.

    manifests (one chat per line, keye.synthetic's format)  --ManifestSource-->  datasets.Dataset per source
    sources + weights  --MixSchedule-->  sample index i -> (source, row): deterministic, epoch-shuffled
    row  --encode_sample (KeyeProcessor)-->  input_ids, labels (assistant only), position_ids (3, T), pixels, grids
    samples  --pack_samples-->  rows of <= max_length tokens; position_ids (4, B, T): per-sample text positions
                                first (restarting at 0, so the decoder masks attention between samples), then M-RoPE

A malformed line is skipped when the manifest is read, and a sample whose media cannot be read (or that is longer than
``max_length``) is skipped when it is drawn; both are counted and logged with the manifest's line number.

The stream is a pure function of ``(seed, position)``: `TrainStream` yields micro-batches that carry the position of
the first sample after them, which is all a checkpoint needs to resume exactly. Ranks of a data-parallel run take
interleaved sample indices (``i % world == rank``).

Not for: the loss (`keye.training.losses`) or the optimisation loop (`keye.training.trainer`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from keye.errors import KeyeInputError
from keye.processing import IGNORE_INDEX, VISION_INPUTS
from keye.training.config import DataConfig

logger = logging.getLogger(__name__)

__all__ = [
    "ManifestSource",
    "MixSchedule",
    "TrainStream",
    "collate_padded",
    "encode_sample",
    "pack_samples",
    "read_manifest",
]

_BLOCK = 4096  # indices per block of the mixing schedule


def _validate_record(rec: Any) -> str | None:
    """Why ``rec`` is not a usable chat record, or None."""
    if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list) or not rec["messages"]:
        return "no 'messages' list"
    roles = []
    for m in rec["messages"]:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            return "a message without a valid role"
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", "image", "video") or not isinstance(part.get(kind), str):
                    return f"a content part of unknown type {kind!r}"
        elif not isinstance(content, str):
            return "a message whose content is neither a string nor a list"
        roles.append(m["role"])
    if "assistant" not in roles:
        return "no assistant turn (nothing to train on)"
    return None


def read_manifest(path: str | Path, validate, what: str = "lines") -> tuple[list[tuple[int, str, dict]], int]:
    """The usable lines of a JSONL manifest as ``(line number, text, record)``, and how many were skipped: a line that
    is not JSON or that ``validate(record)`` (a reason, or None) rejects is logged with its number and skipped. An
    unreadable file, or one without a usable line, is a `KeyeInputError` naming it."""
    path = Path(path)
    kept, skipped = [], 0
    try:
        fh = open(path, encoding="utf-8")
    except OSError as e:
        raise KeyeInputError(path, f"cannot read manifest: {e}") from e
    with fh:
        for n, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
                why = validate(rec)
            except json.JSONDecodeError as e:
                why = f"invalid JSON ({e.msg})"
            if why is not None:
                logger.warning("%s:%d: skipped malformed line: %s", path, n, why)
                skipped += 1
                continue
            kept.append((n, text, rec))
    if not kept:
        raise KeyeInputError(path, f"no usable {what} in manifest")
    return kept, skipped


class ManifestSource:
    """One JSONL manifest as a `datasets.Dataset` of ``{"line", "record"}``; bad lines are skipped and counted."""

    def __init__(self, path: str | Path, kind: str = "mixed"):
        import datasets

        self.path = Path(path)
        self.kind = kind
        kept, skipped = read_manifest(self.path, _validate_record)
        self.skipped = Counter({"malformed": skipped} if skipped else {})
        # The record stays a JSON string: message contents mix strings and lists, which Arrow cannot type.
        self.dataset = datasets.Dataset.from_dict(
            {"line": [k[0] for k in kept], "record": [k[1] for k in kept]}
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, dict]:
        row = self.dataset[int(i)]
        return row["line"], json.loads(row["record"])


class MixSchedule:
    """Sample index -> (source, row), mixing sources by weight; each source is reshuffled every epoch.

    Deterministic in ``(seed, index)``: the source of index i comes from a seeded draw per block of indices, and the
    row is the k-th entry of that source's epoch permutation, k being how often the source was drawn before i.
    """

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        w = np.asarray(weights, dtype=np.float64)
        if len(sizes) == 0 or w.sum() <= 0:
            raise ValueError("the data mix needs at least one source with a positive weight")
        self.sizes, self.p, self.seed = sizes, w / w.sum(), seed
        self._block_counts: list[np.ndarray] = []  # draws per source before each block

    def _choices(self, block: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 7, block])
        return rng.choice(len(self.sizes), size=_BLOCK, p=self.p)

    def _before(self, block: int) -> np.ndarray:
        while len(self._block_counts) <= block:
            b = len(self._block_counts)
            prev = self._block_counts[-1] if b else np.zeros(len(self.sizes), np.int64)
            counts = prev + (np.bincount(self._choices(b - 1), minlength=len(self.sizes)) if b else 0)
            self._block_counts.append(counts)
        return self._block_counts[block]

    def __call__(self, index: int) -> tuple[int, int]:
        block, offset = divmod(index, _BLOCK)
        choices = self._choices(block)
        s = int(choices[offset])
        k = int(self._before(block)[s] + (choices[:offset] == s).sum())
        epoch, pos = divmod(k, self.sizes[s])
        perm = np.random.default_rng([self.seed, 11, s, epoch]).permutation(self.sizes[s])
        return s, int(perm[pos])


def _resolve_media(messages: list[dict], root: Path) -> list[dict]:
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [
                {**p, p["type"]: str(root / p[p["type"]])} if p["type"] in ("image", "video") else p
                for p in content
            ]
        out.append({**m, "content": content})
    return out


def encode_sample(
    processor, record: dict, root: Path, video_cache: dict | None = None, **video_overrides
) -> dict:
    """A chat record -> one training sample (1-D ``input_ids``/``labels``, ``position_ids`` (3, T), pixels).

    ``video_cache`` (path -> decoded, planned `VideoInput`) skips decoding a video again for its next question.
    """
    messages = _resolve_media(record["messages"], root)
    if video_cache is not None:
        for m in messages:
            if isinstance(m["content"], list):
                for p in m["content"]:
                    if p["type"] == "video":
                        path = p["video"]
                        if path not in video_cache:
                            video_cache[path] = processor.load_video(path, **video_overrides)
                        p["video"] = video_cache[path]
    enc = processor(messages, add_generation_prompt=False, return_labels=True, **video_overrides)
    sample = {
        "input_ids": enc["input_ids"][0],  # (T,)
        "labels": enc["labels"][0],  # (T,)
        "position_ids": enc["position_ids"][:, 0],  # (3, T)
    }
    for key in VISION_INPUTS:
        if key in enc:
            sample[key] = enc[key]
    return sample


def _cat_vision(samples: list[dict], out: dict) -> None:
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        have = [(i, s) for i, s in enumerate(samples) if pix in s]
        if have:
            out[pix] = torch.cat([s[pix] for _, s in have])  # (N, 3*14*14), in sample order
            out[grid] = torch.cat([s[grid] for _, s in have])  # (items, 3)
            # The sample each grid row belongs to (Stage 0 pools vision features per sample).
            out[grid + "_owner"] = torch.cat([torch.full((len(s[grid]),), i) for i, s in have])  # (items,)
    refs = [s for s in samples if "video_reference_index" in s]
    if refs:  # frame indices: each sample's count from the frames of the samples before it
        offsets = torch.tensor([0] + [int(s["video_grid_thw"][:, 0].sum()) for s in refs[:-1]]).cumsum(0)
        out["video_reference_index"] = torch.cat(
            [s["video_reference_index"] + o for s, o in zip(refs, offsets)]
        )


def pack_samples(rows: list[list[dict]], pad_id: int) -> dict:
    """Rows of samples -> one packed micro-batch.

    Each row is the concatenation of its samples, right-padded to the longest row. ``position_ids`` is
    ``(4, B, T)``: row 0 holds per-sample text positions that restart at 0 at every sample (the decoder turns them
    into a block-diagonal causal mask; the padding tail is a segment of its own), rows 1-3 each sample's own M-RoPE
    positions. ``labels`` keep only assistant tokens, so no sample is trained to predict the next sample's first token.
    """
    lengths = [sum(len(s["input_ids"]) for s in row) for row in rows]
    T = max(lengths)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((4, B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for s in row:
            n = len(s["input_ids"])
            ids[b, start : start + n] = s["input_ids"]
            lab = s["labels"].clone()
            lab[0] = IGNORE_INDEX  # never a target across a sample boundary
            labels[b, start : start + n] = lab
            pos[0, b, start : start + n] = torch.arange(n)
            pos[1:, b, start : start + n] = s["position_ids"]
            start += n
        pad = T - start
        if pad:
            pos[:, b, start:] = torch.arange(pad)
    out = {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": None}
    _cat_vision([s for row in rows for s in row], out)
    out["num_tokens"] = sum(lengths)
    return out


def collate_padded(samples: list[dict], pad_id: int) -> dict:
    """Samples -> one right-padded micro-batch with an ``attention_mask`` and ``position_ids`` (3, B, T)."""
    T = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    pos = torch.zeros((3, B, T), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = s["input_ids"], s["labels"], 1
        pos[:, b, :n] = s["position_ids"]
        pos[:, b, n:] = s["position_ids"][:, -1:] + 1 + torch.arange(T - n)
    out = {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask}
    _cat_vision(samples, out)
    out["num_tokens"] = int(mask.sum())
    return out


@dataclass
class StreamStats:
    samples: int = 0
    skipped_media: int = 0
    skipped_too_long: int = 0


class TrainStream(IterableDataset):
    """Endless micro-batches from ``start`` (this rank's local sample position); each carries ``next_position``."""

    def __init__(
        self,
        cfg: DataConfig,
        processor,
        seed: int,
        *,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        sources: list[ManifestSource] | None = None,
    ):
        self.cfg, self.processor, self.seed = cfg, processor, seed
        self.rank, self.world, self.start = rank, world, start
        self.sources = sources or [ManifestSource(s.path, s.kind) for s in cfg.sources]
        self.schedule = MixSchedule([len(s) for s in self.sources], [s.weight for s in cfg.sources], seed)
        self.stats = StreamStats()
        self.video_cache: dict | None = {} if cfg.cache_videos else None
        pad = processor.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0
        self.overrides = {
            k: v
            for k, v in (
                ("fps", cfg.fps),
                ("max_frames", cfg.max_frames),
                ("token_budget", cfg.token_budget),
            )
            if v is not None
        }

    def sample(self, local: int) -> dict | None:
        """Sample at this rank's local position (None when skipped)."""
        s, row = self.schedule(local * self.world + self.rank)
        source = self.sources[s]
        line, record = source[row]
        try:
            out = encode_sample(
                self.processor, record, source.path.parent, self.video_cache, **self.overrides
            )
        except (KeyeInputError, OSError, ValueError) as e:
            logger.warning("%s:%d: skipped sample: %s", source.path, line, e)
            self.stats.skipped_media += 1
            return None
        if len(out["input_ids"]) > self.cfg.max_length:
            logger.warning(
                "%s:%d: skipped sample of %d tokens (data.max_length %d)",
                source.path,
                line,
                len(out["input_ids"]),
                self.cfg.max_length,
            )
            self.stats.skipped_too_long += 1
            return None
        out["source"] = s
        return out

    def __iter__(self):
        cfg, local = self.cfg, self.start
        pending: tuple[int, dict] | None = None  # a sample that did not fit the previous batch
        while True:
            first = pending[0] if pending else local
            rows: list[list[dict]] = [[]]
            used = 0
            while True:
                if pending is not None:
                    at, s = pending
                    pending = None
                else:
                    at, s = local, self.sample(local)
                    local += 1
                    if s is None:
                        continue
                n = len(s["input_ids"])
                if not cfg.packing:
                    rows[-1].append(s)
                    if len(rows[-1]) == cfg.rows_per_batch:
                        break
                    continue
                if used + n <= cfg.max_length:
                    rows[-1].append(s)
                    used += n
                    continue
                if len(rows) == cfg.rows_per_batch:
                    pending = (at, s)
                    break
                rows.append([s])
                used = n
            batch = pack_samples(rows, self.pad_id) if cfg.packing else collate_padded(rows[0], self.pad_id)
            batch["position"] = first
            batch["next_position"] = pending[0] if pending else local
            batch["num_samples"] = sum(len(r) for r in rows)
            self.stats.samples += batch["num_samples"]
            yield batch
