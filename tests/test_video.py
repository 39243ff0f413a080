"""Video decoding, sampling and writing (encoders/video.py), on small files written by ``write_video``.

Each test frame shows its own index as 8 black/white vertical bars (bit b of the index -> bar b), so a test can read
back which frame it got and check that an index really is that frame, after compression and resizing.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import threading
import time

import numpy as np
import pytest

from keye.encoders import video
from keye.encoders.video import (
    Frames,
    VideoInfo,
    frame_times,
    iter_frames,
    probe,
    read_frames,
    sample_indices,
    write_video,
)
from keye.errors import VideoDecodeError

HAS_DECORD = importlib.util.find_spec("decord") is not None
BACKENDS = [
    pytest.param("decord", marks=pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")),
    "pyav",
]
H, W = 64, 96
VFR_PTS = [0.0, 0.1, 0.5, 0.6, 1.5]  # seconds; gaps of 0.1 to 0.9 s


def coded_frame(i: int, h: int = H, w: int = W) -> np.ndarray:
    """(h, w, 3) uint8 frame whose 8 vertical bars spell ``i`` in binary (bar b white = bit b set)."""
    frame = np.zeros((h, w, 3), dtype=np.uint8)
    for b in range(8):
        if (i >> b) & 1:
            frame[:, b * w // 8 : (b + 1) * w // 8] = 255
    return frame


def read_codes(frames: np.ndarray) -> np.ndarray:
    """Frame numbers spelled by ``coded_frame`` frames ``(N, H, W, 3)``, whatever their size: ``(N,)``."""
    w = frames.shape[2]
    centres = ((np.arange(8) + 0.5) * w / 8).astype(int)
    bits = frames[:, :, centres].mean(axis=(1, 3)) > 128  # (N, 8)
    return (bits * (1 << np.arange(8))).sum(axis=1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict:
    """Every test video, written once per module (a few ms each)."""
    d = tmp_path_factory.mktemp("videos")
    v = {}
    v["cfr"] = write_video(d / "cfr.mp4", (coded_frame(i) for i in range(90)), fps=30)  # 3.0 s
    v["mkv"] = write_video(d / "cfr.mkv", (coded_frame(i) for i in range(90)), fps=30)
    v["vfr"] = write_video(d / "vfr.mp4", [coded_frame(i) for i in range(5)], fps=8, pts=VFR_PTS)
    v["short"] = write_video(d / "short.mp4", [coded_frame(i) for i in range(9)], fps=30)  # 0.3 s
    v["single"] = write_video(d / "single.mp4", [coded_frame(7)], fps=30)
    return v


# ----------------------------------------------------------------------------------------------------------------
# write_video


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_video_vfr_keeps_exact_times(videos, backend):
    # Regression: the encoder's 1/fps clock rounded these to [0, 0.125, 0.5, 0.625, 1.5].
    np.testing.assert_allclose(frame_times(videos["vfr"], backend=backend), VFR_PTS, atol=1e-6)


def test_write_video_ntsc_rate(tmp_path):
    path = write_video(tmp_path / "ntsc.mp4", (coded_frame(i) for i in range(30)), fps=30000 / 1001)
    times = frame_times(path, backend="pyav")
    np.testing.assert_allclose(times, np.arange(30) * 1001 / 30000, atol=1e-6)
    assert probe(path).native_fps == pytest.approx(29.97, abs=1e-3)


def test_write_video_rejects_bad_pts(tmp_path):
    with pytest.raises(ValueError, match="increase"):
        write_video(tmp_path / "a.mp4", [coded_frame(0)] * 3, fps=8, pts=[0.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="more frames than pts"):
        write_video(tmp_path / "b.mp4", [coded_frame(0)] * 3, fps=8, pts=[0.0, 0.5])


# ----------------------------------------------------------------------------------------------------------------
# probe and sampling


@pytest.mark.parametrize("backend", BACKENDS)
def test_probe(videos, backend):
    info = probe(videos["cfr"], backend=backend)
    assert isinstance(info, VideoInfo)
    assert (info.num_frames, info.width, info.height, info.backend) == (90, W, H, backend)
    assert info.duration == pytest.approx(3.0, abs=1e-3)
    assert info.native_fps == pytest.approx(30.0, abs=1e-3)
    vfr = probe(videos["vfr"], backend=backend)
    assert vfr.num_frames == 5
    # 1.5 s from first to last frame, plus the median gap (0.25 s) for the last frame.
    assert vfr.duration == pytest.approx(1.75, abs=1e-3)


def test_sample_indices_known_answers():
    times = np.arange(90) / 30  # 3 s at 30 fps
    np.testing.assert_array_equal(sample_indices(times, fps=2), [0, 15, 30, 45, 60, 75])
    np.testing.assert_array_equal(sample_indices(times, fps=1), [0, 30, 60])
    np.testing.assert_array_equal(
        sample_indices(times, fps=100), np.arange(90)
    )  # capped at the native 30 fps
    # Capped: targets 0, 0.75, 1.5, 2.25 s spread over the clip; 0.75 s and 2.25 s fall between two frames
    # (22.5 and 67.5 frames): the earlier one wins.
    np.testing.assert_array_equal(sample_indices(times, fps=2, max_frames=4), [0, 22, 45, 67])
    # VFR: targets 0, 0.5, 1.0, 1.5 take the nearest frame each (1.0 s -> 0.6 s, not 1.5 s).
    np.testing.assert_array_equal(sample_indices(np.array(VFR_PTS), fps=2), [0, 2, 3, 4])
    # A clip shorter than one sampling interval still gives its first frame; so does a single frame.
    np.testing.assert_array_equal(sample_indices(times[:9], fps=2), [0])
    np.testing.assert_array_equal(sample_indices(np.array([0.0]), fps=2), [0])
    with pytest.raises(ValueError):
        sample_indices(times, fps=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_frames_counts_times_and_content(videos, backend):
    got = read_frames(videos["cfr"], fps=2, backend=backend)
    assert isinstance(got, Frames)
    assert got.frames.shape == (6, H, W, 3) and got.frames.dtype == np.uint8
    np.testing.assert_array_equal(got.indices, [0, 15, 30, 45, 60, 75])
    np.testing.assert_allclose(got.times, [0, 0.5, 1, 1.5, 2, 2.5], atol=1e-3)
    np.testing.assert_array_equal(read_codes(got.frames), got.indices)  # each index really is that frame
    assert got.info.backend == backend
    assert len(read_frames(videos["cfr"], fps=100, backend=backend)) == 90
    capped = read_frames(videos["cfr"], fps=2, max_frames=4, backend=backend)
    np.testing.assert_array_equal(read_codes(capped.frames), [0, 22, 45, 67])


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_frames_vfr_uses_real_times(videos, backend):
    got = read_frames(videos["vfr"], fps=2, backend=backend)
    np.testing.assert_array_equal(got.indices, [0, 2, 3, 4])
    np.testing.assert_allclose(got.times, [0.0, 0.5, 0.6, 1.5], atol=1e-3)
    np.testing.assert_array_equal(read_codes(got.frames), [0, 2, 3, 4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_clip_and_single_frame_give_one_frame(videos, backend):
    short = read_frames(videos["short"], fps=2, backend=backend)
    assert len(short) == 1 and short.times[0] == pytest.approx(0.0)
    single = read_frames(videos["single"], backend=backend)
    assert single.frames.shape == (1, H, W, 3) and read_codes(single.frames)[0] == 7


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("size", "expected"),
    [((56, 56), (56, 56)), ((30, 46), (30, 46)), (lambda h, w: (h // 2, w // 2 + 2), (H // 2, W // 2 + 2))],
)
def test_size(videos, backend, size, expected):
    got = read_frames(videos["cfr"], fps=2, size=size, backend=backend)
    assert got.frames.shape == (6, *expected, 3)
    assert (got.info.width, got.info.height) == (W, H)  # info keeps the native size
    np.testing.assert_array_equal(read_codes(got.frames), got.indices)


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
@pytest.mark.parametrize("name", ["cfr", "mkv", "vfr"])
@pytest.mark.parametrize("size", [None, (56, 56)])
def test_backends_agree(videos, name, size):
    a = read_frames(videos[name], fps=2, size=size, backend="decord")
    b = read_frames(videos[name], fps=2, size=size, backend="pyav")
    assert (a.info.backend, b.info.backend) == ("decord", "pyav")
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.times, b.times, atol=1e-3)
    np.testing.assert_allclose(
        frame_times(videos[name], "decord"), frame_times(videos[name], "pyav"), atol=1e-3
    )
    # Same scaler (bicubic) and colour conversion: only edge pixels may differ slightly after resizing.
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).mean() < (0.5 if size is None else 4.0)
    assert a.info.num_frames == b.info.num_frames
    assert a.info.duration == pytest.approx(b.info.duration, abs=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# iter_frames and fallbacks


@pytest.mark.parametrize("backend", BACKENDS)
def test_iter_frames_chunks(videos, backend):
    chunks = list(
        iter_frames(videos["cfr"], indices=[80, 3, 3, 10, 50, 40], size=(32, 40), batch=2, backend=backend)
    )
    assert [len(c) for c in chunks] == [2, 2, 1]
    idx = np.concatenate([c.indices for c in chunks])
    np.testing.assert_array_equal(idx, [3, 10, 40, 50, 80])  # sorted, deduplicated
    np.testing.assert_array_equal(np.concatenate([read_codes(c.frames) for c in chunks]), idx)
    assert chunks[0].frames.shape == (2, 32, 40, 3)
    by_time = list(iter_frames(videos["vfr"], times=[0.05, 0.95, 1.4], backend=backend))
    np.testing.assert_array_equal(by_time[0].indices, [0, 3, 4])  # 0.05 ties 0.0/0.1 -> earlier; 0.95 -> 0.6
    assert list(iter_frames(videos["cfr"], indices=[], backend=backend)) == []
    with pytest.raises(ValueError, match="exactly one"):
        iter_frames(videos["cfr"], backend=backend)  # raises at the call, not at the first next()
    with pytest.raises(ValueError, match="frame indices"):
        iter_frames(videos["cfr"], indices=[90], backend=backend)
    with pytest.raises(VideoDecodeError, match="no such file"):
        iter_frames(videos["cfr"].with_name("nope.mp4"), indices=[0], backend=backend)


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
def test_auto_falls_back_when_decord_cannot_output_a_width(videos, caplog):
    # decord 0.6 cannot output 48-pixel-wide frames (padded rows); "auto" must say so and use PyAV.
    import decord

    try:
        decord.VideoReader(str(videos["cfr"]), width=48, height=32).get_batch([0])
        pytest.skip("this decord outputs 48-pixel-wide frames; no real failure to fall back from")
    except decord.DECORDError:
        pass
    with pytest.raises(VideoDecodeError, match="cfr.mp4: decord cannot read it"):
        read_frames(videos["cfr"], size=(32, 48), backend="decord")
    with caplog.at_level(logging.WARNING, logger=video.__name__):
        got = read_frames(videos["cfr"], size=(32, 48), backend="auto")
    assert "falling back to PyAV" in caplog.text
    assert got.info.backend == "pyav" and got.frames.shape == (6, 32, 48, 3)
    np.testing.assert_array_equal(read_codes(got.frames), [0, 15, 30, 45, 60, 75])


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
def test_auto_finishes_with_pyav_when_decord_fails_midway(videos, caplog, monkeypatch):
    real_iter = video._DecordReader.iter

    def failing_iter(self, indices, batch):
        yield next(real_iter(self, indices, batch))
        raise video._BackendError("simulated decoder failure")

    monkeypatch.setattr(video._DecordReader, "iter", failing_iter)
    with caplog.at_level(logging.WARNING, logger=video.__name__):
        chunks = list(iter_frames(videos["cfr"], indices=range(0, 90, 10), batch=3, backend="auto"))
    assert "decoding the rest with PyAV" in caplog.text
    assert [c.info.backend for c in chunks] == ["decord", "pyav", "pyav"]
    idx = np.concatenate([c.indices for c in chunks])
    np.testing.assert_array_equal(idx, np.arange(0, 90, 10))
    np.testing.assert_array_equal(np.concatenate([read_codes(c.frames) for c in chunks]), idx)
    with pytest.raises(VideoDecodeError, match="simulated"):
        read_frames(videos["cfr"], backend="decord")


def test_stream_without_timestamps(tmp_path, caplog):
    # A raw H.264 stream has no timestamps: decord refuses it, PyAV times frames at the declared rate.
    path = write_video(tmp_path / "raw.h264", (coded_frame(i) for i in range(30)), fps=25)
    with caplog.at_level(logging.WARNING, logger=video.__name__):
        got = read_frames(path, fps=2, backend="auto")
    assert "no timestamps" in caplog.text
    assert got.info.backend == "pyav"
    np.testing.assert_array_equal(
        got.indices, [0, 12, 25]
    )  # targets 0, 0.5, 1.0 s at 25 fps (0.48 s beats 0.52 s)
    np.testing.assert_allclose(got.times, [0.0, 0.48, 1.0])
    np.testing.assert_array_equal(read_codes(got.frames), got.indices)


def _peak_rss_growth(fn):
    """(fn(), peak growth in bytes of this process's resident memory while fn ran), sampled every 2 ms."""
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    start = proc.memory_info().rss
    peak, done = [start], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out = fn()
    finally:
        done.set()
        sampler.join()
    return out, peak[0] - start


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_stays_near_output_size(tmp_path, backend):
    # 150 frames of 480x640 are 138 MB at native size, 1.4 MB at 56x56. Decoding at native size first
    # measured 220-270 MB of growth; resizing while decoding, 7-15 MB (decoder buffers, threads).
    yy, xx = np.mgrid[0:480, 0:640]
    patterns = [
        np.stack([(xx + 8 * i) % 256, (yy + 4 * i) % 256, (xx + yy + i) % 256], -1).astype(np.uint8)
        for i in range(10)
    ]
    path = write_video(tmp_path / "long.mp4", (patterns[i % 10] for i in range(150)), fps=30, codec="mpeg4")
    del patterns
    got, growth = _peak_rss_growth(lambda: read_frames(path, fps=30, size=(56, 56), backend=backend))
    assert got.frames.shape == (150, 56, 56, 3) and got.info.backend == backend
    assert growth < 60e6, f"resident memory grew {growth / 1e6:.0f} MB for a 1.4 MB result"


# ----------------------------------------------------------------------------------------------------------------
# Bad input: every error is a VideoDecodeError that names the file


def _audio_only(path):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = (0.3 * np.sin(np.arange(1024) / 10)).astype(np.float32)[None]  # (channels=1, 1024)
        for k in range(8):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _corrupt_mdat(path, keep: int):
    """Overwrite the mp4's frame data (mdat box) with random bytes, keeping its first ``keep`` bytes."""
    data = bytearray(path.read_bytes())
    start = data.find(b"mdat") + 4
    size = int.from_bytes(data[start - 8 : start - 4], "big")
    n = size - 8 - keep
    data[start + keep : start + keep + n] = (
        np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    )
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("backend", ["auto", "pyav"])
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such file"),
        ("empty", "empty file"),
        ("text", "cannot open as a video"),
        ("half_mp4", "cannot open as a video"),  # the index (moov box) is at the end, cut off
        ("audio", "no video stream (streams: audio)"),
        ("garbage", "no decodable frames"),  # container intact, every frame's data random
    ],
)
def test_bad_input_raises(videos, tmp_path, backend, case, message):
    path = tmp_path / f"{case}.mp4"
    if case == "empty":
        path.touch()
    elif case == "text":
        path.write_text("this is not a video\n" * 20)
    elif case == "half_mp4":
        data = videos["cfr"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "audio":
        path = tmp_path / "audio.m4a"
        _audio_only(path)
    elif case == "garbage":
        path.write_bytes(videos["cfr"].read_bytes())
        _corrupt_mdat(path, keep=0)
    with pytest.raises(VideoDecodeError, match=re.escape(message)) as err:
        read_frames(path, backend=backend)
    assert str(err.value).startswith(f"{path}: ") and path.name in str(err.value)
    if case != "garbage":  # the index of the garbage file is fine: probe reads no frame data
        with pytest.raises(VideoDecodeError, match=re.escape(message)):
            probe(path, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_truncated_mkv_decodes_readable_part_with_warning(videos, tmp_path, backend, caplog):
    data = videos["mkv"].read_bytes()  # matroska: frames first, index last, so half the file still plays
    path = tmp_path / "half.mkv"
    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger=video.__name__):
        got = read_frames(path, fps=30, backend=backend)
    assert 10 < len(got) < 90 and got.times[-1] < 1.5
    np.testing.assert_array_equal(read_codes(got.frames), np.round(got.times * 30))  # frame i shows at i/30 s
    assert "half.mkv" in caplog.text and "truncated" in caplog.text


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_partly_corrupt_frames_give_readable_part_or_error(videos, tmp_path, backend, caplog):
    path = tmp_path / "partly.mp4"
    path.write_bytes(videos["cfr"].read_bytes())
    _corrupt_mdat(path, keep=2000)  # the first frames survive, the rest is random bytes
    with caplog.at_level(logging.WARNING, logger=video.__name__):
        got = read_frames(path, fps=2, backend=backend)
    assert 1 <= len(got) < 6
    assert got.indices[0] == 0 and read_codes(got.frames[:1])[0] == 0
    assert "partly.mp4" in caplog.text and "failed to decode" in caplog.text


def test_bad_arguments(videos):
    with pytest.raises(ValueError, match="backend"):
        probe(videos["cfr"], backend="opencv")
    with pytest.raises(ValueError, match="size"):
        read_frames(videos["cfr"], size=(0, 10))
