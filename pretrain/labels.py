"""keye-tiny Stage 0: the vision tower learns the synthetic generator's labels directly, token by token.

Each merged vision token (the 2x2 patches the projector hands the LLM) learns what lies under it: the colours, shapes
and colour-shape pairs of the objects covering it (multi-label), and the scene's background; pooled per frame, it
learns how many objects the frame holds. Frames come from the processor exactly as at inference (Slow-Fast sizes
included), labels from `keye.synthetic.object_masks`. KEYE_TINY.md measured why: a vision tower trained only through
a frozen 135M LLM stays at chance for a long time, while a direct objective teaches it in minutes.

The projector trains here too: each projected token regresses onto the LLM's own word embeddings of what lies under
it (the mean of its colour and shape words, or the background's colour word), so Stage 1 starts from soft tokens the
frozen LLM already reads as words. Without it a randomly initialised projector emits tokens ~20x the norm of
SmolLM2's embeddings and nearly identical to each other (a large constant plus ~1% variation), and a frozen LLM
ignored the picture after Stage 1 (measured: the colour distribution did not change from video to video). The
targets also say where each token's object lies (`WordTargets`, ``position``). The media and every token's targets
come from `keye.pretrain.label_examples`; the heads, losses, readouts and the trainer are here.

Stage 0 first trains on still images of its own (``<data>/stage0``, 10,000 by default), then on the videos and images
of the later stages. Measured: on the 3,600 media of the later stages alone the tower did not tell the shapes apart
(600 steps: 34% of object tokens read their true shape word; 1,100 images for 1,000 steps: 97% of training tokens
right but 49% held out), while 2,500 steps over 10,000 images (0.3 s a step, 16 tokens an image) then 400 on the
videos read 87% on held-out videos.

Last, the motion phase (``motion_steps``): the tower frozen, the projector and its temporal branch
(`keye.modeling.KeyeTemporalBranch`) learn targets where a frame's tokens also hold the word of the direction its scene
moved in since its reference frame (`frame_motion`), and no longer their place. Why: a vision token sees one frame,
and SmolLM2-135M did not learn to compare places across frames (LoRA on motion questions alone stayed at 24%, always
"right"; even places written out as numbers in the prompt reached only 20-26%), while it reads a word off a token.
Measured on the 100 held-out media, 1,500 steps (2.4 steps/s, one thread): with the word targets alone 71% of the
moving frames' tokens (79% of frames, tokens averaged) are nearest to their true direction word; adding the readout loss
(``motion_readout``) 0.1 / 0.2 / 0.3: 76 / 79 / 78% of tokens, 88 / 92 / 93% of frames, for a shape readout of 88 / 87 /
86% (93% without it); no other frame's token is nearer a direction word than its colour word (0.3% at 0.2).

Counting works the same way (``count``, keye-tiny v2's Stage 4): a frame's background tokens also hold the word of
how many shapes it shows ("three", `COUNT_WORDS`), with a readout loss of their cosines to the count words
(``count_readout``). Why: the per-frame count head read 89% of held-out frames right, yet the LLM, left to count the
tokens holding a shape, answered count questions right 4 times in 10. With the count word, 86% of held-out background
tokens are nearest to their frame's true count word after Stage 4 (89% after its motion phase).

Both phases are pretraining stages on the core loop (``recipe: labels``, `LabelTrainer`), resumable like the others:

    keye pretrain --config configs/pretrain/stage0_tiny.yaml          # label phases -> runs/keye-tiny/stage0-tower
    keye pretrain --config configs/pretrain/stage0_motion_tiny.yaml   # motion phase -> runs/keye-tiny/stage0

Each writes ``<output_dir>/final/weights.safetensors`` (the tower and projector, then the projector: delta files the
later stages' ``init_from`` read in that order), ``metrics.jsonl`` and the held-out scores in ``final/eval.json``.
The figures above were measured with Stage 0's own loop before it moved onto the core's (same losses and data; the
core's schedule warms up then decays, where the old one multiplied the two, and its weight decay skips vectors).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from keye.errors import ConfigError, KeyeInputError
from keye.pretrain.label_examples import (
    COUNT_WORDS,
    MAX_COUNT,
    cached_examples,
    collate,
    label_vocab,
    text_vocab,
    token_xy,
)
from keye.synthetic import DIRECTIONS
from keye.training import Trainer
from keye.training.config import TrainConfig

__all__ = [
    "LabelHeads",
    "LabelObjective",
    "LabelTrainer",
    "LabelsConfig",
    "WordTargets",
    "word_readout",
]

logger = logging.getLogger(__name__)


@dataclass
class LabelObjective:
    """Stage 0's ``labels:`` section: which media the tokens learn from, and what they learn."""

    data: str = "runs/keye-tiny/data"  # <data>/{video,image}/samples.jsonl: the later stages' media (Slow-Fast frames)
    images: str | None = (
        "runs/keye-tiny/data/stage0"  # <images>/image/samples.jsonl: still images, trained on first
    )
    image_steps: int = 2500  # optimizer steps on ``images`` before those on ``data`` (0: none)
    batch: int = 32  # media (videos or images) per micro-batch
    held_out: int = 100  # media of ``data`` kept out of training for the report in ``final/eval.json``
    min_share: float = 0.2  # a token shows an object when it holds at least this share of the object's pixels
    position: float = 0.5  # weight of the token's place in the projector's target (`WordTargets`)
    # The motion phase: no label heads; the projector, its temporal branch included, learns targets in which a
    # frame's tokens also hold the direction word of its scene's motion since the reference frame, and no place.
    motion: bool = False
    motion_readout: float = 0.2  # weight of the direction-word readout loss (`_readout_loss`)
    # A frame's background tokens also hold the word of how many shapes it shows (`COUNT_WORDS`), read out with
    # ``count_readout``'s weight (`_readout_loss`): the LLM reads a count off a token as it reads a colour.
    count: bool = False
    count_readout: float = 0.2
    # more media folders (as ``data``) trained on, none held out
    also: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.batch < 1 or self.held_out < 0 or self.image_steps < 0:
            raise ConfigError("labels", "batch must be >= 1, held_out and image_steps >= 0")
        if self.image_steps and not self.images:
            raise ConfigError("labels.images", "image_steps > 0 needs a folder of still images")
        if self.motion and (self.position or self.image_steps):
            raise ConfigError(
                "labels.motion", "the motion phase learns no places and no images: position 0, image_steps 0"
            )


