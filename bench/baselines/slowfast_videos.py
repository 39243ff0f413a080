"""Deterministic videos for Slow-Fast tests, fixtures and benchmarks, described by a small JSON-able spec.

A video is a list of scenes cut hard one after the other; the cut times are known exactly. Scene types:

- ``blocks``: random coloured 16 px blocks on black (about half covered), static, optionally with a white square
  moving across (``square`` px, ``speed`` px/s). Two different block scenes share few patches, so a cut is a
  new slow frame and nothing inside a scene is (the square covers too few patches);
- ``pan``: 8 px blocks (``cell``, ``cover``) moving sideways (``speed`` px/s): patches drift out of similarity, so
  slow frames come at intervals, the content the similarity thresholds are most sensitive to (a dense random
  texture would not do: two unrelated dense textures still have HSV cosine similarity about 0.75);
- ``fade``: a block scene fading out to black (``direction`` "out") or in from black ("in");
- ``black``: all-black frames;
- ``natural``: footage-like content for benchmarks of real codecs: a fractal (1/f) landscape coloured like foliage,
  rock and sky, filmed by a camera that pans (``speed`` px/s, any direction) and slowly zooms, with textured blobs
  moving across it and film grain on every frame. h264 spends its bits on it as on real footage (texture, motion,
  noise), which flat synthetic shapes do not make it do.

Used by ``tests/test_slowfast.py`` (which loads it by path), ``make_slowfast_fixtures.py`` (which runs the reference
on the same videos) and ``bench/bench_encoders.py``. Frames depend only on the spec, and files on the spec plus the
PyAV/x264 build. Changing this file changes the videos: bump ``GENERATOR_VERSION`` and regenerate the fixtures.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

GENERATOR_VERSION = 1


def _blocks(rng: np.random.Generator, h: int, w: int, block: int = 16, cover: float = 0.5) -> np.ndarray:
    gh, gw = -(-h // block), -(-w // block)
    on = rng.random((gh, gw)) < cover
    colour = rng.integers(40, 256, size=(gh, gw, 3), dtype=np.uint8)
    img = np.where(on[..., None], colour, 0).astype(np.uint8)
    return np.repeat(np.repeat(img, block, 0), block, 1)[:h, :w]  # (h, w, 3)


def _fractal(rng: np.random.Generator, h: int, w: int, beta: float) -> np.ndarray:
    """(h, w) float32 noise with a 1/f**beta spectrum, scaled to [0, 1]: the statistics of natural images."""
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None]
    amp = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w)) ** beta
    spec = amp * np.exp(2j * np.pi * rng.random(amp.shape))
    x = np.fft.irfft2(spec, s=(h, w)).astype(np.float32)
    return (x - x.min()) / (x.max() - x.min() + 1e-9)


_PALETTE = np.array(  # dark soil, foliage, light foliage, dry grass, rock, sky haze
    [[40, 32, 20], [38, 78, 30], [92, 130, 52], [160, 150, 90], [128, 124, 118], [170, 196, 220]], np.float32
)


def _natural_scene(rng: np.random.Generator, h: int, w: int, margin: int) -> dict:
    big_h, big_w = h + 2 * margin, w + 2 * margin
    terrain = _fractal(rng, big_h, big_w, 1.8)
    shade = _fractal(rng, big_h, big_w, 1.2)
    detail = _fractal(rng, big_h, big_w, 0.6)  # fine texture: leaves, gravel
    pos = np.clip(terrain * (len(_PALETTE) - 1), 0, len(_PALETTE) - 1.001)
    lo = pos.astype(np.int32)
    t = (pos - lo)[..., None]
    img = _PALETTE[lo] * (1 - t) + _PALETTE[lo + 1] * t
    img *= (0.55 + 0.6 * shade)[..., None]
    img += (detail[..., None] - 0.5) * rng.uniform(40, 90)
    img *= rng.uniform(0.7, 1.15, 3).astype(np.float32)  # the scene's light
    blobs = []
    for _ in range(int(rng.integers(2, 6))):
        r = int(rng.integers(h // 16, h // 5))
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        mask = ((yy / r) ** 2 + (xx / (r * rng.uniform(0.6, 1.6))) ** 2 <= 1.0).astype(np.float32)
        tex = _fractal(rng, 2 * r + 1, 2 * r + 1, 1.0)[..., None] * rng.uniform(60, 255, 3).astype(np.float32)
        path = rng.uniform(0, 1, 4) * [h, w, h, w]  # start, end (y, x)
        blobs.append((mask[..., None], tex, path, rng.uniform(0, 6.28)))
    angle = rng.uniform(0, 2 * np.pi)
    return {
        "img": img,
        "blobs": blobs,
        "dir": (np.sin(angle), np.cos(angle)),
        "zoom": rng.uniform(-0.04, 0.04),
    }


def _natural_frame(
    scene: dict, spec: dict, h: int, w: int, margin: int, t: float, u: float, grain
) -> np.ndarray:
    from PIL import Image

    img = scene["img"]
    speed = spec.get("speed", 30.0)
    dy, dx = scene["dir"]
    cy = margin + np.clip(dy * speed * t, -margin + 1, margin - 1)
    cx = margin + np.clip(dx * speed * t, -margin + 1, margin - 1)
    z = 1.0 + scene["zoom"] * u  # slow zoom over the scene
    ch, cw = h / z, w / z
    y0 = float(np.clip(cy + (h - ch) / 2, 0, img.shape[0] - ch - 1))
    x0 = float(np.clip(cx + (w - cw) / 2, 0, img.shape[1] - cw - 1))
    frame = img[int(y0) : int(y0) + int(ch) + 1, int(x0) : int(x0) + int(cw) + 1].copy()
    for mask, tex, path, phase in scene["blobs"]:
        r = mask.shape[0] // 2
        by = int(path[0] + (path[2] - path[0]) * u + 10 * np.sin(phase + 3 * t) - y0 + margin) - r
        bx = int(path[1] + (path[3] - path[1]) * u - x0 + margin) - r
        ys, xs = (
            slice(max(by, 0), min(by + 2 * r + 1, frame.shape[0])),
            slice(max(bx, 0), min(bx + 2 * r + 1, frame.shape[1])),
        )
        if ys.start >= ys.stop or xs.start >= xs.stop:
            continue
        m = mask[ys.start - by : ys.stop - by, xs.start - bx : xs.stop - bx]
        tx = tex[ys.start - by : ys.stop - by, xs.start - bx : xs.stop - bx]
        frame[ys, xs] = frame[ys, xs] * (1 - m) + tx * m
    frame = np.clip(frame, 0, 255).astype(np.uint8)
    if frame.shape[:2] != (h, w):
        frame = np.asarray(Image.fromarray(frame).resize((w, h), Image.BILINEAR))
    return np.clip(frame.astype(np.int16) + grain, 0, 255).astype(np.uint8)


def scene_bounds(spec: dict) -> list[int]:
    """First frame of every scene, plus the frame count at the end."""
    fps = spec["fps"]
    bounds, t = [0], 0.0
    for scene in spec["scenes"]:
        t += scene["duration"]
        bounds.append(round(t * fps))
    return bounds


def cut_frames(spec: dict) -> list[int]:
    """Index of the first frame of every scene after the first (the frames where a cut shows)."""
    return scene_bounds(spec)[1:-1]


def render(spec: dict) -> Iterator[np.ndarray]:
    """Frames (h, w, 3) uint8 RGB of the video described by ``spec``."""
    h, w, fps = spec["height"], spec["width"], spec["fps"]
    bounds = scene_bounds(spec)
    for s, scene in enumerate(spec["scenes"]):
        rng = np.random.default_rng([spec.get("seed", 0), s])
        kind = scene["type"]
        if kind == "pan":
            speed = scene.get("speed", 24.0)
            span = int(speed * scene["duration"]) + 2
            tex = _blocks(rng, h, w + span, scene.get("cell", 8), scene.get("cover", 0.5))
        elif kind in ("blocks", "fade"):
            img = _blocks(rng, h, w)
        elif kind == "natural":
            margin = int(scene.get("speed", 30.0) * scene["duration"] / 2) + 8
            nat = _natural_scene(rng, h, w, margin)
            grains = [rng.normal(0, 4, (h, w, 3)).astype(np.int16) for _ in range(5)]
        n_frames = bounds[s + 1] - bounds[s]
        for i in range(n_frames):
            t = i / fps
            if kind == "black":
                yield np.zeros((h, w, 3), np.uint8)
            elif kind == "pan":
                dx = int(t * scene.get("speed", 24.0))
                yield tex[:, dx : dx + w]
            elif kind == "fade":
                a = min(1.0, t / scene["duration"])
                a = 1.0 - a if scene.get("direction", "out") == "out" else a
                yield (img.astype(np.float32) * a).astype(np.uint8)
            elif kind == "natural":
                yield _natural_frame(nat, scene, h, w, margin, t, i / max(n_frames - 1, 1), grains[i % 5])
            elif kind == "blocks":
                frame = img.copy()
                size = scene.get("square", 0)
                if size:
                    x = int(t * scene.get("speed", 40.0)) % max(1, w - size)
                    y = (h - size) // 3
                    frame[y : y + size, x : x + size] = 255
                yield frame
            else:
                raise ValueError(f"unknown scene type {kind!r}")


def write(spec: dict, path: str | Path) -> Path:
    """Encode the video of ``spec`` to ``path`` (H.264, crf and x264 preset from the spec, default 23 and veryfast;
    an AAC track when ``audio`` is set)."""
    from keye.encoders.video import write_video

    return write_video(
        path,
        render(spec),
        spec["fps"],
        crf=spec.get("crf", 23),
        preset=spec.get("preset", "veryfast"),
        audio=spec.get("audio", False),
    )


def bench_spec(minutes: float = 10.0, height: int = 720, width: int = 1280, fps: float = 30.0) -> dict:
    """The benchmark video: block scenes with a moving square, every third scene a pan, 9.7 s per scene."""
    n = int(minutes * 60 / 9.7) + 1
    scenes = []
    for s in range(n):
        dur = min(9.7, minutes * 60 - 9.7 * s)
        if dur <= 0:
            break
        scenes.append(
            {"type": "pan", "duration": dur, "speed": 24.0}
            if s % 3 == 2
            else {"type": "blocks", "duration": dur, "square": 48, "speed": 80.0}
        )
    return {"height": height, "width": width, "fps": fps, "seed": 0, "scenes": scenes}


def natural_spec(
    minutes: float = 2.0, height: int = 720, width: int = 1280, fps: float = 24.0, seed: int = 0
) -> dict:
    """Footage-like benchmark video: ``natural`` scenes of 3 to 12 s (cuts as in edited film), pans of 0 to 60 px/s,
    h264 (x264 ``medium``, crf 23, as footage is usually encoded) with an AAC track."""
    rng = np.random.default_rng(seed)
    scenes, left = [], minutes * 60
    while left > 1e-6:
        dur = float(min(left, round(rng.uniform(3.0, 12.0), 2)))
        scenes.append({"type": "natural", "duration": dur, "speed": round(float(rng.uniform(0, 60)), 1)})
        left -= dur
    return {
        "height": height,
        "width": width,
        "fps": fps,
        "seed": seed,
        "scenes": scenes,
        "preset": "medium",
        "audio": True,
    }
