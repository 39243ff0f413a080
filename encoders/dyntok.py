"""DynTok (arXiv 2506.03990): training-free merging of similar neighbouring vision tokens within a frame.

Each frame's merged token grid is walked row by row, left to right; a token joins the group of its left neighbour when
the cosine similarity of their vision features exceeds a threshold (0.6, the paper's setting), otherwise it starts a new
group. A group is therefore a horizontal run of tokens in one row, and is replaced by the mean of its projected (LLM)
tokens. Flat regions (sky, walls, black borders) collapse to a token or two per row; detailed regions keep every token.

Position rule (M-RoPE): a merged token takes the (h, w) position of the **first (leftmost) token of its run**, and the
frame's t. Positions are then a subset of the unmerged grid's positions, in the same raster order and all distinct, so a
model builds its position ids for the full grid and keeps the rows at `dyntok_keep_index`; nothing else in the rotary
code changes. (The run's centre would be the other natural choice; the first token was chosen for that subset
property.)

Works on any frame (images, slow and fast video frames): the caller applies it per call, per frame.
Not for: choosing frames (``slowfast``), learned compression (``clapper``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "DYNTOK_THRESHOLD",
    "DynTokResult",
    "dyntok_groups",
    "dyntok_merge",
    "dyntok_positions",
    "dyntok_keep_index",
    "dyntok_frames",
]

# The paper's setting: patches whose similarity to their left neighbour exceeds 0.6 are merged (Fig. 1 of 2506.03990).
DYNTOK_THRESHOLD = 0.6


def dyntok_groups(
    features: torch.Tensor, grid_h: int, grid_w: int, threshold: float = DYNTOK_THRESHOLD
) -> torch.Tensor:
    """Group id of each token of one frame; ids count up from 0 in raster order.

    features: (grid_h * grid_w, D) vision features in row-major order of the merged grid.
    Returns (N,) int64. Token (r, c) shares the group of (r, c - 1) when their cosine similarity is > threshold; the
    first token of every row starts a group. Fully vectorized: one cosine per token pair, then a cumulative sum.
    """
    n = grid_h * grid_w
    if features.dim() != 2 or features.shape[0] != n:
        raise ValueError(
            f"dyntok_groups: expected ({n}, D) features for a {grid_h}x{grid_w} grid, got {tuple(features.shape)}"
        )
    grid = features.detach().float().reshape(grid_h, grid_w, -1)
    # (grid_h, grid_w - 1): each token against its left neighbour
    sim = F.cosine_similarity(grid[:, 1:], grid[:, :-1], dim=-1)
    starts = torch.ones(grid_h, grid_w, dtype=torch.bool, device=features.device)
    starts[:, 1:] = ~(sim > threshold)
    return starts.view(-1).long().cumsum(0) - 1


def dyntok_merge(tokens: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean of the tokens of each group: (N, D) -> (G, D), G = groups.max() + 1. Differentiable in ``tokens``."""
    if tokens.shape[0] != groups.shape[0]:
        raise ValueError(f"dyntok_merge: {tokens.shape[0]} tokens but {groups.shape[0]} group ids")
    g = int(groups.max()) + 1 if groups.numel() else 0
    acc = torch.zeros(g, tokens.shape[1], dtype=torch.float32, device=tokens.device)
    acc = acc.index_add(0, groups, tokens.float())  # float32 sums, whatever the token dtype
    counts = torch.bincount(groups, minlength=g).clamp_min(1).unsqueeze(1)  # (G, 1)
    return (acc / counts).to(tokens.dtype)


def dyntok_keep_index(groups: torch.Tensor) -> torch.Tensor:
    """Index (into the frame's N tokens) of the first token of each group: (G,) int64, increasing."""
    starts = torch.ones_like(groups, dtype=torch.bool)
    starts[1:] = groups[1:] != groups[:-1]
    return starts.nonzero().squeeze(1)


def dyntok_positions(groups: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(h, w) grid position of each merged token, the position of its group's first token: (G, 2) int64."""
    if groups.numel() != grid_h * grid_w:
        raise ValueError(f"dyntok_positions: {groups.numel()} group ids for a {grid_h}x{grid_w} grid")
    first = dyntok_keep_index(groups)
    return torch.stack([first // grid_w, first % grid_w], dim=1)


@dataclass
class DynTokResult:
    """Merged tokens of several frames, concatenated in frame order."""

    tokens: torch.Tensor  # (G_total, D_llm)
    positions: torch.Tensor  # (G_total, 3) int64: t (frame number), h, w
    keep_index: torch.Tensor  # (G_total,) int64 into the concatenated input tokens
    tokens_per_frame: list[int]
    tokens_before: int

    @property
    def tokens_after(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def kept_ratio(self) -> float:
        return self.tokens_after / max(self.tokens_before, 1)


def dyntok_frames(
    features: torch.Tensor,
    tokens: torch.Tensor,
    grids: list[tuple[int, int]],
    threshold: float = DYNTOK_THRESHOLD,
) -> DynTokResult:
    """DynTok on several frames (or images) whose tokens are concatenated.

    features: (N_total, D) vision features; tokens: (N_total, D_llm) projected tokens; grids: the merged (h, w) grid of
    each frame, in order (sum of h * w == N_total). Frames of different sizes (slow and fast) mix freely.

    All frames are grouped in one pass (the same rule as `dyntok_groups` per frame): a loop over frames costs a dozen
    small ops per frame, about 15 ms for 64 frames on an idle CPU but seconds when the cores are contended.
    """
    sizes = [h * w for h, w in grids]
    if sum(sizes) != features.shape[0] or features.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"dyntok_frames: grids hold {sum(sizes)} tokens, features {features.shape[0]}, tokens {tokens.shape[0]}"
        )
    if not sizes:
        return DynTokResult(
            tokens[:0], torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long), [], 0
        )
    device = features.device
    counts = torch.tensor(sizes, device=device)
    # (N,) each token's frame, and its index, row and column in that frame
    frame = torch.repeat_interleave(torch.arange(len(grids), device=device), counts)
    width = torch.tensor([w for _, w in grids], device=device)[frame]
    local = torch.arange(frame.numel(), device=device) - (counts.cumsum(0) - counts)[frame]
    row, col = local // width, local % width
    feats = features.detach().float()
    # each token against its left neighbour; the first token of a row (of a frame) always starts a group
    sim = F.cosine_similarity(feats[1:], feats[:-1], dim=-1)  # (N - 1,)
    starts = col == 0
    starts[1:] |= ~(sim > threshold)
    groups = starts.long().cumsum(0) - 1  # (N,) group ids across all frames
    keep = starts.nonzero().squeeze(1)  # (G,) first token of each group
    return DynTokResult(
        tokens=dyntok_merge(tokens, groups),
        positions=torch.stack([frame[keep], row[keep], col[keep]], dim=1),
        keep_index=keep,
        tokens_per_frame=torch.bincount(frame[keep], minlength=len(grids)).tolist(),
        tokens_before=int(tokens.shape[0]),
    )