@dataclass
class LabelsConfig(TrainConfig):
    """One Stage 0 phase (``recipe: labels``, run by ``keye pretrain``): the core's run settings (model, freeze,
    optim, precision, checkpoints) and the ``labels`` section; ``data`` and ``objective`` are not read."""

    recipe: str = "labels"
    labels: LabelObjective = field(default_factory=LabelObjective)


class LabelHeads(nn.Module):
    """Linear read-outs of merged vision tokens: multi-label colour/shape/pair, background, the on-screen text under
    the token, and a frame's count."""

    def __init__(self, dim: int):
        super().__init__()
        colours, shapes, pairs, backgrounds = label_vocab()
        self.sizes = (len(colours), len(shapes), len(pairs))
        self.norm = nn.LayerNorm(dim)
        self.multi = nn.Linear(dim, sum(self.sizes))
        self.background = nn.Linear(dim, len(backgrounds))
        self.text = nn.Linear(dim, len(text_vocab()))
        self.count = nn.Linear(dim, MAX_COUNT + 1)

    def forward(self, tokens: torch.Tensor, frame_of: torch.Tensor, n_frames: int):
        x = self.norm(tokens)
        pooled = torch.zeros(n_frames, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, frame_of, x)
        pooled = pooled / torch.bincount(frame_of, minlength=n_frames).clamp(min=1)[:, None].to(x.dtype)
        return self.multi(x), self.background(x), self.text(x), self.count(pooled)


def _xy(batch: dict) -> torch.Tensor:
    return batch["xy"] if "xy" in batch else token_xy(batch["grid_thw"])


