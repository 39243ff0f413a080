"""The video decoder: one file in, presentation times and frames out, streaming. Also `write_video` (tests, demos).

    index(path) -> VideoIndex           # every frame's presentation time, fps, duration, size (demux only, no decoding)
    decode(path, positions, size=None)  # -> the frames at those positions, in order, one at a time

Positions count the frames of the video stream in presentation order (``index(path).times[p]`` is frame p's time in
seconds from the start of the stream). Nothing assumes ``position / fps``: variable frame rate is read from the file.

Two backends behind this one interface, giving the same frames (tests/test_video.py checks it on constant and variable
frame rate clips):

- ``pyav`` (the default, ``auto``): demuxing once gives the index (and the keyframes). Decoding jumps to the keyframe
  before the next frame asked for whenever that keyframe lies ahead (sparse sampling of a long video decodes a GOP per
  frame, not the whole file); otherwise it decodes on, and packets of frames nobody asked for are decoded with
  ``skip_frame=NONREF``, so a frame that no other frame references (most B-frames of an h264 stream) is not decoded
  at all. Frames asked for, and what they reference, decode in full: pixels are exact. The codec runs slice threads:
  with frames skipped, about twice as fast as frame threads (or ``AUTO``) on h264 here.
- ``decord``: ``VideoReader.get_batch``, when asked for (``backend="decord"``); decord is optional.

``auto`` is PyAV: it was faster than decord at every sampling rate measured (``make bench`` prints both), so a missing
decord costs nothing. Frames are decoded in a background thread while the caller works on the previous ones, with a
bounded queue (about 32 MB of native frames whatever the resolution).

This module imports only numpy (PyAV, decord and PIL when used): no torch. Errors are `VideoDecodeError`, one line
naming the file. Display rotation metadata (phone videos) is not applied.

Not for: which frames to sample (``slowfast``), pixels-to-patches (``keye.processing``).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from keye.encoders.errors import VideoDecodeError, check_input_file

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "VideoIndex", "index", "decode", "resize", "write_video"]

BACKENDS = ("auto", "pyav", "decord")
# Native RGB frames in flight between the decoder thread and the caller: at most about this many bytes.
_QUEUE_BYTES = 32 << 20
_DECORD_BATCH = 8


@dataclass
class VideoIndex:
    """What demuxing a video tells, before any frame is decoded."""

    path: str
    pts: (
        np.ndarray
    )  # (N,) int64 presentation timestamps in ``time_base`` units, increasing (presentation order)
    time_base: Fraction
    start: int  # stream start (time_base units): times count from here
    height: int
    width: int
    duration: float  # seconds: first frame to the end of the last
    pts_exact: bool  # packets carried timestamps (else: frames in order at the average rate)
    # (K,) presentation timestamps of the keyframes (PyAV's index; empty: decode without seeking)
    keyframes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.pts)

    @property
    def times(self) -> np.ndarray:
        """(N,) presentation time of every frame, seconds from the start of the stream."""
        return (self.pts - self.start) * float(self.time_base)

    @property
    def fps(self) -> float:
        """Average frame rate: frames per second of duration."""
        return len(self.pts) / self.duration if self.duration > 0 else 0.0


def _import_av():
    """PyAV, with FFmpeg's own messages ("[h264 @ 0x...] Invalid NAL unit size") routed to Python logging (loggers
    ``libav.*``, errors only) instead of printed to stderr, unless the caller chose a level already."""
    import av
    import av.logging

    if av.logging.get_level() is None:
        av.logging.set_level(av.logging.ERROR)
    return av


def _short(err: Exception) -> str:
    """A library's error text without C++ log prefixes, timestamps and failed checks; one line, shortened."""
    text = (
        getattr(err, "strerror", None) or (str(err).strip().splitlines() or [""])[0]
    )  # PyAV: no path repeated
    text = re.sub(r"\[[\d:]+\] \S+?:\d+: ", "", text)
    text = re.sub(r"Check failed: .*? \(-?\d+ vs\. -?\d+\) ", "", text) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _cannot_open(err: Exception) -> str:
    detail = _short(err)
    if detail.startswith("Invalid data found"):  # FFmpeg's words for "not a container it knows, or cut short"
        return "cannot open as a video: not a video file, or truncated or corrupt"
    return f"cannot open as a video ({detail})"


