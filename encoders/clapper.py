"""Clapper's TimePerceiver (arXiv 2505.15529): learned compression of video tokens, segment by segment.

Frames are split into segments of ``segment`` (4) consecutive frames. The first frame of a segment is the keyframe and
keeps its tokens, average-pooled ``keyframe_pool`` x ``keyframe_pool`` (2x2: a quarter). The other frames of the segment
are compressed into ``queries`` (48) tokens by learned queries that cross-attend to all their tokens. With Keye's
768-token slow frames that is 192 + 48 tokens per 4 frames, 60 per frame (the paper: 196 + 48, about 61).

Everything works in the LLM's embedding space (after the projector), so the module sits between the projector and the
language model and is trained with it (pretraining stages 1-2).

Initialisation (an untrained module still gives sensible tokens): each query's output is
``pooled + out_proj(attention result)`` where ``pooled`` is the segment's non-key frames average-pooled over time and
space to the query grid (48 = 6 x 8), and ``out_proj`` starts at zero. So an untrained TimePerceiver returns plain
spatio-temporally pooled visual tokens, which the language model already reads like any pooled image tokens, and
training learns a correction on top. Gradients reach ``out_proj`` at once and the rest after its first update (the
usual zero-init residual trade-off).

Every output chunk is a grid (keyframe: pooled grid; queries: the query grid), so M-RoPE positions are built as for an
image of that grid at the frame's time; `ClapperOutput.grids` lists them.

Written with torch's ``nn.MultiheadAttention`` rather than a transformers perceiver block: ``encoders`` does not
import transformers. Not for: choosing frames (``slowfast``), training-free merging (``dyntok``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClapperConfig", "ClapperOutput", "TimePerceiver", "clapper_tokens", "query_grid"]


@dataclass
class ClapperConfig:
    """Size of the TimePerceiver. Defaults follow the paper with Keye-VL-1.5-8B's LLM width."""

    segment: int = 4  # frames per segment; the first is the keyframe
    queries: int = 48  # compressed tokens per segment for its non-key frames
    keyframe_pool: int = 2  # keyframe tokens are average-pooled with this stride (1: kept as they are)
    llm_width: int = 4096  # width of the tokens in and out (the LLM hidden size)
    hidden_size: int = 1024  # width inside the perceiver
    heads: int = 16
    layers: int = 1
    mlp_ratio: float = 4.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.segment < 1 or self.queries < 1 or self.keyframe_pool < 1 or self.layers < 0:
            raise ValueError(
                f"ClapperConfig: segment, queries, keyframe_pool must be >= 1, layers >= 0: {self}"
            )
        if self.hidden_size % self.heads:
            raise ValueError(
                f"ClapperConfig: hidden_size {self.hidden_size} not divisible by heads {self.heads}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClapperConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"ClapperConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


def query_grid(queries: int) -> tuple[int, int]:
    """The (h, w) grid the queries stand for: the most square factorisation, h <= w (48 -> 6 x 8)."""
    h = int(math.isqrt(queries))
    while queries % h:
        h -= 1
    return h, queries // h


def _pooled_grid(h: int, w: int, pool: int) -> tuple[int, int]:
    return -(-h // pool), -(-w // pool)


def clapper_tokens(frame_grids: list[tuple[int, int]], config: ClapperConfig | None = None) -> int:
    """Tokens the TimePerceiver outputs for frames with these merged-token grids (h, w), in order."""
    cfg = config or ClapperConfig()
    total = 0
    for s in range(0, len(frame_grids), cfg.segment):
        h, w = frame_grids[s]
        kh, kw = _pooled_grid(h, w, cfg.keyframe_pool)
        total += kh * kw + (cfg.queries if len(frame_grids) - s > 1 else 0)
    return total


@dataclass
class ClapperOutput:
    tokens: torch.Tensor  # (T_out, llm_width), segments in order: keyframe tokens then query tokens
    grids: list[tuple[int, int, int]]  # (frame number, h, w) of each output chunk, in order
    tokens_per_segment: list[int]


class _Block(nn.Module):
    """Pre-norm cross-attention (queries -> frame tokens) then MLP, both residual."""

    def __init__(self, cfg: ClapperConfig):
        super().__init__()
        self.norm_q = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.norm_kv = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.attn = nn.MultiheadAttention(cfg.hidden_size, cfg.heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        inner = int(cfg.hidden_size * cfg.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.hidden_size, inner), nn.GELU(), nn.Linear(inner, cfg.hidden_size)
        )

    def forward(self, q: torch.Tensor, kv: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        # q: (S, Q, hidden), kv: (S, L, hidden), pad: (S, L) True where padding
        kv = self.norm_kv(kv)
        q = q + self.attn(self.norm_q(q), kv, kv, key_padding_mask=pad, need_weights=False)[0]
        return q + self.mlp(self.norm_mlp(q))


class TimePerceiver(nn.Module):
    """Compresses each segment's non-key frames into ``queries`` tokens; keyframes are pooled."""

    def __init__(self, config: ClapperConfig | None = None):
        super().__init__()
        self.config = cfg = config or ClapperConfig()
        self.query_hw = query_grid(cfg.queries)
        self.queries = nn.Parameter(torch.randn(cfg.queries, cfg.hidden_size) * 0.02)  # (Q, hidden)
        # which non-key frame of the segment a key/value token comes from
        self.frame_embed = nn.Parameter(torch.zeros(max(cfg.segment - 1, 1), cfg.hidden_size))
        self.in_kv = nn.Linear(cfg.llm_width, cfg.hidden_size)
        self.in_q = nn.Linear(cfg.llm_width, cfg.hidden_size)  # queries start from the pooled tokens
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.norm_out = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.llm_width)
        nn.init.zeros_(self.out_proj.weight)  # untrained: output == pooled tokens (see module docstring)
        nn.init.zeros_(self.out_proj.bias)

    def _pool(
        self, tokens: torch.Tensor, hw: tuple[int, int], out_hw: tuple[int, int] | None, stride: int = 1
    ):
        """(h*w, D) -> (h'*w', D), average pooling on the token grid (adaptive to out_hw, or by stride)."""
        h, w = hw
        grid = tokens.t().reshape(1, -1, h, w)  # (1, D, h, w)
        if out_hw is None:
            if stride == 1:
                return tokens
            grid = F.avg_pool2d(grid, stride, stride, ceil_mode=True)
        else:
            grid = F.adaptive_avg_pool2d(grid, out_hw)
        return grid.flatten(2)[0].t()

    def forward(self, frames: list[torch.Tensor], grids: list[tuple[int, int]]) -> ClapperOutput:
        """frames[i]: (h_i * w_i, llm_width) tokens of frame i in raster order; grids[i] = (h_i, w_i)."""
        cfg = self.config
        if len(frames) != len(grids) or any(f.shape[0] != h * w for f, (h, w) in zip(frames, grids)):
            raise ValueError("TimePerceiver: each frame needs h * w tokens for its grid")
        keys, pooled, seg_ids = [], [], []
        for s in range(0, len(frames), cfg.segment):
            rest = list(range(s + 1, min(s + cfg.segment, len(frames))))
            if not rest:
                continue
            seg_ids.append(s)
            pooled.append(torch.stack([self._pool(frames[i], grids[i], self.query_hw) for i in rest]).mean(0))
            # (L_s, hidden): every token of the segment's other frames, tagged with its frame
            keys.append(torch.cat([self.in_kv(frames[i]) + self.frame_embed[i - s - 1] for i in rest]))
        compressed = {}
        if seg_ids:
            pooled_t = torch.stack(pooled)  # (S, Q, llm_width)
            kv = nn.utils.rnn.pad_sequence(keys, batch_first=True)  # (S, L_max, hidden)
            lengths = torch.tensor([k.shape[0] for k in keys], device=kv.device)
            pad = torch.arange(kv.shape[1], device=kv.device)[None] >= lengths[:, None]  # (S, L_max)
            q = self.queries[None] + self.in_q(pooled_t)  # (S, Q, hidden)
            for block in self.blocks:
                q = block(q, kv, pad)
            out = pooled_t + self.out_proj(self.norm_out(q))  # (S, Q, llm_width)
            compressed = dict(zip(seg_ids, out.unbind(0)))
        tokens, out_grids, per_segment = [], [], []
        qh, qw = self.query_hw
        for s in range(0, len(frames), cfg.segment):
            key = self._pool(frames[s], grids[s], None, cfg.keyframe_pool)
            tokens.append(key)
            out_grids.append((s, *_pooled_grid(*grids[s], cfg.keyframe_pool)))
            n = key.shape[0]
            if s in compressed:
                tokens.append(compressed[s])
                out_grids.append((s + 1, qh, qw))
                n += cfg.queries
            per_segment.append(n)
        return ClapperOutput(torch.cat(tokens), out_grids, per_segment)