class WordTargets:
    """The LLM's input embeddings of the label words (a word's sub-tokens averaged): what each projected token should
    look like to the LLM.

    With ``position > 0`` every target also says where its content lies, in the LLM's own direction words:
    ``position * (x * unit(right - left) + y * unit(down - up))`` scaled to the mean word norm (the second axis made
    orthogonal to the first), ``x, y`` in (-1, 1): ``batch["xy"]`` (`token_targets`: an object token says its object's
    centre), else the token's own centre (`token_xy`). A vision token sees one frame, so motion ("In which direction
    does the red square move?") is the change of this place across frames; without it the word targets carry no
    position at all.

    With ``motion`` the tokens of a frame whose scene moves since its reference frame (``batch["motion"]``,
    `frame_motion`) also hold the direction word among their label words: what the projector's temporal branch
    shows (Stage 0 then trains without ``position``, whose axes are the same words' difference). With ``count`` a
    frame's background tokens also hold its count word (`COUNT_WORDS`)."""

    def __init__(self, model, tokenizer, position: float = 0.0, motion: bool = False, count: bool = False):
        colours, shapes, _, backgrounds = label_vocab()
        table = model.get_input_embeddings().weight.detach().float()

        def words(names):
            return torch.stack([table[tokenizer.encode(n, add_special_tokens=False)].mean(0) for n in names])

        self.n_colours, self.n_shapes = len(colours), len(shapes)
        self.position, self.motion, self.count = position, motion, count
        self.objects = torch.cat([words(colours), words(shapes)])  # (n_colours + n_shapes, D)
        self.backgrounds = words(backgrounds)  # (n_backgrounds, D)
        self.texts = words(text_vocab())  # (n_texts, D)
        self.directions = words(DIRECTIONS)  # (4, D)
        self.counts = words(COUNT_WORDS)  # (MAX_COUNT + 1, D)
        left, right, up, down = (
            self.directions[DIRECTIONS.index(d)] for d in ("left", "right", "up", "down")
        )
        x = F.normalize(right - left, dim=0)
        y = F.normalize((down - up) - (down - up) @ x * x, dim=0)  # orthogonal to x
        self.axes = torch.stack([x, y]) * position * self.objects.norm(dim=-1).mean()

    def __call__(self, batch: dict) -> torch.Tensor:
        """Target embedding of every merged token ``(T, D)``."""
        hot = batch["multi"][:, : self.objects.shape[0]]  # colour and shape columns
        words, n = hot @ self.objects, hot.sum(1, keepdim=True)
        if "text" in batch:  # a token on the on-screen text also holds its word
            on_text = (batch["text"] >= 0)[:, None]
            words, n = words + on_text * self.texts[batch["text"].clamp(min=0)], n + on_text
        words = torch.where(
            n > 0, words, self.backgrounds[batch["background"]]
        )  # nothing else: the background
        n = n.clamp(min=1)
        if self.count:  # background tokens also hold their frame's count
            counted = _count_labels(batch)
            on = (counted >= 0)[:, None]
            words, n = words + on * self.counts[counted.clamp(min=0)], n + on
        if self.motion and "motion" in batch:
            moving = (batch["motion"] >= 0)[:, None]
            words = words + moving * self.directions[batch["motion"].clamp(min=0)]
            n = n + moving
        out = words / n
        if self.position:
            out = out + _xy(batch) @ self.axes
        return out


