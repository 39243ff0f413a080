"""A film strip of a video's sampled frames: thumbnails in time order, marked slow (green) or fast (orange),
each labelled with its timestamp and token count. Used by ``keye frames --plot`` and the demo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SLOW, FAST = (46, 160, 67), (230, 140, 20)


def filmstrip(plan, frames: list[np.ndarray], *, thumb: int = 96, per_row: int = 8) -> Image.Image:
    """Render ``plan.frames`` (a `VideoPlan`) with their pixels ``frames`` into one RGB image."""
    n = len(frames)
    rows = max(1, -(-n // per_row))
    cols = min(per_row, max(1, n))
    label_h, pad = 16, 4
    cell_w, cell_h = thumb + 2 * pad, thumb + label_h + 2 * pad
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for i, (f, px) in enumerate(zip(plan.frames, frames)):
        x0, y0 = (i % per_row) * cell_w, (i // per_row) * cell_h
        img = Image.fromarray(px)
        img.thumbnail((thumb, thumb))
        colour = SLOW if f.kind == "slow" else FAST
        draw.rectangle([x0 + 1, y0 + 1, x0 + cell_w - 2, y0 + thumb + 2 * pad - 2], outline=colour, width=3)
        sheet.paste(img, (x0 + pad + (thumb - img.width) // 2, y0 + pad + (thumb - img.height) // 2))
        draw.text(
            (x0 + pad, y0 + thumb + 2 * pad), f"{f.time:.1f}s {f.kind} {f.tokens}t", fill=colour, font=font
        )
    return sheet


def save_filmstrip(plan, frames: list[np.ndarray], path: str | Path, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    filmstrip(plan, frames, **kw).save(path)
    return path