def _video_stream(container, path: str):
    # 0x400: attached picture (cover art of an audio file), not a video
    streams = [s for s in container.streams.video if not (s.disposition.value & 0x400)]
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoDecodeError(path, f"no video stream (streams: {', '.join(kinds)})")
    return streams[0]


def _backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose from {', '.join(BACKENDS)}")
    return "pyav" if backend == "auto" else backend


# ----------------------------------------------------------------------------------------------------------------------
# index


def index(path: str | Path, backend: str = "auto") -> VideoIndex:
    """Every frame's presentation time, the size and the duration of ``path``'s video stream; no frame is decoded
    (PyAV demuxes packets; decord builds its own index). A truncated file is indexed up to where it can be read."""
    path = str(path)
    backend = _backend(backend)
    check_input_file(path, VideoDecodeError, "a video file")
    idx = _index_decord(path) if backend == "decord" else _index_pyav(path)
    if idx.height < 1 or idx.width < 1:
        raise VideoDecodeError(path, f"video stream has no frame size ({idx.width}x{idx.height})")
    return idx


def _index_pyav(path: str) -> VideoIndex:
    av = _import_av()

    try:
        container = av.open(path)
    except Exception as err:  # PyAV raises its own error classes for every failure to open
        raise VideoDecodeError(path, _cannot_open(err)) from err
    with container:
        stream = _video_stream(container, path)
        tb = stream.time_base or Fraction(1, 1000)
        pts, durations, keys, missing = [], [], [], 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:  # flush packets; frames an edit list hides
                    continue
                if packet.pts is None:
                    missing += 1
                    continue
                pts.append(packet.pts)
                durations.append(packet.duration or 0)
                if packet.is_keyframe:
                    keys.append(packet.pts)
        except av.error.FFmpegError as err:  # a truncated file: index the part that can be read
            logger.warning(
                "%s: read error after %d frames (%s); using the readable part", path, len(pts), _short(err)
            )
        height, width = stream.codec_context.height, stream.codec_context.width
        rate = stream.average_rate or stream.guessed_rate
        start = stream.start_time
        if stream.duration is not None:
            declared = float(stream.duration * tb)
        else:
            declared = container.duration / 1e6 if container.duration else 0.0
    if not pts and not missing:
        raise VideoDecodeError(path, "video stream has no frames")
    if missing:  # no presentation times (some raw or AVI streams): frames in order at the average rate
        n = len(pts) + missing
        rate = Fraction(rate) if rate else Fraction(25)
        logger.warning(
            "%s: no timestamps in the file; timing frames at its declared %.3f fps", path, float(rate)
        )
        return VideoIndex(
            path, np.arange(n, dtype=np.int64), 1 / rate, 0, height, width, float(n / rate), False
        )
    order = np.unique(np.asarray(pts, dtype=np.int64))  # presentation order; duplicates are the same frame
    last = durations[int(np.argmax(pts))] or (int(np.median(np.diff(order))) if len(order) > 1 else 0)
    if last == 0:  # a single frame without a duration: one frame period from the stream rate
        last = int(1 / (Fraction(rate) * tb)) if rate else 1
    start = int(order[0]) if start is None else min(int(start), int(order[0]))
    duration = float((int(order[-1] - order[0]) + last) * tb)
    keyframes = np.unique(np.asarray(keys, dtype=np.int64))
    if declared > duration * 1.05 + 1.0:
        logger.warning(
            "%s: the header says %.1f s but frames cover %.1f s (truncated?); using the readable part",
            path,
            declared,
            duration,
        )
    return VideoIndex(path, order, tb, start, height, width, duration, True, keyframes)


