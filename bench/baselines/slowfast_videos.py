"""Deterministic videos for Slow-Fast tests, fixtures and benchmarks, described by a small JSON-able spec.

A video is a list of scenes cut hard one after the other; the cut times are known exactly. Scene types:

- ``blocks``: random coloured 16 px blocks on black (about half covered), static, optionally with a white square
  moving across (``square`` px, ``speed`` px/s). Two different block scenes share few patches, so a cut is a
  new slow frame and nothing inside a scene is (the square covers too few patches);
- ``pan``: 8 px blocks (``cell``, ``cover``) moving sideways (``speed`` px/s): patches drift out of similarity, so
  slow frames come at intervals, the content the similarity thresholds are most sensitive to (a dense random
  texture would not do: two unrelated dense textures still have HSV cosine similarity about 0.75);
- ``fade``: a block scene fading out to black (``direction`` "out") or in from black ("in");
- ``black``: all-black frames.

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
        for i in range(bounds[s + 1] - bounds[s]):
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
    """Encode the video of ``spec`` to ``path`` (H.264, crf from the spec, default 23)."""
    from keye.encoders.video import write_video

    return write_video(path, render(spec), spec["fps"], crf=spec.get("crf", 23))


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
