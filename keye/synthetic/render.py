"""Drawing a `VideoSpec`: anti-aliased sprites on gradient backgrounds, frames of moving objects, object masks."""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from keye.synthetic.world import BACKGROUNDS, COLOURS, SHAPES, Scene, VideoSpec, _font, _stroke

# ----------------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------------

_SUPERSAMPLE = 4


@lru_cache(maxsize=256)
def _sprite(shape: str, colour: str, size: int) -> Image.Image:
    """An RGBA sprite of side ``size + 2`` with the shape centred, anti-aliased by 4x supersampling."""
    side = size + 2
    ss = _SUPERSAMPLE
    mask = Image.new("L", (side * ss, side * ss), 0)
    draw = ImageDraw.Draw(mask)
    c, r = side * ss / 2, size * ss / 2
    if shape == "circle":
        draw.ellipse((c - r, c - r, c + r, c + r), fill=255)
    elif shape == "square":
        draw.rectangle((c - r, c - r, c + r, c + r), fill=255)
    elif shape == "triangle":
        draw.polygon([(c, c - r), (c + r, c + r), (c - r, c + r)], fill=255)
    elif shape == "diamond":
        draw.polygon([(c, c - r), (c + r, c), (c, c + r), (c - r, c)], fill=255)
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.5 * r
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((c + rad * math.cos(a), c + rad * math.sin(a)))
        draw.polygon(pts, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    sprite = Image.new("RGBA", (side, side), COLOURS[colour] + (0,))
    sprite.putalpha(mask.resize((side, side), Image.Resampling.BOX))
    return sprite


def _background(scene: Scene, size: tuple[int, int]) -> Image.Image:
    """The scene's static layer: a soft vertical gradient of its background colour plus its text."""
    h, w = size
    rgb, tone = BACKGROUNDS[scene.background]
    # Scaling all channels keeps hue and saturation, so the gradient does not blur the dark/light contrast at cuts.
    top, bottom = (1.15, 0.85) if tone == "dark" else (1.0, 0.88)
    ramp = np.linspace(top, bottom, h, dtype=np.float32)[:, None, None]
    arr = np.clip(np.asarray(rgb, np.float32)[None, None, :] * ramp, 0, 255).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(np.broadcast_to(arr, (h, w, 3))))
    if scene.text is not None and scene.text_box is not None and scene.text_size is not None:
        fs = scene.text_size
        draw = ImageDraw.Draw(img)
        left, top, _, _ = draw.textbbox(
            (0, 0), scene.text, font=_font(fs), anchor="mm", stroke_width=_stroke(fs)
        )
        fill = (250, 250, 250) if tone == "dark" else (25, 25, 25)
        draw.text(
            (scene.text_box[0] - left, scene.text_box[1] - top),
            scene.text,
            font=_font(fs),
            anchor="mm",
            fill=fill,
            stroke_width=_stroke(fs),
            stroke_fill=fill,
        )
    return img


def _draw(bg: Image.Image, scene: Scene, t: float) -> np.ndarray:
    frame = bg.copy()
    for obj in scene.objects:
        sprite = _sprite(obj.shape, obj.colour, obj.size)
        cx, cy = obj.position(t)
        frame.paste(sprite, (round(cx - sprite.width / 2), round(cy - sprite.height / 2)), sprite)
    return np.asarray(frame)


def render_video_frames(spec: VideoSpec) -> Iterator[np.ndarray]:
    """Yield the ``spec.n_frames`` RGB uint8 frames ``(H, W, 3)`` one at a time (a 10-minute 720p clip never sits in
    memory). Frames of a scene without motion are identical."""
    for scene in spec.scenes:
        bg = _background(scene, spec.size)
        if scene.motion is None:
            frame = _draw(bg, scene, 0.0)
            for _ in range(scene.n_frames):
                yield frame.copy()
            continue
        for f in range(scene.start_frame, scene.end_frame):
            yield _draw(bg, scene, scene.progress(f))


def object_masks(spec: VideoSpec, frame: int) -> tuple[Scene, np.ndarray]:
    """The scene of frame ``frame`` and its objects' coverage ``(n_objects, H, W)`` in [0, 1] (the sprites' alpha where
    `render_video_frames` pastes them; a later object hides an earlier one): dense labels for the vision tower."""
    scene = next(s for s in spec.scenes if s.start_frame <= frame < s.end_frame)
    h, w = spec.size
    t = scene.progress(frame) if scene.motion is not None else 0.0
    masks = np.zeros((len(scene.objects), h, w), np.float32)
    for k, obj in enumerate(scene.objects):
        alpha = np.asarray(_sprite(obj.shape, obj.colour, obj.size).getchannel("A"), np.float32) / 255.0
        cx, cy = obj.position(t)
        x0, y0 = round(cx - alpha.shape[1] / 2), round(cy - alpha.shape[0] / 2)
        ys, xs = (
            slice(max(y0, 0), min(y0 + alpha.shape[0], h)),
            slice(max(x0, 0), min(x0 + alpha.shape[1], w)),
        )
        masks[k, ys, xs] = alpha[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
        masks[:k, ys, xs] *= 1.0 - masks[k, ys, xs]
    return scene, masks


def render_image(spec: VideoSpec) -> np.ndarray:
    """The single frame of an image spec (the first frame of a video spec)."""
    return next(iter(render_video_frames(VideoSpec(spec.size, spec.fps, 1, spec.scenes[:1]))))


def _write(path: Path, spec: VideoSpec, crf: int = 23) -> None:
    from keye.encoders.video import write_video

    # write_video spaces frames 1/round(fps) apart unless given explicit timestamps.
    pts = None if float(spec.fps).is_integer() else [i / spec.fps for i in range(spec.n_frames)]
    write_video(path, render_video_frames(spec), spec.fps, pts=pts, crf=crf)
