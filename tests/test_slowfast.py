"""Slow-Fast planning: labels on videos with known cuts, parity with keye-vl-utils 1.5.2, the token budget, bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from keye.encoders.hsv import rgb_to_hsv
from keye.encoders.slowfast import (
    FramePlan,
    SlowFastConfig,
    VideoPlan,
    feature_size,
    fit_tokens,
    label_frames,
    max_frames_for_budget,
    plan_from_labels,
    plan_video,
    sample_positions,
    token_budget_split,
)
from keye.encoders.video import write_video
from keye.errors import ConfigError, VideoDecodeError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = sorted((ROOT / "tests" / "fixtures" / "slowfast").glob("*.json"))


def _load_videos_module():
    # The generator lives beside the script that made the fixtures (bench/baselines), so both build the same videos.
    spec = importlib.util.spec_from_file_location(
        "slowfast_videos", ROOT / "bench" / "baselines" / "slowfast_videos.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("slowfast_videos", module)
    spec.loader.exec_module(module)
    return module


videos = _load_videos_module()


@pytest.fixture(scope="module")
def vdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slowfast")


_cache: dict[str, Path] = {}
CUTS_SMALL = {
    "height": 112,
    "width": 140,
    "fps": 10,
    "seed": 3,
    "scenes": [{"type": "blocks", "duration": 2.0}, {"type": "blocks", "duration": 2.0}],
}


def _video(vdir: Path, name: str, spec: dict) -> Path:
    if name not in _cache:
        _cache[name] = videos.write(spec, vdir / f"{name}.mp4")
    return _cache[name]


# ---------------------------------------------------------------------------------------------------------------------
# Parity with the reference


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.stem for f in FIXTURES])
def test_labels_match_reference_fixture(fixture, vdir):
    fx = json.loads(fixture.read_text())
    assert fx["generator_version"] == videos.GENERATOR_VERSION, (
        "regenerate: bench/baselines/make_slowfast_fixtures.py"
    )
    plan, frames = plan_video(_video(vdir, fx["name"], fx["spec"]))
    ours = [int(f.kind == "slow") for f in plan.frames]
    assert [f.index for f in plan.frames] == fx["indices"]  # same frames sampled
    assert [f.time for f in plan.frames] == pytest.approx(fx["times"], abs=1e-4)
    assert ours == fx["labels"], f"{fx['name']}: labels differ\nours {ours}\nref  {fx['labels']}"
    slow = next(f for f in plan.frames if f.kind == "slow")
    assert [slow.height, slow.width] == fx["slow_hw"]
    fast = [f for f in plan.frames if f.kind == "fast"]
    if fast:
        cap = max(int(0.3 * slow.tokens), 48)
        ref_tokens = (fx["fast_hw"][0] // 28) * (fx["fast_hw"][1] // 28)
        if ref_tokens <= cap:
            assert [fast[0].height, fast[0].width] == fx["fast_hw"]
        else:  # the reference's smart_resize rounded above its own cap here; ours stays within it
            assert fast[0].tokens <= cap
    assert [fr.shape[:2] for fr in frames] == [(f.height, f.width) for f in plan.frames]


def test_reference_search_overshoots_ours_does_not():
    """The released search (left = mid + 1 past the last fitting count) can return a count that does not fit."""

    def reference(n_slow, n_fast, budget):
        left, right = 48, 768
        while left < right:
            mid = (left + right) // 2
            if n_slow * mid + n_fast * max(int(0.3 * mid), 48) > budget:
                right = mid
            else:
                left = mid + 1
        return left

    n_slow, n_fast, budget = 40, 200, 20000
    t = reference(n_slow, n_fast, budget)
    assert n_slow * t + n_fast * max(int(0.3 * t), 48) > budget  # one step too far
    cfg = SlowFastConfig(token_budget=budget)
    # one row of patches: every token count is reachable
    slow, fast = token_budget_split(n_slow, n_fast, 28, 28 * 2000, cfg)
    assert n_slow * slow + n_fast * fast <= budget
    assert slow == t - 1


# ---------------------------------------------------------------------------------------------------------------------
# Selection on videos with known cuts


def _expected_slow(indices: list[int], cuts: list[int]) -> list[int]:
    """Positions of the sampled frames that should be slow: the first, and the first sampled at/after each cut."""
    out = {0}
    for c in cuts:
        out.add(next(k for k, i in enumerate(indices) if i >= c))
    return sorted(out)


def test_scene_cuts_are_exactly_the_slow_frames(vdir):
    spec = {
        "height": 168,
        "width": 224,
        "fps": 20,
        "seed": 11,
        "scenes": [
            {"type": "blocks", "duration": 2.3, "square": 20, "speed": 30.0},
            {"type": "blocks", "duration": 3.1, "square": 20, "speed": 30.0},
            {"type": "blocks", "duration": 1.7},
            {"type": "blocks", "duration": 2.9, "square": 20, "speed": 30.0},
        ],
    }
    plan, _ = plan_video(_video(vdir, "cuts", spec))
    indices = [f.index for f in plan.frames]
    slow = [k for k, f in enumerate(plan.frames) if f.kind == "slow"]
    assert slow == _expected_slow(indices, videos.cut_frames(spec))


def test_scene_cuts_synthetic_module(vdir):
    from keye.synthetic import make_scene_cut_video

    path = vdir / "syn_cuts.mp4"
    cut_times = make_scene_cut_video(path, [1.3, 2.9], duration=4.5, size=(112, 160), fps=10, seed=2)
    plan, _ = plan_video(path)
    indices = [f.index for f in plan.frames]
    slow = [k for k, f in enumerate(plan.frames) if f.kind == "slow"]
    assert slow == _expected_slow(indices, [round(t * 10) for t in cut_times])


def test_static_video_has_one_slow_frame(vdir):
    from keye.synthetic import make_static_video

    path = vdir / "static.mp4"
    make_static_video(path, duration=6.0, size=(112, 112), fps=8, seed=4)
    plan, frames = plan_video(path)
    assert len(plan.frames) == 12
    assert [f.kind for f in plan.frames] == ["slow"] + ["fast"] * 11
    assert plan.total_tokens == plan.slow_tokens_per_frame + 11 * plan.fast_tokens_per_frame


def test_all_black_video(vdir):
    path = write_video(vdir / "black.mp4", [np.zeros((64, 96, 3), np.uint8)] * 20, 10)
    plan, frames = plan_video(path)
    assert [f.kind for f in plan.frames] == ["slow"] + ["fast"] * 3
    assert all(fr.max() == 0 for fr in frames)


def test_short_clip_gives_one_frame(vdir):
    # 0.3 s: the reference samples int(0.3 * 2) = 0 frames
    rng = np.random.default_rng(0)
    path = write_video(
        vdir / "short.mp4", [rng.integers(0, 255, (56, 84, 3), dtype=np.uint8) for _ in range(3)], 10
    )
    plan, frames = plan_video(path)
    assert len(plan.frames) == 1 and plan.frames[0].kind == "slow" and plan.frames[0].index == 0
    assert plan.duration == pytest.approx(0.3) and plan.total_tokens <= plan.budget


def test_variable_frame_rate_times(vdir):
    rng = np.random.default_rng(1)
    pts = np.cumsum(np.r_[0.0, rng.choice([0.02, 0.05, 0.2], size=59)])  # 60 frames at uneven intervals
    pts = np.round(pts, 3)
    frames = [np.full((56, 56, 3), i * 4, np.uint8) for i in range(60)]
    path = write_video(vdir / "vfr.mp4", frames, 25, pts=pts.tolist())
    plan, out = plan_video(path)
    times = np.array([f.time for f in plan.frames])
    idx = np.array([f.index for f in plan.frames])
    assert times == pytest.approx(pts[idx], abs=1e-3)  # presentation times, not index / fps
    targets = np.linspace(pts[0], pts[-1], int(plan.duration * 2 + 1e-9))
    nearest = np.unique([int(np.argmin(np.abs(pts - t))) for t in targets])
    assert idx.tolist() == nearest.tolist()
    assert [int(fr[0, 0, 0]) for fr in out] == pytest.approx([i * 4 for i in idx], abs=3)  # the right pixels


def test_pyav_when_decord_is_missing(vdir, monkeypatch):
    path = _video(
        vdir,
        "cuts_small",
        CUTS_SMALL,
    )
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord -> ImportError
    plan, frames = plan_video(path)
    monkeypatch.undo()
    assert [f.kind for f in plan.frames].count("slow") == 2
    pytest.importorskip("decord")
    plan_d, frames_d = plan_video(path, backend="decord")
    assert plan_d.to_dict() == {**plan.to_dict()}
    assert all(np.array_equal(a, b) for a, b in zip(frames, frames_d))


def test_disabled_is_uniform_all_slow(vdir):
    path = _video(
        vdir,
        "cuts_small",
        CUTS_SMALL,
    )
    plan, frames = plan_video(path, SlowFastConfig(enabled=False))
    assert [f.kind for f in plan.frames] == ["slow"] * 8
    assert [f.index for f in plan.frames] == np.round(np.linspace(0, 39, 8)).astype(int).tolist()


def test_frames_dropped_evenly_when_budget_is_small(vdir):
    spec = {"height": 112, "width": 112, "fps": 10, "seed": 5, "scenes": [{"type": "pan", "duration": 30.0}]}
    cfg = SlowFastConfig(token_budget=480)  # 10 frames of 48 tokens; 30 s at 2 fps would be 60
    plan, frames = plan_video(_video(vdir, "pan30", spec), cfg)
    assert len(plan.frames) == 10 == max_frames_for_budget(cfg)
    assert plan.total_tokens <= 480
    assert [f.index for f in plan.frames] == np.round(np.linspace(0, 299, 10)).astype(int).tolist()
    assert plan.sample_fps == pytest.approx(10 / 30)


def test_frames_kept_at_a_bound_then_sized(vdir):
    """A budget that binds: frames are kept at the largest size still possible, then downscaled to the final size."""
    from PIL import Image

    from keye.encoders.video import decode

    spec = {
        "height": 230,
        "width": 350,
        "fps": 10,
        "seed": 6,
        "scenes": [
            {"type": "blocks", "duration": 1.5},
            {"type": "pan", "duration": 6.0, "speed": 30.0},
            {"type": "blocks", "duration": 2.5},
        ],
    }
    path = _video(vdir, "bound", spec)
    cfg = SlowFastConfig(token_budget=1500)
    plan, frames = plan_video(path, cfg)
    # the budget binds: native size would be 8 x 12 = 96 tokens
    assert plan.total_tokens <= 1500 and plan.slow_tokens_per_frame < 96
    assert sum(f.kind == "slow" for f in plan.frames) > 3
    assert [fr.shape[:2] for fr in frames] == [(f.height, f.width) for f in plan.frames]
    native = list(decode(path, [f.index for f in plan.frames]))
    for f, ours, nat in zip(plan.frames, frames, native):
        direct = np.asarray(Image.fromarray(nat).resize((f.width, f.height), Image.BILINEAR))
        assert np.abs(ours.astype(int) - direct).mean() < 4  # two antialiased downscales vs one


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


def test_audio_only_file(tmp_path):
    import av

    path = tmp_path / "audio.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 4000), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(VideoDecodeError, match="audio.wav: no video stream"):
        plan_video(path)


def test_missing_and_non_video_files(tmp_path):
    with pytest.raises(VideoDecodeError, match="nope.mp4: no such file"):
        plan_video(tmp_path / "nope.mp4")
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    with pytest.raises(VideoDecodeError, match="notes.mp4: cannot open as a video: not a video file"):
        plan_video(bad)


def test_truncated_file(vdir, tmp_path):
    path = _video(vdir, "cuts_small", CUTS_SMALL)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: nothing is readable
    with pytest.raises(VideoDecodeError, match="cut.mp4: cannot open as a video"):
        plan_video(cut)


def test_bad_config():
    with pytest.raises(ConfigError, match="token_budget 10 cannot hold one frame"):
        SlowFastConfig(token_budget=10)
    with pytest.raises(ConfigError, match="fps must be > 0"):
        SlowFastConfig(fps=0)


# ---------------------------------------------------------------------------------------------------------------------
# Budget and sizes, computed without decoding

RESOLUTIONS = [
    (16, 16),
    (56, 56),
    (90, 160),
    (240, 320),
    (360, 640),
    (720, 1280),
    (1080, 1920),
    (1920, 1080),
    (2160, 3840),
    (3840, 2160),
    (4320, 7680),
    (20, 4000),
    (4000, 20),
    (1, 1),
    (333, 777),
]
DURATIONS = [0.1, 0.4, 1.0, 7.5, 60.0, 600.0, 3600.0, 4 * 3600.0]


@pytest.mark.parametrize("budget", [65536, 20000, 4800, 48])
def test_budget_never_exceeded(budget):
    cfg = SlowFastConfig(token_budget=budget)
    rng = np.random.default_rng(budget)
    for h, w in RESOLUTIONS:
        for duration in DURATIONS:
            n = max(1, min(int(duration * 2 + 1e-9), cfg.max_frames, max_frames_for_budget(cfg)))
            for share in (1.0, 0.5, 0.1, 0.0):
                labels = rng.random(n) < share
                labels[0] = True
                plan = plan_from_labels(labels, np.arange(n), np.arange(n) / 2, h, w, cfg)
                assert plan.total_tokens <= budget, (h, w, duration, share)
                assert plan.total_tokens == sum(f.tokens for f in plan.frames)
                for f in plan.frames:
                    assert f.height % 28 == 0 and f.width % 28 == 0 and f.tokens == f.height * f.width // 784
                    assert 1 <= f.tokens <= cfg.max_tokens
                slow, fast = plan.slow_tokens_per_frame, plan.fast_tokens_per_frame
                assert fast <= max(int(0.3 * slow), 48)


def test_budget_search_finds_the_largest_cap():
    """Brute force over every cap in [48, 768]: the binary search returns the sizes of the largest cap that fits."""
    for h, w in RESOLUTIONS:
        for n_slow, n_fast in ((30, 90), (200, 1000), (1, 1364), (600, 0)):
            cfg = SlowFastConfig()
            fitting = []
            for cap in range(cfg.min_tokens, cfg.max_tokens + 1):
                s, f = token_budget_split(
                    n_slow, n_fast, h, w, SlowFastConfig(token_budget=10**9, max_tokens=cap)
                )
                if n_slow * s + n_fast * f <= cfg.token_budget:
                    fitting.append((s, f))
            assert token_budget_split(n_slow, n_fast, h, w, cfg) == fitting[-1], (h, w, n_slow, n_fast)


def test_fit_tokens_cap_and_reference_sizes():
    for h, w in RESOLUTIONS:
        for cap in (1, 4, 48, 49, 256, 768, 5000):
            fh, fw = fit_tokens(h, w, cap, min_tokens=min(48, cap))
            assert fh % 28 == 0 and fw % 28 == 0 and (fh // 28) * (fw // 28) <= cap
    # ordinary sizes: smart_resize's result (values from keye-vl-utils 1.5.2)
    assert feature_size(720, 1280) == (336, 588)
    assert fit_tokens(720, 1280, 768, 48) == (560, 1008)
    assert fit_tokens(720, 1280, 216, 48) == (308, 532)
    assert fit_tokens(1080, 1920, 768, 48) == (560, 1008)


def test_frame_count_cap():
    assert max_frames_for_budget() == 1365
    assert max_frames_for_budget(SlowFastConfig(token_budget=1000, min_tokens=10)) == 100


def test_sample_positions():
    cfr = np.arange(0, 300) * 512
    assert sample_positions(cfr, 20).tolist() == np.round(np.linspace(0, 299, 20)).astype(int).tolist()
    assert sample_positions(cfr, 1).tolist() == [0]
    assert sample_positions(cfr[:3], 10).tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------------------
# Labels on arrays


def _checker_frames(phases: np.ndarray) -> np.ndarray:
    """(N, gh, gw) 0/1 -> (N, gh*28, gw*28, 3) frames: each patch a coloured 4 px checkerboard of that phase.

    A patch and its flipped phase light disjoint pixels, so their HSV cosine similarity is exactly 0.
    """
    n, gh, gw = phases.shape
    colour = np.random.default_rng(0).integers(60, 256, (gh, gw, 3))
    yy, xx = np.mgrid[:28, :28]
    lit = ((yy // 4 + xx // 4) % 2)[None, None, None] ^ phases[..., None, None]  # (N, gh, gw, 28, 28)
    frames = lit[..., None] * colour[None, :, :, None, None, :]  # (N, gh, gw, 28, 28, 3)
    return frames.transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * 28, gw * 28, 3).astype(np.uint8)


def test_label_frames_rules():
    phases = np.zeros((5, 10, 10), np.int64)
    phases[2].reshape(-1)[:9] = 1  # 9 of 100 patches changed vs frame 0
    phases[3].reshape(-1)[:10] = 1  # 10 changed
    phases[4].reshape(-1)[:11] = 1  # 11 changed vs frame 0, 1 vs frame 3
    # 9 changed: 91% unchanged -> fast. 10 changed: exactly 90%, and the reference's float32 mean (0.8999999762)
    # is below 0.9 -> slow. Then only 1 patch differs from that new slow frame -> fast.
    assert label_frames(_checker_frames(phases)).tolist() == [True, False, False, True, False]


def test_label_frames_black_frames():
    black = np.zeros((3, 56, 84, 3), np.uint8)
    assert label_frames(black).tolist() == [True, False, False]  # all patches black in both frames: no 0/0
    img = _checker_frames(np.zeros((1, 2, 3), np.int64))
    half = img.copy()
    half[:, :, :28] = 0  # 2 of 6 patches black
    frames = np.concatenate([black[:1], img, img, half, black[:1]])
    # black -> image: every patch changed; image -> 2 black patches: 4/6 unchanged; -> black: the 2 patches black
    # in both are left out, the other 4 changed
    assert label_frames(frames).tolist() == [True, True, False, True, True]


def test_label_frames_checks_input():
    with pytest.raises(ValueError, match="not a multiple of the patch"):
        label_frames(np.zeros((2, 30, 56, 3), np.uint8))
    assert label_frames(np.zeros((2, 28, 28, 3), np.uint8), SlowFastConfig(enabled=False)).tolist() == [
        True,
        True,
    ]


def test_rgb_to_hsv_matches_opencv():
    rgb = [
        (0, 0, 0),
        (255, 255, 255),
        (255, 0, 0),
        (0, 255, 0),
        (0, 0, 255),
        (255, 255, 0),
        (0, 255, 255),
        (255, 0, 255),
        (128, 64, 32),
        (32, 64, 128),
        (10, 200, 90),
        (200, 10, 90),
        (1, 0, 0),
        (0, 1, 1),
        (254, 255, 255),
        (123, 123, 124),
        (90, 91, 92),
        (250, 5, 3),
        (3, 5, 250),
        (77, 200, 200),
    ]
    # cv2.cvtColor(np.array(rgb, np.uint8)[None], cv2.COLOR_RGB2HSV) with opencv-python-headless 5.0
    expected = [
        [0, 0, 0],
        [0, 0, 255],
        [0, 255, 255],
        [60, 255, 255],
        [120, 255, 255],
        [30, 255, 255],
        [90, 255, 255],
        [150, 255, 255],
        [10, 191, 128],
        [110, 191, 128],
        [73, 242, 200],
        [167, 242, 200],
        [0, 255, 1],
        [90, 255, 1],
        [90, 1, 255],
        [120, 2, 124],
        [105, 6, 92],
        [0, 252, 250],
        [120, 252, 250],
        [90, 157, 200],
    ]
    assert rgb_to_hsv(np.array(rgb, np.uint8)).tolist() == expected


def test_plan_dict_format():
    plan = plan_from_labels(
        np.array([True, False, False]),
        np.array([0, 15, 30]),
        np.array([0.0, 0.5, 1.0]),
        720,
        1280,
        video="v.mp4",
        duration=1.5,
        native_fps=30,
        sample_fps=2,
    )
    d = plan.to_dict()
    assert list(d) == [
        "video",
        "duration",
        "native_fps",
        "sample_fps",
        "frames",
        "slow_tokens_per_frame",
        "fast_tokens_per_frame",
        "total_tokens",
        "budget",
        "compress",
        "tokens_after_compression",
    ]
    assert d["frames"][1] == {"index": 15, "time": 0.5, "kind": "fast", "tokens": plan.fast_tokens_per_frame}
    assert d["compress"] == "none" and d["tokens_after_compression"] == d["total_tokens"] == plan.total_tokens
    assert d["slow_tokens_per_frame"] == 720 and d["fast_tokens_per_frame"] == 209  # 308x532 (cap 216)
    assert d["total_tokens"] == 720 + 2 * 209
    plan.compress, plan.tokens_after_compression = "dyntok", 300
    assert plan.to_dict()["tokens_after_compression"] == 300
    json.dumps(d)
    assert isinstance(plan, VideoPlan) and isinstance(plan.frames[0], FramePlan)
    assert math.isclose(d["sample_fps"], 2.0)


def test_reference_frames_point_fast_frames_at_their_slow_frame():
    from keye.encoders.slowfast import reference_frames

    kinds = ["slow", "fast", "fast", "slow", "slow", "fast"]
    assert reference_frames(kinds) == [0, 0, 0, 2, 3, 4]  # first: itself; slow: the frame before
    assert reference_frames(["slow"]) == [0]


def test_linspace_matches_torch():
    """The reference picks frames with torch.linspace(0, N-1, n) in float32, rounded; keye reproduces it without
    torch. Compared with torch itself: every n <= total < 200, and 5,000 random pairs up to 3 million frames."""
    import torch

    from keye.encoders.slowfast import _linspace_round

    rng = np.random.default_rng(0)
    pairs = [(t, n) for t in range(1, 200) for n in range(1, t + 1)]
    pairs += [
        (int(t), int(min(n, t)))
        for t, n in zip(rng.integers(200, 3_000_000, 5000), rng.integers(1, 1366, 5000))
    ]
    for total, n in pairs:
        expected = torch.linspace(0, total - 1, n, dtype=torch.float32).round().long().numpy()
        np.testing.assert_array_equal(
            _linspace_round(total - 1, n), expected, err_msg=f"{total} frames, {n} samples"
        )
