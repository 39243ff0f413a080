"""Seeded synthetic videos and images of moving shapes, with known labels, captions and questions.

The generator behind keye's tests, demo, benchmarks, tiny pretraining runs and sanity evaluations. Every sample is
drawn from a small closed world whose ground truth is exact:

- **objects**: 1-4 shapes (``SHAPES``) of distinct named colours (``COLOURS``) and distinct shapes per scene, so
  "the square" and "the red object" are unambiguous; objects never overlap, and in a video all objects of a scene move
  together in one direction (``DIRECTIONS``), so they never collide;
- **scenes**: a video is 1-3 scenes (``n_scenes``) cut hard from one to the next. Consecutive scenes alternate a dark
  saturated and a light unsaturated background (``BACKGROUNDS``), so a cut changes most 28x28 patches both in pixels
  and in HSV cosine similarity (at least 87% of patches over a sweep of seeds), while frames of a scene without motion
  (`make_static_video`, `make_scene_cut_video`) are identical;
- **text**: a digit or a short word (``WORDS``) drawn large in a band at the top or bottom of some scenes.

A `Sample` holds the media path, the scene labels (`Scene`, `SceneObject`), the cut frames and times, a one-sentence
caption and a list of `QA` items (``qtype`` in colour, shape, count, motion, order, text; each with an open answer and
four lettered options). `write_manifest` turns samples into keye's JSONL chat manifests; `generate_dataset` does both.

Determinism: a sample depends only on ``(seed, index, kind)`` and the keyword arguments; its random streams are
``numpy.random.SeedSequence([seed, index, kind, stream])``, so the same arguments give byte-identical labels and
identical rendered frames on any machine (PNG files too; H.264 files are byte-identical for the same PyAV/x264 build),
and ``generate_dataset(seed=0)`` and ``generate_dataset(seed=1)`` share no sample id (``syn-video-<seed>-<index>``)
and draw independent content. Layout and questions use separate streams, so changing the question templates does not
move a single pixel. Changing this module's drawing code changes outputs: `GENERATOR_VERSION` is recorded in every
sample.

Not for real-world data, decoding (``keye.encoders.video``) or frame selection; it only writes files.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

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


# ----------------------------------------------------------------------------------------------------------------------
# Captions and questions
# ----------------------------------------------------------------------------------------------------------------------


def _ordinal(n: int) -> str:
    if n <= len(_ORDINALS):
        return _ORDINALS[n - 1]
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _text_phrase(text: str) -> str:
    return f"the number {text}" if text.isdigit() else f"the word {text}"


def _scene_clause(scene: Scene, capital: bool) -> str:
    objs = _join([_a(f"{o.colour} {o.shape}") for o in scene.objects])
    if capital:
        objs = objs[0].upper() + objs[1:]
    clause = objs
    if scene.motion is not None:
        verb = "moves" if len(scene.objects) == 1 else "move"
        clause += f" {verb} {scene.motion}"
    clause += f" on {_a(scene.background)} background"
    if scene.text is not None:
        clause += f", with {_text_phrase(scene.text)} on screen"
    return clause


def make_caption(scenes: Sequence[Scene]) -> str:
    """One sentence describing every scene in order."""
    if len(scenes) == 1:
        return _scene_clause(scenes[0], capital=True) + "."
    parts = [f"First, {_scene_clause(scenes[0], False)}"]
    parts += [f"then, {_scene_clause(s, False)}" for s in scenes[1:-1]]
    parts.append(f"{'finally' if len(scenes) > 2 else 'then'}, {_scene_clause(scenes[-1], False)}")
    return "; ".join(parts) + "."


def _options(rng: np.random.Generator, answer: str, preferred: Iterable[str], vocab: Iterable[str]):
    """Four shuffled options: the answer, distractors from ``preferred`` first (hard negatives), then from ``vocab``."""
    values = [answer]
    for pool in (list(preferred), list(vocab)):
        pool = [v for v in dict.fromkeys(pool) if v not in values]
        for i in rng.permutation(len(pool)):
            if len(values) == 4:
                break
            values.append(pool[i])
    if len(values) != 4:
        raise ValueError(f"not enough distinct options for answer {answer!r}")
    values = [values[i] for i in rng.permutation(4)]
    letter = LETTERS[values.index(answer)]
    return [f"{L}. {v}" for L, v in zip(LETTERS, values)], letter


def _qa(rng, qtype: str, question: str, answer: str, preferred, vocab, scene: int | None) -> QA:
    options, letter = _options(rng, answer, preferred, vocab)
    return QA(qtype, question, answer, options, letter, scene)


def make_questions(
    rng: np.random.Generator, kind: str, scenes: Sequence[Scene], max_objects: int = 4
) -> list[QA]:
    """One question per applicable qtype (motion and order only for videos; order needs two scenes; text needs a
    scene with text). In multi-scene videos, scene-bound questions start with "In the second scene, "."""
    multi = len(scenes) > 1
    medium = "video" if kind == "video" else "image"

    def ask(k: int, q: str) -> str:
        return f"In the {_ordinal(k + 1)} scene, {q[0].lower()}{q[1:]}" if multi else q

    def pick_scene(candidates: Sequence[int] | None = None) -> int:
        candidates = list(range(len(scenes))) if candidates is None else list(candidates)
        return int(candidates[rng.integers(len(candidates))])

    qas: list[QA] = []
    k = pick_scene()
    obj = scenes[k].objects[rng.integers(len(scenes[k].objects))]
    others = [o.colour for o in scenes[k].objects]
    qas.append(_qa(rng, "colour", ask(k, f"What colour is the {obj.shape}?"), obj.colour, others, COLOURS, k))

    k = pick_scene()
    obj = scenes[k].objects[rng.integers(len(scenes[k].objects))]
    others = [o.shape for o in scenes[k].objects]
    qas.append(
        _qa(
            rng,
            "shape",
            ask(k, f"What is the shape of the {obj.colour} object?"),
            obj.shape,
            others,
            SHAPES,
            k,
        )
    )

    k = pick_scene()
    n = len(scenes[k].objects)
    top = max(4, max_objects)
    lo = int(rng.integers(max(1, n - 3), min(n, top - 3) + 1))
    counts = [str(i) for i in range(lo, lo + 4)]
    q = f"How many shapes are in the {medium}?" if not multi else ask(k, "How many shapes are there?")
    qas.append(_qa(rng, "count", q, str(n), counts, counts, k))

    moving = [i for i, s in enumerate(scenes) if s.motion is not None]
    if kind == "video" and moving:
        k = pick_scene(moving)
        sc = scenes[k]
        if len(sc.objects) == 1 or rng.random() < 0.5:
            obj = sc.objects[rng.integers(len(sc.objects))]
            q = f"In which direction does the {obj.colour} {obj.shape} move?"
        else:
            q = "In which direction do the shapes move?"
        qas.append(_qa(rng, "motion", ask(k, q), sc.motion, DIRECTIONS, DIRECTIONS, k))

    if kind == "video" and multi:
        order = _order_question(rng, scenes)
        if order is not None:
            qas.append(order)

    with_text = [i for i, s in enumerate(scenes) if s.text is not None]
    if with_text:
        k = pick_scene(with_text)
        text = scenes[k].text
        where = "on the screen" if kind == "video" else "in the image"
        if text.isdigit():
            q, vocab = f"What number is shown {where}?", DIGITS
        else:
            q, vocab = f"What word is written {where}?", WORDS
        qas.append(_qa(rng, "text", ask(k, q), text, vocab, vocab, k))
    return qas


def _order_question(rng: np.random.Generator, scenes: Sequence[Scene]) -> QA | None:
    """'Which X appears first, a or b?' where a first appears in an earlier scene than b (None if no such pair)."""
    # White is left out of colour order questions: white text on a dark background would make "white" ambiguous.
    getters = {
        "shape": (lambda s: [o.shape for o in s.objects], SHAPES),
        "colour": (
            lambda s: [o.colour for o in s.objects if o.colour != "white"],
            tuple(c for c in COLOURS if c != "white"),
        ),
        "background": (lambda s: [s.background], tuple(BACKGROUNDS)),
    }
    candidates = []
    for attr, (get, vocab) in getters.items():
        first: dict[str, int] = {}
        for k, s in enumerate(scenes):
            for v in get(s):
                first.setdefault(v, k)
        pairs = [(a, b) for a in first for b in first if first[a] < first[b]]
        if pairs:
            candidates.append((attr, pairs, vocab))
    if not candidates:
        return None
    attr, pairs, vocab = candidates[rng.integers(len(candidates))]
    a, b = pairs[rng.integers(len(pairs))]
    x, y = (a, b) if rng.random() < 0.5 else (b, a)
    question = {
        "shape": f"Which shape appears first in the video, the {x} or the {y}?",
        "colour": f"Which colour appears first in the video, {x} or {y}?",
        "background": f"Which background colour comes first in the video, {x} or {y}?",
    }[attr]
    return _qa(rng, "order", question, a, [b], vocab, None)


# ----------------------------------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------------------------------


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    h, w = int(size[0]), int(size[1])
    if h < 56 or w < 56 or h % 2 or w % 2:
        raise ValueError(f"size must be (H, W) with even sides >= 56 (H.264 4:2:0), got {tuple(size)}")
    return h, w


def make_video_spec(
    seed: int,
    *,
    index: int = 0,
    size: tuple[int, int] = (112, 112),
    fps: float = 8,
    duration: float = 4.0,
    n_scenes: int | None = None,
    max_objects: int = 4,
    text_prob: float = 0.5,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    object_scale: Sequence[float] | None = None,
) -> VideoSpec:
    """The labels of video ``(seed, index)`` without rendering anything (see `make_video_sample`)."""
    size = _check_size(size)
    params = _scene_params(max_objects, text_prob, shapes, colours, object_scale)
    rng = _rng(seed, index, "video", _STREAM_LAYOUT)
    if n_scenes is None:
        n_scenes = int(rng.integers(1, 4))
    n_frames = max(1, round(duration * fps))
    return _make_spec(rng, size, fps, n_frames, n_scenes, True, params)


def make_image_spec(
    seed: int,
    *,
    index: int = 0,
    size: tuple[int, int] = (112, 112),
    max_objects: int = 4,
    text_prob: float = 0.5,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    object_scale: Sequence[float] | None = None,
) -> VideoSpec:
    """The labels of image ``(seed, index)`` (one still scene, ``fps = 0``, one frame) without rendering anything."""
    size = _check_size(size)
    params = _scene_params(max_objects, text_prob, shapes, colours, object_scale)
    return _make_spec(_rng(seed, index, "image", _STREAM_LAYOUT), size, 0.0, 1, 1, False, params)


def make_video_sample(
    out_dir: str | Path,
    seed: int,
    *,
    index: int = 0,
    size: tuple[int, int] = (112, 112),
    fps: float = 8,
    duration: float = 4.0,
    n_scenes: int | None = None,
    max_objects: int = 4,
    text_prob: float = 0.5,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    object_scale: Sequence[float] | None = None,
    crf: int = 23,
) -> Sample:
    """Write ``<out_dir>/<id>.mp4`` (H.264) and return its `Sample`; the id is ``syn-video-<seed>-<index>``.

    ``size`` is ``(H, W)`` with even sides; ``duration * fps`` is rounded to whole frames; ``n_scenes`` None draws 1,
    2 or 3 scenes uniformly; each scene has 1..``max_objects`` objects and text with probability ``text_prob``; an
    object's side is drawn from ``object_scale`` (fractions of the shorter frame side; None: 0.16-0.24). The sample
    depends only on ``(seed, index)`` and these arguments.
    """
    spec = make_video_spec(
        seed,
        index=index,
        size=size,
        fps=fps,
        duration=duration,
        n_scenes=n_scenes,
        max_objects=max_objects,
        text_prob=text_prob,
        shapes=shapes,
        colours=colours,
        object_scale=object_scale,
    )
    sample_id = f"syn-video-{seed}-{index:06d}"
    path = Path(out_dir) / f"{sample_id}.mp4"
    _write(path, spec, crf)
    qas = make_questions(_rng(seed, index, "video", _STREAM_QA), "video", spec.scenes, max_objects)
    return _sample(sample_id, "video", path, spec, qas, seed, index)


def make_image_sample(
    out_dir: str | Path,
    seed: int,
    *,
    index: int = 0,
    size: tuple[int, int] = (112, 112),
    max_objects: int = 4,
    text_prob: float = 0.5,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    object_scale: Sequence[float] | None = None,
) -> Sample:
    """Write ``<out_dir>/<id>.png`` (one still scene) and return its `Sample` (id ``syn-image-<seed>-<index>``)."""
    spec = make_image_spec(
        seed,
        index=index,
        size=size,
        max_objects=max_objects,
        text_prob=text_prob,
        shapes=shapes,
        colours=colours,
        object_scale=object_scale,
    )
    sample_id = f"syn-image-{seed}-{index:06d}"
    path = Path(out_dir) / f"{sample_id}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_image(spec)).save(path)
    qas = make_questions(_rng(seed, index, "image", _STREAM_QA), "image", spec.scenes, max_objects)
    return _sample(sample_id, "image", path, spec, qas, seed, index)


def _sample(
    sample_id: str, kind: str, path: Path, spec: VideoSpec, qas: list[QA], seed: int, index: int
) -> Sample:
    cut_frames = [s.start_frame for s in spec.scenes[1:]]
    return Sample(
        id=sample_id,
        kind=kind,
        media=str(path),
        duration=spec.n_frames / spec.fps if spec.fps else 0.0,
        fps=float(spec.fps),
        size=spec.size,
        n_frames=spec.n_frames,
        scenes=spec.scenes,
        caption=make_caption(spec.scenes),
        questions=qas,
        seed=seed,
        index=index,
        cut_frames=cut_frames,
        cut_times=[f / spec.fps for f in cut_frames] if spec.fps else [],
    )


def make_demo_video(
    path: str | Path,
    *,
    seed: int = 0,
    duration: float = 10.0,
    size: tuple[int, int] = (360, 640),
    fps: float = 24,
    scene_seconds: float = 3.5,
    crf: int = 23,
) -> Sample:
    """A demo or benchmark clip: moving anti-aliased shapes, a hard cut about every ``scene_seconds`` and large text.

    Streams frame by frame, so ``duration=600, size=(720, 1280)`` needs no more memory than a short clip. Returns the
    clip's `Sample` (labels, caption and questions; id ``demo-<seed>``)."""
    size = _check_size(size)
    rng = _rng(seed, 0, "demo", _STREAM_LAYOUT)
    n_frames = max(1, round(duration * fps))
    n_scenes = max(1, min(round(duration / scene_seconds), n_frames // 2))
    params = _SceneParams(text_prob=0.6, object_scale=(0.14, 0.2))
    spec = _make_spec(rng, size, fps, n_frames, n_scenes, True, params)
    path = Path(path)
    _write(path, spec, crf)
    qas = make_questions(_rng(seed, 0, "demo", _STREAM_QA), "video", spec.scenes)
    return _sample(f"demo-{seed}", "video", path, spec, qas, seed, 0)


def make_scene_cut_video(
    path: str | Path,
    cut_times: Sequence[float],
    *,
    duration: float = 4.0,
    size: tuple[int, int] = (112, 112),
    fps: float = 8,
    seed: int = 0,
    moving: bool = False,
    crf: int = 23,
) -> list[float]:
    """Write a video with hard cuts near ``cut_times`` (seconds) and return the true cut times.

    Each cut is snapped to the frame grid: the returned ``k / fps`` is the presentation time of the first frame of the
    new scene. With ``moving=False`` every scene is static, so its frames are identical and only the cuts change
    anything; consecutive scenes alternate dark and light backgrounds so a cut changes nearly every 28x28 patch.
    """
    size = _check_size(size)
    n_frames = max(1, round(duration * fps))
    frames = [round(t * fps) for t in cut_times]
    bounds = [0, *frames, n_frames]
    if any(b - a < 1 for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"cut_times {list(cut_times)} must be increasing, on distinct frames, inside (0, {duration}) s"
        )
    rng = _rng(seed, 0, "cuts", _STREAM_LAYOUT)
    backgrounds = _pick_backgrounds(rng, len(bounds) - 1)
    scenes = [
        _make_scene(rng, size, a, b, bg, moving=moving, p=_SceneParams())
        for a, b, bg in zip(bounds, bounds[1:], backgrounds)
    ]
    _write(Path(path), VideoSpec(size, fps, n_frames, scenes), crf)
    return [f / fps for f in frames]


def make_static_video(
    path: str | Path,
    *,
    duration: float = 4.0,
    size: tuple[int, int] = (112, 112),
    fps: float = 8,
    seed: int = 0,
    background: str | None = None,
    crf: int = 23,
) -> Path:
    """Write one still scene repeated for ``duration`` seconds (consecutive frames identical up to coding noise).

    ``background`` picks a name from ``BACKGROUNDS`` (random when None), or ``"black"`` for empty all-black frames
    (the divide-by-zero case of patch similarity)."""
    size = _check_size(size)
    n_frames = max(1, round(duration * fps))
    path = Path(path)
    if background == "black":
        h, w = size
        from keye.encoders.video import write_video

        write_video(path, (np.zeros((h, w, 3), np.uint8) for _ in range(n_frames)), fps, crf=crf)
        return path
    if background is not None and background not in BACKGROUNDS:
        raise ValueError(
            f"unknown background {background!r}; expected 'black' or one of {tuple(BACKGROUNDS)}"
        )
    rng = _rng(seed, 0, "static", _STREAM_LAYOUT)
    bg = background if background is not None else _pick_backgrounds(rng, 1)[0]
    scene = _make_scene(rng, size, 0, n_frames, bg, moving=False, p=_SceneParams())
    _write(path, VideoSpec(size, fps, n_frames, [scene]), crf)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Manifests and datasets
# ----------------------------------------------------------------------------------------------------------------------


def format_prompt(qa: QA, style: str) -> tuple[str, str]:
    """``(user text, assistant text)`` of ``qa`` in ``style`` "open" (question -> short answer) or "mc" (question,
    the four options on their own lines, `MC_SUFFIX` -> letter)."""
    if style == "open":
        return qa.question, qa.answer
    if style == "mc":
        return "\n".join([qa.question, *qa.options, MC_SUFFIX]), qa.answer_letter
    raise ValueError(f"unknown question style {style!r}; expected 'open' or 'mc'")


def _line(sample: Sample, media: str, qtype: str, user: str, answer: str, meta: dict, line_id: str) -> dict:
    part = {"type": sample.kind, sample.kind: media}
    return {
        "id": line_id,
        "messages": [
            {"role": "user", "content": [part, {"type": "text", "text": user}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "meta": {"qtype": qtype, **meta, "source": "synthetic", "seed": sample.seed, "index": sample.index},
    }


def _question_line(sample: Sample, media: str, qa: QA, style: str, line_id: str) -> dict:
    user, answer = format_prompt(qa, style)
    meta = {"answer": qa.answer, "options": qa.options, "answer_letter": qa.answer_letter, "style": style}
    return _line(sample, media, qa.qtype, user, answer, meta, line_id)


def _caption_line(sample: Sample, media: str, line_id: str) -> dict:
    meta = {"answer": sample.caption, "options": [], "answer_letter": None, "style": "caption"}
    return _line(sample, media, "caption", f"Describe the {sample.kind}.", sample.caption, meta, line_id)


def manifest_lines(
    samples: Iterable[Sample],
    manifest_dir: str | Path,
    *,
    question_style: str = "mixed",
    seed: int = 0,
    per_sample: str = "one",
    qtypes: Sequence[str] | None = None,
) -> Iterator[dict]:
    """The manifest records `write_manifest` writes (see there), as dicts."""
    if question_style not in QUESTION_STYLES:
        raise ValueError(f"unknown question_style {question_style!r}; expected one of {QUESTION_STYLES}")
    if per_sample not in ("one", "all"):
        raise ValueError(f"per_sample must be 'one' or 'all', got {per_sample!r}")
    unknown = set(qtypes or ()) - {*QTYPES, "caption"}
    if unknown:
        raise ValueError(f"unknown qtypes {sorted(unknown)}; expected some of {(*QTYPES, 'caption')}")
    captions = qtypes is None or "caption" in qtypes
    if question_style == "caption" and not captions:
        raise ValueError(f"question_style='caption' but qtypes {list(qtypes or ())} excludes 'caption'")
    mixed = {k: v for k, v in MIXED_STYLE_WEIGHTS.items() if captions or k != "caption"}
    styles, weights = list(mixed), np.array(list(mixed.values()))
    manifest_dir = Path(manifest_dir)
    for sample in samples:
        rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(sample.id.encode())]))
        media = Path(os.path.relpath(sample.media, manifest_dir)).as_posix()
        qas = [q for q in sample.questions if qtypes is None or q.qtype in qtypes]

        if per_sample == "one":
            style = question_style
            if style == "mixed":
                style = str(rng.choice(styles, p=weights / weights.sum()))
            if style == "caption":
                yield _caption_line(sample, media, sample.id)
            elif qas:  # a sample whose questions the qtypes filter removed gets no line
                yield _question_line(sample, media, qas[rng.integers(len(qas))], style, sample.id)
            continue
        if captions and question_style in ("caption", "mixed"):
            yield _caption_line(sample, media, f"{sample.id}-caption")
        if question_style != "caption":
            for qa in qas:
                style = (
                    question_style if question_style != "mixed" else ("open" if rng.random() < 0.5 else "mc")
                )
                yield _question_line(sample, media, qa, style, f"{sample.id}-{qa.qtype}")


def write_manifest(
    samples: Iterable[Sample],
    path: str | Path,
    *,
    question_style: str = "mixed",
    seed: int = 0,
    per_sample: str = "one",
    qtypes: Sequence[str] | None = None,
) -> Path:
    """Write a JSONL chat manifest, one training example per line, media paths relative to the manifest's folder::

        {"id": "syn-video-0-000003",
         "messages": [{"role": "user", "content": [{"type": "video", "video": "media/syn-video-0-000003.mp4"},
                                                   {"type": "text", "text": "What colour is the square?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
         "meta": {"qtype": "colour", "answer": "red", "options": ["A. blue", "B. red", ...], "answer_letter": "B",
                  "style": "open", "source": "synthetic", "seed": 0, "index": 3}}

    Images use ``{"type": "image", "image": "media/x.png"}``. ``question_style``: "open" (short answer), "mc" (options
    on separate lines after the question, then `MC_SUFFIX`; the answer is the letter), "caption" ("Describe the
    video." -> caption; qtype "caption", no options) or "mixed" (each line draws a style with `MIXED_STYLE_WEIGHTS`).
    ``per_sample="one"`` writes one line per sample (id = the sample's id) with a question drawn at random; "all" writes
    one line per question (plus a caption line for "caption"/"mixed"), ids suffixed with the qtype. ``qtypes`` keeps
    only those question types, "caption" included (a curriculum: colour first, order last; None keeps all); a sample
    left without questions gets no line. Choices depend only on ``seed`` and each sample's id.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = manifest_lines(
        samples, path.parent, question_style=question_style, seed=seed, per_sample=per_sample, qtypes=qtypes
    )
    with open(path, "w") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
    return path


def load_samples(path: str | Path) -> list[Sample]:
    """Read the ``samples.jsonl`` that `generate_dataset` writes (one `Sample.to_dict` per line)."""
    with open(path) as fh:
        return [Sample.from_dict(json.loads(line)) for line in fh if line.strip()]


def _dataset_item(args: tuple) -> Sample:
    media_dir, seed, i, kind, kw = args
    if kind == "video":
        return make_video_sample(media_dir, seed, index=i, **kw["video"])
    return make_image_sample(media_dir, seed, index=i, **kw["image"])


def generate_dataset(
    out_dir: str | Path,
    *,
    seed: int,
    n: int,
    kinds: Sequence[str] = ("video", "image"),
    video_share: float = 0.5,
    question_style: str = "mixed",
    size: tuple[int, int] = (112, 112),
    fps: float = 8,
    duration: float = 4.0,
    n_scenes: int | None = None,
    max_objects: int = 4,
    text_prob: float = 0.5,
    object_scale: Sequence[float] | None = None,
    per_sample: str = "one",
    workers: int = 1,
    progress: bool = True,
    qtypes: Sequence[str] | None = None,
) -> Path:
    """Write ``n`` samples to ``<out_dir>/media/``, their full labels to ``<out_dir>/samples.jsonl`` and a chat
    manifest (`write_manifest`, same ``seed``, ``per_sample`` and ``qtypes``) to ``<out_dir>/manifest.jsonl``; return
    the manifest path.

    Sample ``i`` is a video with probability ``video_share`` when both kinds are allowed (drawn from ``(seed, i)``)
    and is made by `make_video_sample` / `make_image_sample` with ``index=i``, so it is the same whatever ``n`` is and
    however many ``workers`` (processes) share the work.
    """
    from tqdm.auto import tqdm

    unknown = set(kinds) - {"video", "image"}
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of ('video', 'image'), got {tuple(kinds)}")
    if question_style not in QUESTION_STYLES:
        raise ValueError(f"unknown question_style {question_style!r}; expected one of {QUESTION_STYLES}")
    out_dir = Path(out_dir)
    media_dir = out_dir / "media"
    media_dir.mkdir(parents=True, exist_ok=True)
    kw = {
        "video": {
            "size": size,
            "fps": fps,
            "duration": duration,
            "n_scenes": n_scenes,
            "max_objects": max_objects,
            "text_prob": text_prob,
            "object_scale": object_scale,
        },
        "image": {
            "size": size,
            "max_objects": max_objects,
            "text_prob": text_prob,
            "object_scale": object_scale,
        },
    }

    def kind_of(i: int) -> str:
        if len(set(kinds)) == 1:
            return kinds[0]
        return "video" if _rng(seed, i, "video", _STREAM_KIND).random() < video_share else "image"

    jobs = [(media_dir, seed, i, kind_of(i), kw) for i in range(n)]
    bar = tqdm(total=n, desc=f"synthetic {out_dir.name}", unit="sample", disable=not progress)
    samples: list[Sample] = []
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            for sample in pool.map(_dataset_item, jobs, chunksize=8):
                samples.append(sample)
                bar.update()
    else:
        for job in jobs:
            samples.append(_dataset_item(job))
            bar.update()
    bar.close()
    with open(out_dir / "samples.jsonl", "w") as fh:
        for sample in samples:
            fh.write(json.dumps(sample.to_dict()) + "\n")
    return write_manifest(
        samples,
        out_dir / "manifest.jsonl",
        question_style=question_style,
        seed=seed,
        per_sample=per_sample,
        qtypes=qtypes,
    )


def add_object_scale_argument(parser) -> None:
    """``--object-scale LO HI`` (None when not given), as every command that generates media takes it."""
    parser.add_argument(
        "--object-scale",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="object side as a fraction of the frame's shorter side (generator default: 0.16 0.24)",
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m keye.synthetic dataset OUT --n 100 --seed 0`` or ``python -m keye.synthetic demo OUT.mp4``."""
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m keye.synthetic", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ds = sub.add_parser("dataset", help="write media + samples.jsonl + manifest.jsonl")
    ds.add_argument("out_dir")
    ds.add_argument("--n", type=int, default=100)
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--size", default="112x112", help="HxW")
    ds.add_argument("--fps", type=float, default=8)
    ds.add_argument("--duration", type=float, default=4.0)
    ds.add_argument("--video-share", type=float, default=0.5)
    ds.add_argument("--question-style", default="mixed", choices=QUESTION_STYLES)
    ds.add_argument("--max-objects", type=int, default=4, help="at most this many shapes per scene")
    ds.add_argument("--text-prob", type=float, default=0.5, help="share of scenes with on-screen text")
    add_object_scale_argument(ds)
    ds.add_argument(
        "--per-sample", default="one", choices=("one", "all"), help="questions per medium in the manifest"
    )
    ds.add_argument("--qtypes", nargs="+", metavar="QTYPE", help="manifest keeps only these question types")
    ds.add_argument("--workers", type=int, default=1)
    demo = sub.add_parser("demo", help="write a demo clip")
    demo.add_argument("path")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--duration", type=float, default=10.0)
    demo.add_argument("--size", default="360x640", help="HxW")
    demo.add_argument("--fps", type=float, default=24)
    args = parser.parse_args(argv)
    size = tuple(int(x) for x in args.size.lower().split("x"))
    t0 = time.perf_counter()
    if args.cmd == "dataset":
        out = generate_dataset(
            args.out_dir,
            seed=args.seed,
            n=args.n,
            video_share=args.video_share,
            question_style=args.question_style,
            size=size,
            fps=args.fps,
            duration=args.duration,
            max_objects=args.max_objects,
            text_prob=args.text_prob,
            object_scale=args.object_scale,
            per_sample=args.per_sample,
            qtypes=args.qtypes,
            workers=args.workers,
        )
        dt = time.perf_counter() - t0
        print(f"{out}: {args.n} samples in {dt:.1f} s ({args.n / dt:.1f} samples/s)")
    else:
        make_demo_video(args.path, seed=args.seed, duration=args.duration, size=size, fps=args.fps)
        print(f"{args.path}: {args.duration} s {args.size} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