def _project(model, batch: dict, temporal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged vision tokens and their projections; ``temporal``: through the projector's temporal branch too."""
    feats = model.vision(batch["pixel_values"], batch["grid_thw"])
    tokens = model.projector.merge_patches(feats, batch["grid_thw"])
    ref = batch["reference"] if temporal else None
    return tokens, model.projector.project(tokens, batch["grid_thw"], ref)


def _forward(model, heads: LabelHeads, batch: dict, temporal: bool = False):
    """Heads' outputs and projected tokens (`_project`)."""
    tokens, projected = _project(model, batch, temporal)
    return (*heads(tokens, batch["frame_of"], batch["grid_thw"].shape[0]), projected)


def _loss(out, batch: dict, targets: WordTargets, count_readout: float = 0.0) -> torch.Tensor:
    multi, background, text, count, projected = out
    target = targets(batch)
    align = (projected.float() - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean()
    # tokens on exactly one shape also pick it among the shapes (softmax): measured 31% vs 27% after 200 steps
    nc, ns = targets.n_colours, targets.n_shapes
    shapes = batch["multi"][:, nc : nc + ns]
    one = shapes.sum(1) == 1
    shape = F.cross_entropy(multi[one, nc : nc + ns].float(), shapes[one].argmax(1)) if one.any() else 0.0
    on_text = batch["text"] >= 0
    text_loss = F.cross_entropy(text[on_text].float(), batch["text"][on_text]) if on_text.any() else 0.0
    return (
        F.binary_cross_entropy_with_logits(multi, batch["multi"], reduction="sum") / multi.shape[0]
        + F.cross_entropy(background, batch["background"])
        + text_loss
        + F.cross_entropy(count, batch["count"])
        + shape
        + align
        + _count_readout(projected, batch, targets, count_readout)
    )


def word_readout(
    projected: torch.Tensor, multi: torch.Tensor, targets: WordTargets, n_colours: int, motion=None
) -> dict:
    """What the LLM can read off the projected tokens: over tokens showing exactly one colour (one shape), how often
    the nearest colour (shape) word embedding by cosine is the true one. Exact targets read 100% on both (with a
    small ``position``; a large one drowns the words). With ``motion`` (per token, `frame_motion`), also over the
    tokens of moving frames the nearest direction word (``word_motion``), and how often a token of any other frame
    is nearer to a direction word than to every colour word (``still_motion``, false alarms)."""
    words = F.normalize(targets.objects, dim=-1)
    proj = F.normalize(projected.float(), dim=-1)
    out = {}
    for name, sl in (("colour", slice(0, n_colours)), ("shape", slice(n_colours, words.shape[0]))):
        hot = multi[:, sl]
        one = hot.sum(1) == 1
        nearest = (proj[one] @ words[sl].T).argmax(1)
        out[f"word_{name}"] = (
            float((nearest == hot[one].argmax(1)).float().mean()) if one.any() else float("nan")
        )
    if motion is not None and (motion >= 0).any():
        moving = motion >= 0
        dirs = proj @ F.normalize(targets.directions, dim=-1).T  # (T, 4)
        out["word_motion"] = float((dirs[moving].argmax(1) == motion[moving]).float().mean())
        colours = proj @ words[:n_colours].T
        out["still_motion"] = float(
            (dirs[~moving].max(1).values > colours[~moving].max(1).values).float().mean()
        )
    return out


@torch.no_grad()
def evaluate(
    model, heads: LabelHeads | None, examples: list[dict], targets: WordTargets, temporal: bool = False
) -> dict[str, float]:
    """Held-out accuracy: with ``heads``, exact token label sets (colours, shapes, pairs), background per token, count
    per frame; the mean cosine between projected tokens and their word targets, and their nearest-word readout
    (`word_readout`)."""
    if not examples:
        return {}
    batch = collate(examples)
    result = {}
    nc = targets.n_colours
    if heads is not None:
        multi, background, text, count, projected = _forward(model, heads, batch, temporal)
        pred = multi > 0
        ns = targets.n_shapes
        parts = {"colours": slice(0, nc), "shapes": slice(nc, nc + ns), "pairs": slice(nc + ns, None)}
        result = {
            f"token_{name}": float((pred[:, sl] == batch["multi"][:, sl].bool()).all(1).float().mean())
            for name, sl in parts.items()
        }
        result["token_background"] = float((background.argmax(1) == batch["background"]).float().mean())
        result["frame_count"] = float((count.argmax(1) == batch["count"]).float().mean())
        on_text = batch["text"] >= 0
        if on_text.any():
            result["token_text"] = float((text[on_text].argmax(1) == batch["text"][on_text]).float().mean())
    else:
        projected = _project(model, batch, temporal)[1]
    result["word_cosine"] = float(F.cosine_similarity(projected.float(), targets(batch), dim=-1).mean())
    result.update(
        word_readout(projected, batch["multi"], targets, nc, batch.get("motion") if temporal else None)
    )
    if targets.count:  # background tokens' nearest count word
        result["word_count"] = _nearest_word(projected, _count_labels(batch), targets.counts)
    if (batch["text"] >= 0).any():  # the nearest text word of the tokens on text
        result["word_text"] = _nearest_word(projected, batch["text"], targets.texts)
    if targets.position:  # the place the tokens say against the true one (off-centre tokens)
        said = (projected.float() - projected.float().mean(0)) @ targets.axes.T
        xy = _xy(batch)
        off = xy.abs() >= 0.25
        result["word_position"] = float((said.sign() == xy.sign())[off].float().mean())
    return {k: round(100 * v, 2) for k, v in result.items()}


def _nearest_word(projected: torch.Tensor, labels: torch.Tensor, words: torch.Tensor) -> float:
    """Over the labelled tokens (``labels`` -1: none), how often the nearest of ``words`` by cosine is the label."""
    on = labels >= 0
    if not on.any():
        return float("nan")
    near = F.normalize(projected[on].float(), dim=-1) @ F.normalize(words, dim=-1).T
    return float((near.argmax(1) == labels[on]).float().mean())


def _readout_loss(projected: torch.Tensor, labels: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the labelled tokens' cosines (x10) to ``words`` (``labels`` -1: none): the nearest word is
    what `word_readout` scores and what the LLM has to read (the direction of a moving token, a background token's
    count)."""
    on = labels >= 0
    if not on.any():
        return projected.sum() * 0.0
    cos = F.normalize(projected[on].float(), dim=-1) @ F.normalize(words, dim=-1).T
    return F.cross_entropy(10 * cos, labels[on])


def _count_labels(batch: dict) -> torch.Tensor:
    """Per token the frame's count class on background tokens (nothing else under them), else -1."""
    empty = batch["multi"].sum(1) == 0
    if "text" in batch:
        empty &= batch["text"] < 0
    return torch.where(empty, batch["count"][batch["frame_of"]], -1)


def _count_readout(projected: torch.Tensor, batch: dict, targets: WordTargets, weight: float):
    """The count word's readout loss with ``weight`` (`_readout_loss` over `_count_labels`); 0 without ``count``."""
    if not (targets.count and weight):
        return 0.0
    return weight * _readout_loss(projected, _count_labels(batch), targets.counts)


def _motion_loss(
    model, batch: dict, targets: WordTargets, readout: float, count_readout: float = 0.0
) -> torch.Tensor:
    """The motion phase: projected tokens (temporal branch included) onto their word targets with motion, plus the
    direction-word readout (and the count word's, with ``targets.count``); the tower's features need no gradient
    (it is frozen)."""
    with torch.no_grad():
        feats = model.vision(batch["pixel_values"], batch["grid_thw"])
    tokens = model.projector.merge_patches(feats, batch["grid_thw"])
    projected = model.projector.project(tokens, batch["grid_thw"], batch["reference"]).float()
    target = targets(batch)
    loss = (projected - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean()
    if readout:
        loss = loss + readout * _readout_loss(projected, batch["motion"], targets.directions)
    return loss + _count_readout(projected, batch, targets, count_readout)


class LabelTrainer(Trainer):
    """Stage 0 on the core loop (`keye.training.Trainer`): micro-batches of ``labels.batch`` media drawn at random
    (reproducibly from the data position, so a resumed run draws the same), the label loss (`_loss`, with
    `LabelHeads` as the model's training head) or the motion phase's (`_motion_loss`); one unit per micro-batch.
    The export adds the held-out scores, ``final/eval.json``."""

    cfg: LabelsConfig

    def add_head(self, model) -> None:
        if not self.cfg.labels.motion:
            model.head = LabelHeads(4 * model.config.vision.hidden_size)

    def build_stream(self) -> dict[str, list[dict]]:
        lab, model = self.cfg.labels, self._unwrapped()
        if lab.motion and model.projector.temporal is None:
            raise ConfigError(
                "labels.motion", "needs a projector with a temporal branch (temporal_hidden_size > 0)"
            )
        with self.acc.main_process_first():  # the main process prepares the caches, the others read them
            examples = cached_examples(Path(lab.data), self.processor, lab.min_share)
            also = [
                e for folder in lab.also for e in cached_examples(Path(folder), self.processor, lab.min_share)
            ]
            images = (
                cached_examples(Path(lab.images), self.processor, lab.min_share) if lab.image_steps else []
            )
        if lab.image_steps and not images:
            raise KeyeInputError(
                f"{lab.images}/image/samples.jsonl", "no Stage 0 images (labels.image_steps > 0)"
            )
        if len(examples) <= lab.held_out:
            raise KeyeInputError(
                lab.data, f"{len(examples)} media, not more than labels.held_out ({lab.held_out})"
            )
        self.targets = WordTargets(
            model, self.processor.tokenizer, lab.position, motion=lab.motion, count=lab.count
        )
        return {"held": examples[: lab.held_out], "train": examples[lab.held_out :] + also, "images": images}

    def micro_batches(self):
        lab, acc = self.cfg.labels, self.acc
        while True:
            pool = self.stream["images"] if self.step < lab.image_steps else self.stream["train"]
            draw = (
                self.position * acc.num_processes + acc.process_index
            )  # this rank's draws, as in the other recipes
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + draw)
            batch = collate([pool[i] for i in torch.randint(len(pool), (lab.batch,), generator=gen).tolist()])
            self.position += 1
            yield {**batch, "num_tokens": batch["frame_of"].numel()}

    def _count(self, batch: dict) -> int:
        return 1  # each micro-batch's loss is a mean over its tokens

    def _micro_loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        lab = self.cfg.labels
        if lab.motion:
            return self.forward(
                lambda m: _motion_loss(m, batch, self.targets, lab.motion_readout, lab.count_readout)
            ), 1
        return self.forward(
            lambda m: _loss(_forward(m, m.head, batch), batch, self.targets, lab.count_readout)
        ), 1

    def export(self) -> Path | None:
        self.model.eval()
        temporal = self.cfg.labels.motion
        scores = self.forward(
            lambda m: evaluate(m, getattr(m, "head", None), self.stream["held"], self.targets, temporal)
        )
        final = super().export()
        if final is not None and self.acc.is_main_process:
            logger.info("stage 0 held-out: %s", scores)
            (final / "eval.json").write_text(json.dumps(scores, indent=2) + "\n")
        return final
