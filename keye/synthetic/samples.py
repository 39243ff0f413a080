"""Samples: a spec, its rendered file, caption and questions; the special clips (demo, scene cuts, static)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from keye.synthetic.language import make_caption, make_questions
from keye.synthetic.render import _write, render_image
from keye.synthetic.world import (
    _STREAM_LAYOUT,
    _STREAM_QA,
    BACKGROUNDS,
    COLOURS,
    QA,
    SHAPES,
    Sample,
    VideoSpec,
    _make_scene,
    _make_spec,
    _pick_backgrounds,
    _rng,
    _scene_params,
    _SceneParams,
)

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