def _decord_reader(path: str):
    try:
        import decord
    except ImportError as err:
        raise ImportError(
            "backend='decord' needs decord (pip install decord), or use backend='pyav'"
        ) from err
    try:
        return decord.VideoReader(path, num_threads=0)
    except Exception as err:  # decord raises DECORDError (a RuntimeError) for every failure
        raise VideoDecodeError(path, _cannot_open(err)) from err


def _index_decord(path: str) -> VideoIndex:
    reader = _decord_reader(path)
    n = len(reader)
    if n == 0:
        raise VideoDecodeError(path, "video stream has no frames")
    stamps = reader.get_frame_timestamp(range(n))  # (N, 2) start, end seconds
    pts = np.round(stamps[:, 0].astype(np.float64) * 1e6).astype(np.int64)
    h, w = reader[0].shape[:2]
    duration = round(float(stamps[-1, 1] - stamps[0, 0]), 6)
    return VideoIndex(path, pts, Fraction(1, 1_000_000), 0, h, w, duration, True)


# ----------------------------------------------------------------------------------------------------------------------
# decode


def decode(
    path: str | Path,
    positions: Sequence[int] | np.ndarray,
    size: tuple[int, int] | None = None,
    *,
    backend: str = "auto",
    video_index: VideoIndex | None = None,
) -> Iterator[np.ndarray]:
    """The frames at ``positions`` (increasing positions into ``index(path).pts``), in order, as (H, W, 3) uint8 RGB.

    A generator: frames are decoded in a background thread as they are consumed, so memory stays bounded whatever the
    video's length. ``size`` (height, width) resizes each frame (PIL's antialiased bilinear); None keeps the native
    size. ``video_index`` is `index(path)` when the caller has it already (saves a demux pass). Raises
    `VideoDecodeError` naming the file when it cannot be read or a frame asked for does not decode.
    """
    path = str(path)
    backend = _backend(backend)
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) and (np.any(np.diff(positions) <= 0) or positions[0] < 0):
        raise ValueError("decode: positions must be increasing and non-negative")
    idx = video_index if video_index is not None else index(path, backend)
    if len(positions) and positions[-1] >= len(idx):
        raise VideoDecodeError(path, f"frame {int(positions[-1])} asked for, the video has {len(idx)}")
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if size[0] < 1 or size[1] < 1:
            raise ValueError(f"decode: size must be positive (height, width), got {size}")
        if size == (idx.height, idx.width):
            size = None
    # The decoding thread hands over native frames; resizing runs here, in the caller's thread, beside the decoding
    # (the decoding thread is the bottleneck: resizing there, or even making PIL images there, was slower).
    if backend == "decord":
        frames = _decode_decord(path, positions)
    else:
        frames = _decode_pyav(path, idx, positions)
    frames = _threaded(frames, maxsize=max(1, min(16, _QUEUE_BYTES // (3 * idx.height * idx.width))))
    return frames if size is None else (resize(f, size) for f in frames)


def resize(frame: np.ndarray, size: tuple[int, int], resample: str = "bilinear") -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 of ``size`` = (h, w), with PIL's antialiased ``bilinear`` or ``bicubic``
    filter: the one resize of decoded frames (`decode`, `keye.encoders.slowfast`); the frame itself when sizes agree.

    The reference's downscale for Slow-Fast features is torch's antialiased bilinear on uint8, a port of Pillow-SIMD's
    with differently rounded integer weights: about 0.1% of the pixels differ by one grey level."""
    if frame.shape[:2] == tuple(size):
        return frame
    from PIL import Image

    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
    return np.asarray(Image.fromarray(frame).resize((size[1], size[0]), filters[resample]))


def _decode_pyav(path: str, idx: VideoIndex, positions: np.ndarray) -> Iterator[np.ndarray]:
    av = _import_av()

    if len(positions) == 0:
        return
    wanted = set(positions.tolist())
    wanted_pts = set(idx.pts[positions].tolist()) if idx.pts_exact else None
    targets = idx.pts[positions]  # frames come out in presentation order: targets[got] is the next one due
    keys = idx.keyframes if idx.pts_exact else np.zeros(0, dtype=np.int64)
    got, order, corrupt = 0, 0, 0
    try:
        container = av.open(path)
    except Exception as err:
        raise VideoDecodeError(path, _cannot_open(err)) from err
    with container:
        stream = _video_stream(container, path)
        # Slice threads: with frames skipped, twice as fast as FRAME or AUTO threading on h264 (module docstring)
        stream.thread_type = "SLICE"
        ctx = stream.codec_context
        last_key = None  # presentation time of the last keyframe fed to the decoder
        sought = None  # the last jump: never jump there or back again (a container whose seek lands early)

        def seek_to() -> int | None:
            """Presentation time of the keyframe to jump to for the next frame due, when that keyframe lies ahead of
            the decoder (everything before it would be decoded for nothing); None: decode on. (Seeking by the
            keyframe's decoding time lands a keyframe early in mp4: FFmpeg seeks mp4 by presentation time.)"""
            if len(keys) == 0 or got == len(targets):
                return None
            j = int(np.searchsorted(keys, targets[got], side="right")) - 1
            if (
                j < 0
                or (last_key is not None and keys[j] <= last_key)
                or (sought is not None and keys[j] <= sought)
            ):
                return None
            return int(keys[j])

        try:
            while True:
                jump = seek_to()
                if jump is not None:  # lands on the keyframe at or before it; the decoder starts afresh there
                    container.seek(jump, backward=True, any_frame=False, stream=stream)
                    ctx.flush_buffers()
                    sought = jump
                for packet in container.demux(stream):
                    if packet.is_keyframe and packet.pts is not None:
                        last_key = packet.pts if last_key is None else max(last_key, packet.pts)
                    if wanted_pts is not None:
                        # A packet nobody asked for: decode it only if other frames reference it. Wanted frames, and
                        # the frames they reference, decode in full, so their pixels are exact.
                        ctx.skip_frame = "DEFAULT" if packet.pts in wanted_pts else "NONREF"
                    try:
                        decoded = ctx.decode(packet)
                    except (
                        av.error.InvalidDataError
                    ):  # a corrupt packet: only fatal if it held a frame asked for
                        corrupt += 1
                        continue
                    for frame in decoded:
                        pos = order  # without timestamps: the count of frames decoded so far
                        if wanted_pts is not None and frame.pts is not None:
                            pos = _nearest(idx.pts, frame.pts)
                        order += 1
                        if pos in wanted:
                            wanted.discard(pos)
                            yield frame.to_ndarray(format="rgb24")
                            got += 1
                            if not wanted:
                                return
                    if seek_to() is not None:
                        break  # the next frame due is past a keyframe not yet reached: jump there
                else:
                    break  # the end of the stream
        except av.error.FFmpegError as err:
            raise VideoDecodeError(path, f"decoding failed ({_short(err)})") from err
    why = f", {corrupt} corrupt packets" if corrupt else ""
    raise VideoDecodeError(path, f"decoded {got} of the {len(positions)} frames asked for{why}")


def _nearest(pts: np.ndarray, p: int) -> int:
    """Position of the presentation time nearest ``p`` (a decoder may report a frame's time a tick off)."""
    j = int(np.searchsorted(pts, p))
    if j == len(pts) or (j > 0 and p - pts[j - 1] <= pts[j] - p):
        return j - 1
    return j


def _decode_decord(path: str, positions: np.ndarray) -> Iterator[np.ndarray]:
    reader = _decord_reader(path)
    for s in range(0, len(positions), _DECORD_BATCH):
        chunk = positions[s : s + _DECORD_BATCH].tolist()
        try:
            batch = reader.get_batch(chunk).asnumpy()
        except Exception as err:  # DECORDError
            raise VideoDecodeError(path, f"decoding failed ({_short(err)})") from err
        yield from batch


def _threaded(it: Iterator, maxsize: int) -> Iterator:
    """Run an iterator in a thread (decoding overlaps the caller's work), with a bounded queue; errors re-raised here.
    Closing the returned generator early stops the thread."""
    q: queue.Queue = queue.Queue(maxsize)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as err:  # handed to the consumer, which re-raises it
            q.put(err)

    thread = threading.Thread(target=work, daemon=True, name="keye-video-decode")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


# ----------------------------------------------------------------------------------------------------------------------
# write


def write_video(
    path: str | Path,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    *,
    pts: Sequence[float] | None = None,
    codec: str = "libx264",
    crf: int = 23,
    preset: str = "veryfast",
    gop: int | None = None,
    audio: bool = False,
) -> Path:
    """Encode RGB uint8 frames ``(H, W, 3)`` to ``path`` with PyAV, streaming (frames may be a generator).

    ``pts`` (seconds, one per frame, increasing) writes a variable-frame-rate file whose times are exact to the
    millisecond; otherwise frames are ``1/fps`` apart. Odd widths/heights are cropped to even (yuv420p). ``gop``: at
    most this many frames from one keyframe to the next (the encoder's default otherwise). ``audio``
    adds a stereo AAC track of quiet noise as long as the video (as real footage has one).
    """
    av = _import_av()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)  # 1001 keeps NTSC rates (30000/1001) exact
    time_base = Fraction(1, 1000) if pts is not None else 1 / rate
    last_pts, i = -1, -1
    with av.open(str(path), mode="w") as container:
        stream = sound = None
        samples = 0
        for i, frame in enumerate(frames):
            frame = np.ascontiguousarray(frame, dtype=np.uint8)  # (H, W, 3)
            if stream is None:
                h, w = frame.shape[:2]
                stream = container.add_stream(codec, rate=rate)
                stream.width, stream.height = w - w % 2, h - h % 2
                stream.pix_fmt = "yuv420p"
                stream.time_base = time_base
                # The encoder has its own clock, 1/rate by default: VFR pts would be snapped to the 1/fps grid.
                stream.codec_context.time_base = time_base
                if codec == "libx264":
                    stream.options = {"crf": str(crf), "preset": preset}
                if gop is not None:
                    stream.codec_context.gop_size = gop
                if audio:
                    sound = container.add_stream("aac", rate=44100, layout="stereo")
            vf = av.VideoFrame.from_ndarray(frame[: stream.height, : stream.width], format="rgb24")
            if pts is not None:
                if i >= len(pts):
                    raise ValueError(f"{path}: write_video got more frames than pts ({len(pts)})")
                vf.pts = round(pts[i] / time_base)
                if vf.pts <= last_pts:
                    raise ValueError(
                        f"{path}: pts must increase by at least 1 ms, got {pts[i - 1]} then {pts[i]}"
                    )
                last_pts = vf.pts
            else:
                vf.pts = i
            vf.time_base = time_base
            for packet in stream.encode(vf):
                container.mux(packet)
            if sound is not None:  # audio up to this frame's end, in 1024-sample AAC frames
                end = round((float(vf.pts * time_base) + 1 / float(rate)) * 44100)
                while samples + 1024 <= end:
                    noise = np.random.default_rng(samples).normal(0, 300, (2, 1024)).astype(np.int16)
                    af = av.AudioFrame.from_ndarray(noise.reshape(1, -1), format="s16", layout="stereo")
                    af.sample_rate, af.pts = 44100, samples
                    for packet in sound.encode(af):
                        container.mux(packet)
                    samples += 1024
        if stream is None:
            raise ValueError(f"{path}: write_video got no frames")
        for s in (stream, sound):
            if s is not None:
                for packet in s.encode():
                    container.mux(packet)
    if pts is not None and i + 1 != len(pts):
        raise ValueError(f"{path}: write_video got {i + 1} frames for {len(pts)} pts")
    return path
