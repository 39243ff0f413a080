"""The video decoder (encoders/video.py: `index`, `decode`, `write_video`), on small files written by ``write_video``.

Each test frame shows its own number as 8 black/white vertical bars (bit b of the number -> bar b), so a test can read
back which frame it got and check that a position really is that frame, after compression and resizing.
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
from keye.encoders.video import decode, index, write_video
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


def read_codes(frames) -> np.ndarray:
    """Frame numbers spelled by ``coded_frame`` frames (a list or (N, H, W, 3)), whatever their size: ``(N,)``."""
    frames = np.stack(list(frames))
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
    # B-frames: x264's default GOP with frames nobody references, which PyAV skips when they are not asked for
    v["long"] = write_video(d / "long.mp4", (coded_frame(i % 256) for i in range(240)), fps=24)
    v["single"] = write_video(d / "single.mp4", [coded_frame(7)], fps=30)
    return v


# ----------------------------------------------------------------------------------------------------------------
# write_video and index


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_cfr_and_vfr(videos, backend):
    idx = index(videos["cfr"], backend=backend)
    assert (len(idx), idx.height, idx.width) == (90, H, W)
    assert idx.duration == pytest.approx(3.0, abs=1e-3) and idx.fps == pytest.approx(30.0, abs=1e-3)
    np.testing.assert_allclose(idx.times, np.arange(90) / 30, atol=1e-6)
    vfr = index(videos["vfr"], backend=backend)
    # Regression: the encoder's 1/fps clock rounded these to [0, 0.125, 0.5, 0.625, 1.5].
    np.testing.assert_allclose(vfr.times, VFR_PTS, atol=1e-6)
    # 1.5 s from first to last frame, plus the last frame's own duration (the backends read it differently)
    assert 1.5 < vfr.duration <= 1.5 + 0.9


def test_write_video_ntsc_rate_and_audio(tmp_path):
    import av

    path = write_video(
        tmp_path / "ntsc.mp4", (coded_frame(i) for i in range(30)), fps=30000 / 1001, audio=True
    )
    idx = index(path)
    np.testing.assert_allclose(idx.times, np.arange(30) * 1001 / 30000, atol=1e-6)
    assert idx.fps == pytest.approx(29.97, abs=1e-3)
    with av.open(str(path)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
    np.testing.assert_array_equal(read_codes(decode(path, [0, 29])), [0, 29])  # the audio stream is ignored


def test_write_video_rejects_bad_pts(tmp_path):
    with pytest.raises(ValueError, match="increase"):
        write_video(tmp_path / "a.mp4", [coded_frame(0)] * 3, fps=8, pts=[0.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="more frames than pts"):
        write_video(tmp_path / "b.mp4", [coded_frame(0)] * 3, fps=8, pts=[0.0, 0.5])


def test_stream_without_timestamps(tmp_path, caplog):
    # A raw H.264 stream has no timestamps: PyAV times frames at the declared rate, with a warning.
    path = write_video(tmp_path / "raw.h264", (coded_frame(i) for i in range(30)), fps=25)
    with caplog.at_level(logging.WARNING, logger=video.__name__):
        idx = index(path)
    assert "raw.h264: no timestamps" in caplog.text
    np.testing.assert_allclose(idx.times[[0, 12, 25]], [0.0, 0.48, 1.0])
    np.testing.assert_array_equal(read_codes(decode(path, [0, 12, 25])), [0, 12, 25])


# ----------------------------------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["cfr", "mkv", "vfr", "long", "single"])
def test_decode_gives_the_frames_asked_for(videos, backend, name):
    n = len(index(videos[name], backend=backend))
    positions = sorted({0, n // 3, min(n // 2 + 1, n - 1), n - 1})
    frames = list(decode(videos[name], positions, backend=backend))
    assert len(frames) == len(positions) and frames[0].shape == (H, W, 3) and frames[0].dtype == np.uint8
    expected = [7] if name == "single" else [p % 256 for p in positions]
    np.testing.assert_array_equal(read_codes(frames), expected)


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
@pytest.mark.parametrize("name", ["cfr", "mkv", "vfr", "long"])
def test_backends_give_identical_frames_and_times(videos, name):
    a, b = index(videos[name], "decord"), index(videos[name], "pyav")
    assert len(a) == len(b) and (a.height, a.width) == (b.height, b.width)
    np.testing.assert_allclose(a.times, b.times, atol=1e-3)
    positions = np.arange(0, len(a), 7)
    for x, y in zip(decode(videos[name], positions, backend="decord"), decode(videos[name], positions)):
        np.testing.assert_array_equal(x, y)  # pixel for pixel


def test_skipping_unreferenced_frames_keeps_pixels_exact(videos):
    """Frames decoded while their neighbours are skipped (skip_frame=NONREF) equal the frames of a full decode."""
    every = list(decode(videos["long"], range(240)))
    sparse = [0, 13, 14, 50, 101, 239]
    for p, frame in zip(sparse, decode(videos["long"], sparse)):
        np.testing.assert_array_equal(frame, every[p])


def test_seeking_to_keyframes_keeps_pixels_exact(tmp_path):
    """Sparse frames of a clip with a keyframe every 24 frames: the decoder jumps to the keyframe before each (instead
    of decoding everything up to it); the frames equal those of a full decode."""
    path = write_video(tmp_path / "gop.mp4", (coded_frame(i) for i in range(240)), fps=24, gop=24)
    idx = index(path)
    assert len(idx.keyframes) >= 10
    every = list(decode(path, range(240)))
    sparse = [3, 30, 31, 95, 180, 239]
    got = list(decode(path, sparse))
    for p, frame in zip(sparse, got):
        np.testing.assert_array_equal(frame, every[p])
    np.testing.assert_array_equal(read_codes(got), sparse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_size(videos, backend):
    frames = list(decode(videos["cfr"], [3, 40], size=(30, 46), backend=backend))
    assert [f.shape for f in frames] == [(30, 46, 3)] * 2
    np.testing.assert_array_equal(read_codes(frames), [3, 40])


def test_decode_arguments(videos):
    assert list(decode(videos["cfr"], [])) == []
    with pytest.raises(ValueError, match="increasing"):
        decode(videos["cfr"], [5, 3])  # raised at the call, not at the first next()
    with pytest.raises(VideoDecodeError, match=r"cfr.mp4: frame 90 asked for, the video has 90"):
        decode(videos["cfr"], [0, 90])
    with pytest.raises(ValueError, match="unknown video backend 'opencv'"):
        index(videos["cfr"], backend="opencv")


def test_closing_early_stops_the_decoder_thread(videos):
    before = threading.active_count()
    frames = decode(videos["long"], range(240))
    next(frames)
    frames.close()
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before


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
def test_streaming_memory_is_bounded(tmp_path, backend):
    # 300 frames of 480x640 are 276 MB at native size; consumed one at a time, a few of them are alive at once.
    yy, xx = np.mgrid[0:480, 0:640]
    patterns = [
        np.stack([(xx + 8 * i) % 256, (yy + 4 * i) % 256, (xx + yy + i) % 256], -1).astype(np.uint8)
        for i in range(10)
    ]
    path = write_video(tmp_path / "long.mp4", (patterns[i % 10] for i in range(300)), fps=30, codec="mpeg4")
    del patterns
    # the backend's first use (its libraries, the decoder's buffer pools) is not what streaming keeps
    assert sum(1 for _ in decode(path, range(20), backend=backend)) == 20
    count, growth = _peak_rss_growth(lambda: sum(1 for _ in decode(path, range(300), backend=backend)))
    assert count == 300
    assert growth < 70e6, f"resident memory grew {growth / 1e6:.0f} MB while streaming 276 MB of frames"


# ----------------------------------------------------------------------------------------------------------------
# Bad input: every error is a VideoDecodeError, one line, that names the file


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("empty", "empty file"),
        ("text", "cannot open as a video"),
        ("half_mp4", "cannot open as a video"),  # the index (moov box) is at the end, cut off
        ("audio", "no video stream (streams: audio)"),
        ("garbage", "of the 6 frames asked for"),  # container intact, every frame's data random
    ],
)
def test_bad_input_raises(videos, tmp_path, backend, case, message):
    path = tmp_path / f"{case}.mp4"
    if case == "empty":
        path.touch()
    elif case == "directory":
        path.mkdir()
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
    if backend == "decord" and case in ("audio", "garbage"):
        message = "cannot open as a video"  # decord checks the first frame when it opens a file
    with pytest.raises(VideoDecodeError, match=re.escape(message)) as err:
        list(decode(path, range(0, 90, 15), backend=backend))
    text = str(err.value)
    assert text.startswith(f"{path}: ") and "\n" not in text and len(text) < len(str(path)) + 200


def test_truncated_mkv_decodes_readable_part_with_warning(videos, tmp_path, caplog):
    data = videos["mkv"].read_bytes()  # matroska: frames first, index last, so half the file still plays
    path = tmp_path / "half.mkv"
    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger=video.__name__):
        idx = index(path)
    assert 10 < len(idx) < 90 and idx.times[-1] < 1.5
    assert "half.mkv" in caplog.text and "readable part" in caplog.text
    positions = np.arange(0, len(idx), 5)
    np.testing.assert_array_equal(read_codes(decode(path, positions)), positions)  # frame i shows at i/30 s


def test_partly_corrupt_file_names_the_file(videos, tmp_path):
    path = tmp_path / "partly.mp4"
    path.write_bytes(videos["cfr"].read_bytes())
    _corrupt_mdat(path, keep=2000)  # the first frames survive, the rest is random bytes
    np.testing.assert_array_equal(read_codes(decode(path, [0])), [0])
    with pytest.raises(VideoDecodeError, match=r"partly.mp4: decoded \d of the 6 frames asked for"):
        list(decode(path, range(0, 90, 15)))
