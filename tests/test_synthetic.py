"""The synthetic generator: determinism, labels that match the decoded pixels, well-formed questions and manifests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from keye.synthetic import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    LETTERS,
    MC_SUFFIX,
    QA,
    QTYPES,
    SHAPES,
    Sample,
    colours_for_background,
    generate_dataset,
    load_samples,
    make_demo_video,
    make_image_sample,
    make_image_spec,
    make_questions,
    make_scene_cut_video,
    make_static_video,
    make_video_sample,
    make_video_spec,
    render_video_frames,
    write_manifest,
)


def decode(path: str | Path) -> list[np.ndarray]:
    """All frames of ``path`` as RGB uint8 arrays, decoded with PyAV directly."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: float(np.linalg.norm(rgb - np.asarray(COLOURS[name], float))))


def centre_colour(frame: np.ndarray, xy: tuple[float, float]) -> str:
    x, y = int(xy[0]), int(xy[1])
    patch = frame[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).astype(float)
    return nearest_colour(np.median(patch, axis=0))


def colour_centroid(frame: np.ndarray, colour: str, box: tuple[float, float, float, float]) -> np.ndarray:
    """Centroid ``(x, y)`` of pixels close to ``colour`` inside ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    region = frame[y0:y1, x0:x1].astype(float)
    mask = np.linalg.norm(region - np.asarray(COLOURS[colour], float), axis=-1) < 60
    ys, xs = np.nonzero(mask)
    assert len(xs) > 10, f"{colour} not found in {box}"
    return np.array([xs.mean() + x0, ys.mean() + y0])


def hsv_patch_changed(a: np.ndarray, b: np.ndarray, patch: int = 28, threshold: float = 0.7) -> float:
    """Share of ``patch`` x ``patch`` cells whose HSV cosine similarity is below ``threshold`` (the Slow-Fast test)."""
    ha = np.asarray(Image.fromarray(a).convert("HSV"), float)
    hb = np.asarray(Image.fromarray(b).convert("HSV"), float)
    h, w = a.shape[:2]
    changed = []
    for y in range(0, h - patch + 1, patch):
        for x in range(0, w - patch + 1, patch):
            u, v = ha[y : y + patch, x : x + patch].ravel(), hb[y : y + patch, x : x + patch].ravel()
            changed.append(u @ v / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-8) < threshold)
    return float(np.mean(changed))


def labels(sample: Sample) -> str:
    d = sample.to_dict()
    d.pop("media")
    return json.dumps(d, sort_keys=True)


# ----------------------------------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_labels_and_frames(tmp_path):
    a = make_video_sample(tmp_path / "a", 7, index=3, n_scenes=3)
    b = make_video_sample(tmp_path / "b", 7, index=3, n_scenes=3)
    assert labels(a) == labels(b)
    frames_a, frames_b = decode(a.media), decode(b.media)
    assert len(frames_a) == a.n_frames == 32
    assert [hashlib.sha1(f.tobytes()).hexdigest() for f in frames_a] == [
        hashlib.sha1(f.tobytes()).hexdigest() for f in frames_b
    ]
    ia, ib = make_image_sample(tmp_path / "a", 7, index=3), make_image_sample(tmp_path / "b", 7, index=3)
    assert labels(ia) == labels(ib)
    assert Path(ia.media).read_bytes() == Path(ib.media).read_bytes()


def test_different_seeds_and_indices_differ():
    specs = {json.dumps(repr(make_video_spec(seed, index=i))) for seed in range(3) for i in range(10)}
    assert len(specs) == 30
    # (seed, index) streams are independent: seed 0 index 1 is not seed 1 index 0.
    assert repr(make_video_spec(0, index=1)) != repr(make_video_spec(1, index=0))
    assert repr(make_image_spec(0, index=0)) != repr(make_image_spec(0, index=1))


def test_json_round_trip(tmp_path):
    sample = make_video_sample(tmp_path, 1, index=2, n_scenes=2)
    again = Sample.from_dict(json.loads(json.dumps(sample.to_dict())))
    assert again == sample
    assert again.cut_times == [sample.cut_frames[0] / sample.fps]
    assert QA.from_dict(sample.questions[0].to_dict()) == sample.questions[0]


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="even"):
        make_video_spec(0, size=(113, 112))
    with pytest.raises(ValueError, match="seed"):
        make_video_spec(-1)
    with pytest.raises(ValueError, match="unknown"):
        make_video_spec(0, shapes=("hexagon",))
    with pytest.raises(ValueError, match="cut_times"):
        make_scene_cut_video(tmp_path / "x.mp4", [3.0, 1.0], duration=4.0)


# ----------------------------------------------------------------------------------------------------------------------
# Labels match the pixels
# ----------------------------------------------------------------------------------------------------------------------


def test_object_colours_at_their_centres_in_decoded_video(tmp_path):
    checked = 0
    for index in range(4):
        sample = make_video_sample(tmp_path, 11, index=index, size=(112, 112))
        frames = decode(sample.media)
        for scene in sample.scenes:
            mid = (scene.start_frame + scene.end_frame - 1) // 2
            for obj in scene.objects:
                assert centre_colour(frames[mid], obj.position(scene.progress(mid))) == obj.colour
                checked += 1
    assert checked >= 8


def test_image_pixels_match_labels(tmp_path):
    for index in range(6):
        sample = make_image_sample(tmp_path, 5, index=index, size=(224, 224))
        image = np.asarray(Image.open(sample.media).convert("RGB"))
        assert image.shape == (224, 224, 3)
        (scene,) = sample.scenes
        for obj in scene.objects:
            assert centre_colour(image, obj.start) == obj.colour
        if scene.text is not None:  # the text box holds dark or light glyph pixels unlike the background
            x0, y0, x1, y1 = scene.text_box
            bg = np.asarray(BACKGROUNDS[scene.background][0], float)
            box = image[y0:y1, x0:x1].astype(float)
            assert (np.linalg.norm(box - bg, axis=-1) > 100).mean() > 0.1


def test_motion_direction_matches_centroid_movement(tmp_path):
    checked = symmetric = 0
    for index in range(4):
        sample = make_video_sample(tmp_path, 21, index=index, n_scenes=2)
        frames = decode(sample.media)
        h, w = sample.size
        for scene in sample.scenes:
            first, last = frames[scene.start_frame], frames[scene.end_frame - 1]
            for obj in scene.objects:
                # Search only around the object's own track so no other object of similar colour interferes.
                pad = obj.size * 0.6
                xs, ys = (obj.start[0], obj.end[0]), (obj.start[1], obj.end[1])
                box = (
                    max(0, min(xs) - pad),
                    max(0, min(ys) - pad),
                    min(w, max(xs) + pad),
                    min(h, max(ys) + pad),
                )
                start, end = colour_centroid(first, obj.colour, box), colour_centroid(last, obj.colour, box)
                if obj.shape in ("circle", "square", "diamond"):  # symmetric: centroid = bounding-box centre
                    assert np.abs(start - obj.start).max() < 1.0 and np.abs(end - obj.end).max() < 1.0
                    symmetric += 1
                delta = end - start
                measured = ("right" if delta[0] > 0 else "left") if abs(delta[0]) > abs(delta[1]) else None
                measured = measured or ("down" if delta[1] > 0 else "up")
                assert measured == scene.motion
                expected = np.subtract(obj.end, obj.start)
                assert np.abs(delta - expected).max() < 3.0
                checked += 1
    assert checked >= 8 and symmetric >= 3


def test_static_video_has_nearly_identical_frames(tmp_path):
    path = make_static_video(tmp_path / "static.mp4", duration=2.0, fps=8, seed=3)
    frames = decode(path)
    assert len(frames) == 16
    for a, b in zip(frames, frames[1:]):
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 0.5
    black = decode(make_static_video(tmp_path / "black.mp4", duration=1.0, background="black"))
    assert max(int(f.max()) for f in black) <= 16  # limited-range YUV black


def test_scene_cut_video_changes_most_patches_at_cuts_only(tmp_path):
    cuts = make_scene_cut_video(
        tmp_path / "cuts.mp4", [1.0, 2.55], duration=4.0, size=(112, 168), fps=8, seed=4
    )
    assert cuts == [1.0, 2.5]  # snapped to the frame grid: frames 8 and 20
    frames = decode(tmp_path / "cuts.mp4")
    assert len(frames) == 32
    cut_frames = {round(t * 8) for t in cuts}
    for k in range(1, len(frames)):
        diff = np.abs(frames[k].astype(int) - frames[k - 1].astype(int)).mean()
        if k in cut_frames:
            assert diff > 30
            assert hsv_patch_changed(frames[k - 1], frames[k]) > 0.8
        else:
            assert diff < 0.5


def test_every_generated_cut_changes_most_patches():
    """Rendered (not encoded) frames of many videos: consecutive scenes always differ in at least half the patches."""
    for seed in range(25):
        spec = make_video_spec(seed, n_scenes=3, fps=4, duration=3.0)
        frames = list(render_video_frames(spec))
        for scene in spec.scenes[1:]:
            assert hsv_patch_changed(frames[scene.start_frame - 1], frames[scene.start_frame]) > 0.5


def test_every_background_keeps_enough_contrasting_colours():
    for name in BACKGROUNDS:
        assert len(colours_for_background(name)) >= 5, name


def test_demo_video_streams_with_cuts(tmp_path):
    sample = make_demo_video(tmp_path / "demo.mp4", seed=1, duration=7.0, size=(180, 320), fps=6)
    frames = decode(sample.media)
    assert len(frames) == sample.n_frames == 42
    assert frames[0].shape == (180, 320, 3)
    assert len(sample.scenes) == 2 and sample.cut_times == [sample.cut_frames[0] / 6]
    k = sample.cut_frames[0]
    assert hsv_patch_changed(frames[k - 1], frames[k]) > 0.5


# ----------------------------------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------------------------------


def _first_scene(scenes, get, value) -> int:
    return min(k for k, s in enumerate(scenes) if value in get(s))


def test_questions_are_well_formed_and_true():
    seen: set[str] = set()
    for seed in range(120):
        kind = "video" if seed % 3 else "image"
        spec = make_video_spec(seed) if kind == "video" else make_image_spec(seed)
        qas = make_questions(np.random.default_rng(seed), kind, spec.scenes)
        assert len({q.qtype for q in qas}) == len(qas)
        for qa in qas:
            seen.add(qa.qtype)
            assert qa.qtype in QTYPES
            assert len(qa.options) == 4
            assert [o[:3] for o in qa.options] == [f"{L}. " for L in LETTERS]
            values = [o[3:] for o in qa.options]
            assert len(set(values)) == 4 and values.count(qa.answer) == 1
            assert qa.options[LETTERS.index(qa.answer_letter)] == f"{qa.answer_letter}. {qa.answer}"
            assert " " not in qa.answer and qa.question.endswith("?")
            if kind == "image":
                assert qa.qtype not in ("motion", "order")
            scene = spec.scenes[qa.scene] if qa.scene is not None else None
            if qa.qtype == "colour":
                (obj,) = [o for o in scene.objects if f"the {o.shape}?" in qa.question]
                assert qa.answer == obj.colour and values[0] in COLOURS
            elif qa.qtype == "shape":
                (obj,) = [o for o in scene.objects if f"the {o.colour} object" in qa.question]
                assert qa.answer == obj.shape and set(values) <= set(SHAPES)
            elif qa.qtype == "count":
                assert qa.answer == str(len(scene.objects))
            elif qa.qtype == "motion":
                assert qa.answer == scene.motion and sorted(values) == sorted(DIRECTIONS)
            elif qa.qtype == "text":
                assert qa.answer == scene.text
            elif qa.qtype == "order":
                other = [v for v in values if v != qa.answer and v in qa.question]
                assert len(other) == 1
                getters = [lambda s: [o.shape for o in s.objects], lambda s: [o.colour for o in s.objects]]
                getters.append(lambda s: [s.background])
                attr = qa.question.split()[1]
                get = getters[["shape", "colour", "background"].index(attr)]
                assert attr != "colour" or "white" not in values  # white text would make it ambiguous
                assert _first_scene(spec.scenes, get, qa.answer) < _first_scene(spec.scenes, get, other[0])
            if len(spec.scenes) > 1 and qa.qtype != "order":
                assert qa.question.startswith("In the ")
    assert seen == set(QTYPES)


def test_caption_mentions_every_object_and_text():
    spec = make_video_spec(3, n_scenes=3, text_prob=1.0)
    from keye.synthetic import make_caption

    caption = make_caption(spec.scenes)
    assert caption.startswith("First, ") and caption.endswith(".") and caption.count("; ") == 2
    for scene in spec.scenes:
        assert scene.text in caption and scene.background in caption
        for obj in scene.objects:
            assert f"{obj.colour} {obj.shape}" in caption


# ----------------------------------------------------------------------------------------------------------------------
# Manifests and datasets
# ----------------------------------------------------------------------------------------------------------------------


def _check_line(line: dict, root: Path) -> None:
    assert set(line) == {"id", "messages", "meta"}
    user, assistant = line["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    media, text = user["content"]
    kind = media["type"]
    assert kind in ("video", "image") and set(media) == {"type", kind}
    assert not Path(media[kind]).is_absolute() and (root / media[kind]).is_file()
    assert text["type"] == "text"
    (answer,) = assistant["content"]
    assert answer["type"] == "text"
    meta = line["meta"]
    assert {"qtype", "answer", "options", "answer_letter", "source", "seed"} <= set(meta)
    assert meta["source"] == "synthetic"
    style = meta["style"]
    if style == "caption":
        assert text["text"] == f"Describe the {kind}." and answer["text"] == meta["answer"]
        assert meta["qtype"] == "caption" and meta["options"] == []
    elif style == "open":
        assert text["text"].endswith("?") and answer["text"] == meta["answer"]
    else:
        lines = text["text"].split("\n")
        assert len(lines) == 6 and lines[1:5] == meta["options"] and lines[5] == MC_SUFFIX
        assert answer["text"] == meta["answer_letter"]
        assert meta["options"][LETTERS.index(meta["answer_letter"])].endswith(f". {meta['answer']}")


def test_write_manifest_styles(tmp_path):
    samples = [make_video_sample(tmp_path / "media", 2, index=i) for i in range(3)]
    samples.append(make_image_sample(tmp_path / "media", 2, index=3))
    for style in ("open", "mc", "caption", "mixed"):
        path = write_manifest(samples, tmp_path / f"{style}.jsonl", question_style=style, seed=0)
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        assert [x["id"] for x in lines] == [s.id for s in samples]
        for line in lines:
            _check_line(line, tmp_path)
            if style != "mixed":
                assert line["meta"]["style"] == style
    again = write_manifest(samples, tmp_path / "again.jsonl", question_style="mixed", seed=0)
    assert again.read_text() == (tmp_path / "mixed.jsonl").read_text()
    every = write_manifest(
        samples, tmp_path / "all.jsonl", question_style="mc", per_sample="all", qtypes=["count"]
    )
    lines = [json.loads(x) for x in every.read_text().splitlines()]
    assert len(lines) == 4 and {x["meta"]["qtype"] for x in lines} == {"count"}
    colour = write_manifest(samples * 5, tmp_path / "colour.jsonl", question_style="mixed", qtypes=["colour"])
    assert {json.loads(x)["meta"]["qtype"] for x in colour.read_text().splitlines()} == {"colour"}
    with pytest.raises(ValueError, match="qtypes"):
        write_manifest(samples, tmp_path / "bad.jsonl", qtypes=["size"])


def test_generate_dataset(tmp_path):
    manifest = generate_dataset(tmp_path / "d0", seed=0, n=6, duration=2.0, progress=False)
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert manifest == tmp_path / "d0" / "manifest.jsonl" and len(lines) == 6
    for line in lines:
        _check_line(line, manifest.parent)
    samples = load_samples(tmp_path / "d0" / "samples.jsonl")
    assert [s.index for s in samples] == list(range(6)) and {s.kind for s in samples} == {"video", "image"}
    assert len(list((tmp_path / "d0" / "media").iterdir())) == 6
    other = generate_dataset(
        tmp_path / "d1", seed=1, n=6, kinds=("image",), question_style="open", progress=False
    )
    ids = {json.loads(x)["id"] for x in other.read_text().splitlines()}
    assert len(ids) == 6 and not ids & {x["id"] for x in lines}
    assert all(x.startswith("syn-image-1-") for x in ids)


def test_dataset_cli_filters_question_types_and_sets_the_generator(tmp_path):
    from keye.synthetic import load_samples, main

    main(
        [
            "dataset", str(tmp_path), "--n", "6", "--seed", "3", "--question-style", "open",
            "--max-objects", "4", "--text-prob", "0", "--per-sample", "all", "--qtypes", "count",
            "--object-scale", "0.3", "0.42",
        ]
    )  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    samples = load_samples(tmp_path / "samples.jsonl")
    assert {x["meta"]["qtype"] for x in lines} == {"count"}
    assert len(lines) == sum(q.qtype == "count" for s in samples for q in s.questions)
    assert all(len(sc.objects) <= 4 and not sc.text for s in samples for sc in s.spec.scenes)
    # objects of 0.3-0.42 of the 112-pixel frame (placement shrinks a crowded scene by 8% a round, never grows it)
    sizes = [o.size for s in samples for sc in s.spec.scenes for o in sc.objects]
    assert all(0.92**6 * 0.3 * 112 <= x <= 0.42 * 112 + 1 for x in sizes) and max(sizes) > 0.24 * 112 + 1


def test_object_scale_sets_the_object_sizes_and_is_validated():
    sizes = {
        scale: [
            o.size
            for i in range(30)
            for sc in make_video_spec(4, index=i, max_objects=2, text_prob=0.0, object_scale=scale).scenes
            for o in sc.objects
        ]
        for scale in [(0.16, 0.24), (0.3, 0.42)]
    }
    # 112-pixel frames; placement may shrink a crowded scene by 8% per failed round, never grow it
    assert all(0.92**3 * 0.3 * 112 <= s <= 0.42 * 112 + 1 for s in sizes[(0.3, 0.42)])
    assert all(s <= 0.24 * 112 + 1 for s in sizes[(0.16, 0.24)])
    assert np.mean(sizes[(0.3, 0.42)]) > 1.5 * np.mean(sizes[(0.16, 0.24)])
    default = make_video_spec(4, index=0, max_objects=2, text_prob=0.0)
    assert default == make_video_spec(4, index=0, max_objects=2, text_prob=0.0, object_scale=(0.16, 0.24))
    with pytest.raises(ValueError, match="object_scale"):
        make_video_spec(4, object_scale=(0.4, 0.3))
