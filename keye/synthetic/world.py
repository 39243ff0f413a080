"""The closed world of keye's synthetic media: its vocabulary (shapes, colours, backgrounds, directions, words),
the labels of a sample (`SceneObject`, `Scene`, `VideoSpec`, `QA`, `Sample`), seeded randomness and scene layout."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GENERATOR_VERSION = 1

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
# Object colours: far apart in hue or brightness so that a 112x112 tiny ViT and an H.264 round trip keep them apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "orange": (250, 140, 30),
    "yellow": (250, 215, 40),
    "green": (40, 180, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 90, 240),
    "purple": (160, 70, 220),
    "white": (245, 245, 245),
}
# Backgrounds: "dark" ones are saturated with low value; "light" ones grey or a faint warm tint (hue near 0) with high
# value. Alternating the two at every cut makes the HSV vectors of consecutive scenes point in different directions
# (cosine <= 0.55 at any point of the gradients, with hue scaled to 255 or to 180), which is what a patch-cosine frame
# selector needs to see a cut: two saturated backgrounds of different hue, or a dark saturated one and a light tinted
# one (sand, sky), can have HSV cosine similarity above 0.7.
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], str]] = {
    "navy": ((20, 28, 80), "dark"),
    "maroon": ((80, 20, 32), "dark"),
    "plum": ((62, 25, 76), "dark"),
    "teal": ((10, 62, 68), "dark"),
    "forest": ((18, 64, 32), "dark"),
    "silver": ((205, 205, 205), "light"),
    "ivory": ((245, 240, 225), "light"),
    "rose": ((245, 220, 215), "light"),
}
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
DIGITS: tuple[str, ...] = tuple("0123456789")
# Short words that are neither a colour nor a shape name, so text questions never echo another label.
WORDS: tuple[str, ...] = (
    "cat",
    "dog",
    "sun",
    "car",
    "box",
    "hat",
    "cup",
    "key",
    "map",
    "pen",
    "fish",
    "book",
)
QTYPES: tuple[str, ...] = ("colour", "shape", "count", "motion", "order", "text")
QUESTION_STYLES: tuple[str, ...] = ("open", "mc", "caption", "mixed")
LETTERS = "ABCD"
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
# Share of each style when question_style="mixed".
MIXED_STYLE_WEIGHTS: dict[str, float] = {"open": 0.4, "mc": 0.4, "caption": 0.2}

_KIND_CODE = {"video": 1, "image": 2, "demo": 3, "cuts": 4, "static": 5}
_STREAM_LAYOUT, _STREAM_QA, _STREAM_KIND = 0, 1, 2
_DIRECTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
_MIN_RGB_DISTANCE, _MIN_LUMA_CONTRAST = 120.0, 40.0


# ----------------------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SceneObject:
    """One shape. ``size`` is the side of its bounding box in pixels; ``start``/``end`` are its centre ``(x, y)`` in
    pixels on the first and last frame of its scene (equal in images and static scenes)."""

    shape: str
    colour: str
    size: int
    start: tuple[float, float]
    end: tuple[float, float]

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    @classmethod
    def from_dict(cls, d: dict) -> SceneObject:
        return cls(**{**d, "start": tuple(d["start"]), "end": tuple(d["end"])})

    def position(self, t: float) -> tuple[float, float]:
        """Centre ``(x, y)`` at scene progress ``t`` in [0, 1] (linear motion)."""
        return (
            self.start[0] + t * (self.end[0] - self.start[0]),
            self.start[1] + t * (self.end[1] - self.start[1]),
        )


@dataclass
class Scene:
    """Frames ``[start_frame, end_frame)`` of one shot. ``motion`` is the shared direction of all its objects (None when
    nothing moves); ``text_box`` is ``(x0, y0, x1, y1)`` of the drawn text and ``text_size`` its font size in pixels."""

    start_frame: int
    end_frame: int
    background: str
    objects: list[SceneObject]
    motion: str | None = None
    text: str | None = None
    text_box: tuple[int, int, int, int] | None = None
    text_size: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        box = tuple(d["text_box"]) if d.get("text_box") is not None else None
        return cls(**{**d, "objects": [SceneObject.from_dict(o) for o in d["objects"]], "text_box": box})

    @property
    def n_frames(self) -> int:
        return self.end_frame - self.start_frame

    def progress(self, frame: int) -> float:
        """Scene progress ``t`` in [0, 1] of absolute frame index ``frame`` (0 on the first frame, 1 on the last)."""
        return (frame - self.start_frame) / (self.n_frames - 1) if self.n_frames > 1 else 0.0


@dataclass
class VideoSpec:
    """Everything `render_video_frames` needs: ``size`` is ``(H, W)``."""

    size: tuple[int, int]
    fps: float
    n_frames: int
    scenes: list[Scene]


@dataclass
class QA:
    """One question. ``answer`` is the short open answer (one word or number); ``options`` are exactly four strings
    ``"A. red"`` .. ``"D. blue"``, exactly one of which carries ``answer``; ``scene`` is the scene asked about."""

    qtype: str
    question: str
    answer: str
    options: list[str]
    answer_letter: str
    scene: int | None = None

    def is_correct(self, reply: str) -> bool:
        """Whether an open-ended reply is right: it names the true answer and no other option's value (words compared
        in lower case, punctuation ignored), so "a red diamond" is right for "red" and "red or blue" is not."""
        words = re.findall(r"[a-z0-9]+", reply.lower())
        truth = self.answer.lower()
        values = [o.split(". ", 1)[1].lower() for o in self.options]
        return truth in words and not any(v in words for v in values if v != truth)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QA:
        return cls(**d)


@dataclass
class Sample:
    """A generated image or video with its ground truth. ``size`` is ``(H, W)``; images have ``fps = duration = 0``
    and one frame. ``cut_frames[i]`` is the first frame of scene ``i + 1``; ``cut_times[i] = cut_frames[i] / fps`` is
    its presentation time."""

    id: str
    kind: str
    media: str
    duration: float
    fps: float
    size: tuple[int, int]
    n_frames: int
    scenes: list[Scene]
    caption: str
    questions: list[QA]
    seed: int
    index: int
    cut_frames: list[int] = field(default_factory=list)
    cut_times: list[float] = field(default_factory=list)
    generator_version: int = GENERATOR_VERSION

    @property
    def spec(self) -> VideoSpec:
        return VideoSpec(self.size, self.fps, self.n_frames, self.scenes)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict; `from_dict` inverts it exactly."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Sample:
        return cls(
            **{
                **d,
                "size": tuple(d["size"]),
                "scenes": [Scene.from_dict(s) for s in d["scenes"]],
                "questions": [QA.from_dict(q) for q in d["questions"]],
            }
        )


# ----------------------------------------------------------------------------------------------------------------------
# Randomness and layout
# ----------------------------------------------------------------------------------------------------------------------


def _rng(seed: int, index: int, kind: str, stream: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng(np.random.SeedSequence([seed, index, _KIND_CODE[kind], stream]))


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def colours_for_background(background: str, colours: Sequence[str] = tuple(COLOURS)) -> list[str]:
    """Object colours that stand out on ``background`` (far in RGB and in brightness)."""
    bg = BACKGROUNDS[background][0]
    return [
        c
        for c in colours
        if math.dist(COLOURS[c], bg) >= _MIN_RGB_DISTANCE
        and abs(_luma(COLOURS[c]) - _luma(bg)) >= _MIN_LUMA_CONTRAST
    ]


def _pick_backgrounds(rng: np.random.Generator, n: int) -> list[str]:
    """Alternate dark and light tones from a random first tone; never the same name twice in a row."""
    tones = {t: [name for name, (_, tone) in BACKGROUNDS.items() if tone == t] for t in ("dark", "light")}
    tone = "dark" if rng.random() < 0.5 else "light"
    out: list[str] = []
    for _ in range(n):
        out.append(str(rng.choice(tones[tone])))
        tone = "light" if tone == "dark" else "dark"
    return out


def _split_frames(rng: np.random.Generator, n_frames: int, n_scenes: int) -> list[int]:
    """Scene lengths summing to ``n_frames``, each between half and one and a half times the mean."""
    if n_scenes == 1:
        return [n_frames]
    if n_frames < 2 * n_scenes:
        raise ValueError(f"{n_frames} frames are too few for {n_scenes} scenes (need at least 2 per scene)")
    weights = rng.uniform(0.6, 1.4, n_scenes)
    min_len = max(2, n_frames // (2 * n_scenes))
    spare = n_frames - min_len * n_scenes
    lengths = [min_len + int(spare * w / weights.sum()) for w in weights]
    lengths[-1] += n_frames - sum(lengths)
    return lengths


def _font(size: int) -> ImageFont.FreeTypeFont:
    return _cached_font(max(6, int(size)))


@lru_cache(maxsize=64)
def _cached_font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow >= 10.1 ships a scalable default font, so no font file is needed.
    return ImageFont.load_default(size=size)


def _text_layout(text: str, band: tuple[int, int, int, int], rng: np.random.Generator) -> tuple[int, tuple]:
    """Font size and bounding box of ``text`` centred vertically in ``band`` at a random horizontal position."""
    x0, y0, x1, y1 = band
    fs = round(0.75 * (y1 - y0))
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    while True:
        left, top, right, bottom = probe.textbbox(
            (0, 0), text, font=_font(fs), anchor="mm", stroke_width=_stroke(fs)
        )
        if right - left <= 0.9 * (x1 - x0) or fs <= 6:
            break
        fs = int(fs * 0.9)
    half = (right - left) / 2
    cx = rng.uniform(x0 + half + 1, max(x0 + half + 1, x1 - half - 1))
    cy = (y0 + y1) / 2
    box = (round(cx + left), round(cy + top), round(cx + right), round(cy + bottom))
    return fs, box


def _stroke(font_size: int) -> int:
    # A thin outline in the fill colour thickens small glyphs for a 112x112 ViT; large glyphs need little.
    return max(1, font_size // 48)


@dataclass(frozen=True)
class _SceneParams:
    max_objects: int = 4
    text_prob: float = 0.5
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    object_scale: tuple[float, float] = (0.16, 0.24)
    motion_scale: tuple[float, float] = (0.25, 0.4)

    def validate(self) -> None:
        unknown = [s for s in self.shapes if s not in SHAPES] + [c for c in self.colours if c not in COLOURS]
        if unknown:
            raise ValueError(f"unknown shapes or colours: {unknown}")
        if not 1 <= self.max_objects <= min(len(self.shapes), 4):
            raise ValueError(f"max_objects must be in [1, min(4, len(shapes))], got {self.max_objects}")
        lo, hi = self.object_scale
        if not 0 < lo <= hi <= 0.5:
            raise ValueError(f"object_scale must satisfy 0 < lo <= hi <= 0.5, got {self.object_scale}")


def _scene_params(max_objects, text_prob, shapes, colours, object_scale) -> _SceneParams:
    scale = {} if object_scale is None else {"object_scale": (float(object_scale[0]), float(object_scale[1]))}
    params = _SceneParams(max_objects, text_prob, tuple(shapes), tuple(colours), **scale)
    params.validate()
    return params


def _make_scene(
    rng: np.random.Generator,
    size: tuple[int, int],
    start_frame: int,
    end_frame: int,
    background: str,
    *,
    moving: bool,
    p: _SceneParams,
) -> Scene:
    h, w = size
    s = min(h, w)
    # Text lives in a band at the top or bottom; objects stay out of it for the whole scene.
    area = (0.0, 0.0, float(w), float(h))
    text, text_box, text_size = None, None, None
    if rng.random() < p.text_prob:
        text = str(rng.choice(DIGITS)) if rng.random() < 0.5 else str(rng.choice(WORDS))
        band_h = round(0.3 * h)
        top = rng.random() < 0.5
        band = (0, 0, w, band_h) if top else (0, h - band_h, w, h)
        area = (0.0, float(band_h), float(w), float(h)) if top else (0.0, 0.0, float(w), float(h - band_h))
        text_size, text_box = _text_layout(text, band, rng)
    count = int(rng.integers(1, p.max_objects + 1))
    allowed = colours_for_background(background, p.colours)
    if len(allowed) < count or len(p.shapes) < count:
        raise ValueError(
            f"background {background}: too few contrasting colours or shapes for {count} objects"
        )
    obj_shapes = [str(x) for x in rng.choice(list(p.shapes), size=count, replace=False)]
    obj_colours = [str(x) for x in rng.choice(allowed, size=count, replace=False)]
    motion = str(rng.choice(DIRECTIONS)) if moving else None
    sizes = [s * rng.uniform(*p.object_scale) for _ in range(count)]
    frac = rng.uniform(*p.motion_scale)
    ax0, ay0, ax1, ay1 = area
    for attempt in range(12):  # rejection sampling; shrink everything a little after each failed round
        shrink = 0.92**attempt
        ds = [max(6, round(d * shrink)) for d in sizes]
        dx, dy = 0.0, 0.0
        if motion is not None:
            vx, vy = _DIRECTION_VECTORS[motion]
            dist = frac * ((ax1 - ax0) if vx else (ay1 - ay0)) * shrink
            dx, dy = vx * dist, vy * dist
        placed: list[tuple[float, float, int]] = []
        for d in ds:
            half = d / 2 + 1
            lo_x, hi_x = ax0 + half - min(dx, 0), ax1 - half - max(dx, 0)
            lo_y, hi_y = ay0 + half - min(dy, 0), ay1 - half - max(dy, 0)
            if lo_x > hi_x or lo_y > hi_y:
                break
            for _ in range(60):
                cx, cy = round(rng.uniform(lo_x, hi_x), 1), round(rng.uniform(lo_y, hi_y), 1)
                gap = 0.15 * d
                if all(
                    abs(cx - px) >= (d + pd) / 2 + gap or abs(cy - py) >= (d + pd) / 2 + gap
                    for px, py, pd in placed
                ):
                    placed.append((cx, cy, d))
                    break
            else:
                break
        if len(placed) == count:
            objects = [
                SceneObject(shape, colour, d, (cx, cy), (round(cx + dx, 1), round(cy + dy, 1)))
                for (cx, cy, d), shape, colour in zip(placed, obj_shapes, obj_colours)
            ]
            return Scene(start_frame, end_frame, background, objects, motion, text, text_box, text_size)
    raise RuntimeError(
        f"could not place {count} objects in a {w}x{h} frame; use a larger size or fewer objects"
    )


def _make_spec(
    rng: np.random.Generator,
    size: tuple[int, int],
    fps: float,
    n_frames: int,
    n_scenes: int,
    moving: bool,
    p: _SceneParams,
) -> VideoSpec:
    lengths = _split_frames(rng, n_frames, n_scenes)
    backgrounds = _pick_backgrounds(rng, n_scenes)
    scenes, start = [], 0
    for length, bg in zip(lengths, backgrounds):
        scenes.append(_make_scene(rng, size, start, start + length, bg, moving=moving, p=p))
        start += length
    return VideoSpec(size, fps, n_frames, scenes)
