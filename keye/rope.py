"""3D multimodal RoPE (M-RoPE) position ids for a Keye prompt.

Every token gets a (temporal, height, width) index triple:

- text tokens: the same index on all three axes, one more than the largest index so far. A text-only prompt therefore
  gets ``0, 1, 2, ...`` on every axis, which makes M-RoPE exactly ordinary 1D RoPE;
- an image (or one video frame) of ``h x w`` merged tokens starting at ``s`` (one more than the largest index so
  far): height ``s + row``, width ``s + col``, temporal ``s``;
- video frames and absolute time (``tokens_per_second`` set): the temporal index of every token of a frame at time
  ``t`` seconds is ``v + round((t - t0) * tokens_per_second)``, where ``v`` is the start of the video's first frame and
  ``t0`` that frame's time. Frames 0.5 s apart are one temporal step apart at 2 tokens/s whatever their token counts,
  so the model can read elapsed time off the temporal axis. ``tokens_per_second=None`` keeps Keye-VL-1.5's released
  behaviour (temporal index = ``s``, as for images).
- compressed frames (DynTok) may place their tokens at explicit (row, col) places of their grid instead of filling it;
  the next span still starts after the whole grid, so such positions are a subset of the full grid's layout.

The processor describes the prompt as a list of spans while it builds the token ids (and keeps them as a
`PromptLayout`), so nothing here re-parses ids; compression (`keye.compression`) rewrites the spans and recomputes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextSpan:
    length: int


@dataclass
class VisionSpan:
    """One image or one video frame: ``grid_h x grid_w`` merged tokens (or ``len(hw)`` tokens at explicit places)."""

    grid_h: int
    grid_w: int
    time: float | None = None  # seconds, video frames only
    video: int | None = None  # index of the video the frame belongs to
    hw: torch.Tensor | None = None  # (num_tokens, 2) explicit (row, col) per token, else the full grid

    @property
    def length(self) -> int:
        return len(self.hw) if self.hw is not None else self.grid_h * self.grid_w


@dataclass
class PromptLayout:
    """One processed sequence as `mrope_positions` sees it: its spans in order and the time rule it was built with."""

    spans: list[TextSpan | VisionSpan]
    tokens_per_second: float | None

    def positions(self) -> torch.Tensor:
        return mrope_positions(self.spans, self.tokens_per_second)  # (3, T)


def mrope_positions(spans: list[TextSpan | VisionSpan], tokens_per_second: float | None) -> torch.Tensor:
    """Position ids ``(3, sum of span lengths)`` for one sequence; see the module docstring for the rules."""
    out: list[torch.Tensor] = []
    next_pos = 0
    video_origin: dict[int, tuple[int, float]] = {}  # video index -> (start index, time of its first frame)
    for span in spans:
        if isinstance(span, TextSpan):
            out.append(torch.arange(next_pos, next_pos + span.length).expand(3, -1))
            next_pos += span.length
            continue
        if span.hw is not None:
            rows, cols = span.hw[:, 0].long(), span.hw[:, 1].long()
        else:
            rows = torch.arange(span.grid_h).repeat_interleave(span.grid_w)
            cols = torch.arange(span.grid_w).repeat(span.grid_h)
        start = next_pos
        temporal = start
        if span.video is not None and tokens_per_second is not None:
            origin, t0 = video_origin.setdefault(span.video, (start, span.time))
            temporal = origin + int(round((span.time - t0) * tokens_per_second))
        pos = torch.stack([torch.full_like(rows, temporal), rows + start, cols + start])  # (3, n)
        out.append(pos)
        # after the whole grid, whether or not every place holds a token (the largest index of a full grid)
        next_pos = max(temporal, start + max(span.grid_h, span.grid_w) - 1) + 1
    if not out:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(out, dim=1).long()
