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

Modules, in the order the data flows: ``world`` (vocabulary, labels, seeded layout), ``render`` (drawing),
``language`` (captions, questions), ``samples`` (a sample and its file; the demo, scene-cut and static clips),
``manifest`` (JSONL manifests, datasets, ``python -m keye.synthetic``). Everything public is importable from here.

Not for real-world data, decoding (``keye.encoders.video``) or frame selection; it only writes files.
"""

from __future__ import annotations

from keye.synthetic.language import (  # noqa: F401
    make_caption,
    make_questions,
)
from keye.synthetic.manifest import (  # noqa: F401
    add_object_scale_argument,
    format_prompt,
    generate_dataset,
    load_samples,
    main,
    manifest_lines,
    write_manifest,
)
from keye.synthetic.render import (  # noqa: F401
    object_masks,
    render_image,
    render_video_frames,
)
from keye.synthetic.samples import (  # noqa: F401
    make_demo_video,
    make_image_sample,
    make_image_spec,
    make_scene_cut_video,
    make_static_video,
    make_video_sample,
    make_video_spec,
)
from keye.synthetic.world import (  # noqa: F401
    BACKGROUNDS,
    COLOURS,
    DIGITS,
    DIRECTIONS,
    GENERATOR_VERSION,
    LETTERS,
    MC_SUFFIX,
    MIXED_STYLE_WEIGHTS,
    QA,
    QTYPES,
    QUESTION_STYLES,
    SHAPES,
    WORDS,
    Sample,
    Scene,
    SceneObject,
    VideoSpec,
    colours_for_background,
)

__all__ = [
    "GENERATOR_VERSION",
    "SHAPES",
    "COLOURS",
    "BACKGROUNDS",
    "DIRECTIONS",
    "DIGITS",
    "WORDS",
    "QTYPES",
    "QUESTION_STYLES",
    "LETTERS",
    "MC_SUFFIX",
    "MIXED_STYLE_WEIGHTS",
    "SceneObject",
    "Scene",
    "VideoSpec",
    "QA",
    "Sample",
    "colours_for_background",
    "render_video_frames",
    "object_masks",
    "render_image",
    "make_caption",
    "make_questions",
    "make_video_spec",
    "make_image_spec",
    "make_video_sample",
    "make_image_sample",
    "make_demo_video",
    "make_scene_cut_video",
    "make_static_video",
    "format_prompt",
    "manifest_lines",
    "write_manifest",
    "load_samples",
    "generate_dataset",
    "add_object_scale_argument",
    "main",
]
