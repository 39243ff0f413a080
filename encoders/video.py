"""Video files in and out: decoding (decord, PyAV fallback), uniform sampling by presentation time, and writing.

Not for frame selection (``slowfast``) or pixels-to-patches (``keye.processing``).

Public API::

    probe(path) -> VideoInfo                                  # size, duration, frame rate, frame count
    frame_times(path) -> np.ndarray                           # (num_frames,) time of every frame, seconds
    sample_indices(times, fps=2.0, max_frames=1365)           # which frames uniform sampling picks
    read_frames(path, fps=2.0, max_frames=1365, size=None)    # -> Frames: sampled frames in one array
    iter_frames(path, indices=... | times=..., size=None)     # -> Frames chunks, bounded memory
    write_video(path, frames, fps, pts=None)                  # encode frames (tests, demos)

Times are presentation times in seconds from the start of the video stream, read from the file (variable frame rate
is handled; nothing assumes ``index / fps``). Frame indices count the frames of the video stream in presentation
order. Frames are resized while decoding (``size=``), so a long video is never held at native resolution.

Backends: decord (fast random access) when it is installed and can read the file, else PyAV (sequential decoding).
``backend="auto"`` falls back to PyAV with a logged warning when decord fails on a file. Both give the same indices
and times. Display rotation metadata (phone videos) is not applied by either backend.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from keye.errors import VideoDecodeError

logger = logging.getLogger(__name__)

Size = tuple[int, int] | Callable[[int, int], tuple[int, int]] | None
BACKENDS = ("auto", "decord", "pyav")
# A target whose distances to the frames either side differ by less than this (seconds) is a tie, and the earlier
# frame wins. decord reports float32 seconds (about 1e-4 s of error after an hour): without the tolerance, an exact
# tie (2 fps sampling of a 3 fps clip) could break differently in the two backends.
_TIE_S = 5e-4
_BATCH_BYTES = 64 << 20


@dataclass
class VideoInfo:
    """What a video file holds, read from its frame index (no frame is decoded).

    ``duration`` spans the first frame's time to the end of the last frame (last time + median frame interval);
    ``native_fps`` is the mean frame rate over that span (``declared`` rate for one-frame videos); ``num_frames`` is
    the number of frames in the stream's index (frames that fail to decode in a corrupt file are still counted).
    """

    path: Path
    duration: float  # seconds
    native_fps: float
    num_frames: int
    width: int  # native, before any resize
    height: int
    backend: str  # "decord" or "pyav": the backend that read the file


@dataclass
class Frames:
    """Decoded frames with their presentation times and their indices in the video stream."""

    frames: np.ndarray  # (N, H, W, 3) uint8 RGB
    times: np.ndarray  # (N,) float64 seconds from the start of the stream
    indices: np.ndarray  # (N,) int64, increasing, index of each frame among all frames of the stream
    info: VideoInfo

    def __len__(self) -> int:
        return len(self.indices)


# ---------------------------------------------------------------------------------------------------------------
# Public functions


def probe(path: str | Path, backend: str = "auto") -> VideoInfo:
    """Describe a video without decoding frames (the backend reads its packet index: cost ~ file size, not pixels).

    Raises ``VideoDecodeError`` for a missing, empty or unreadable file, or one without a video stream.
    """
    return _open(path, backend, decode=False).info


def frame_times(path: str | Path, backend: str = "auto") -> np.ndarray:
    """Presentation time (seconds) of every frame of the video stream, in order: ``(num_frames,)`` float64."""
    return _open(path, backend, decode=False).times.copy()


def sample_indices(times: np.ndarray, *, fps: float = 2.0, max_frames: int = 1365) -> np.ndarray:
    """Indices of the frames that uniform sampling at ``min(fps, native fps)`` picks, at most ``max_frames``.

    ``times`` (``(num_frames,)`` increasing seconds, from ``frame_times``) are the real presentation times. Target
    times are ``t0, t0 + step, ...`` over the clip's duration, with ``step = 1 / min(fps, native_fps)``, or wider
    (``duration / max_frames``) when that would give more than ``max_frames`` targets, so a capped sample is spread
    evenly over the whole clip. Each target takes the frame whose time is nearest (ties go to the earlier frame);
    a frame picked twice is kept once, so a variable-frame-rate clip can yield fewer frames than targets. A clip
    shorter than one step still gives one frame (its first). Returns ``(N,)`` int64, increasing, ``N >= 1``.
    """
    if fps <= 0 or max_frames < 1:
        raise ValueError(
            f"sample_indices needs fps > 0 and max_frames >= 1, got fps={fps}, max_frames={max_frames}"
        )
    times = np.asarray(times, dtype=np.float64)  # (num_frames,)
    if len(times) == 0:
        raise ValueError("sample_indices got no frame times")
    native_fps, duration = _timing(times, declared_fps=None)
    if len(times) == 1 or duration <= 0:
        return np.zeros(1, dtype=np.int64)
    step = max(1.0 / min(fps, native_fps), duration / max_frames)
    # The small epsilon keeps float noise (e.g. 3.0000001 s * 2 fps) from adding a target past the end.
    n = min(max_frames, max(1, math.ceil(duration / step - 1e-6)))
    targets = times[0] + step * np.arange(n)  # (n,)
    return _nearest(times, targets)


def read_frames(
    path: str | Path,
    *,
    fps: float = 2.0,
    max_frames: int = 1365,
    size: Size = None,
    backend: str = "auto",
) -> Frames:
    """Decode the frames that ``sample_indices`` picks, resized to ``size`` while decoding.

    ``size``: ``None`` (native), ``(height, width)``, or a callable ``(native_h, native_w) -> (h, w)``.
    Only the sampled frames are ever converted to RGB, at the target size: peak memory is about the returned array.
    A corrupt file gives the frames that decode, with a logged warning; ``VideoDecodeError`` when none do.
    """
    reader = _open(path, backend, size)
    indices = sample_indices(reader.times, fps=fps, max_frames=max_frames)
    h, w = reader.size
    frames = np.empty((len(indices), h, w, 3), dtype=np.uint8)  # (N, H, W, 3), filled chunk by chunk
    got, times, info = [], [], reader.info
    batch = max(1, min(32, _BATCH_BYTES // (h * w * 3)))  # a decoded chunk stays under ~64 MB
    for chunk in _decode(reader, indices, batch=batch):
        frames[len(got) : len(got) + len(chunk)] = chunk.frames
        got.extend(chunk.indices.tolist())
        times.extend(chunk.times.tolist())
        info = chunk.info  # the PyAV reader's, if decord failed part-way
    got = np.asarray(got, dtype=np.int64)  # (n,) n <= N when some frames would not decode
    return Frames(
        frames=frames[: len(got)], times=np.asarray(times, dtype=np.float64), indices=got, info=info
    )


def iter_frames(
    path: str | Path,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    times: Sequence[float] | np.ndarray | None = None,
    size: Size = None,
    backend: str = "auto",
    batch: int = 16,
) -> Iterator[Frames]:
    """Yield the requested frames in chunks of at most ``batch``, in increasing index order.

    Give exactly one of ``indices`` (frame indices, as from ``sample_indices``) or ``times`` (seconds: each takes the
    nearest frame). Duplicates are dropped and the order is increasing. Memory stays at about one chunk at ``size``,
    whatever the video's length, so this is the way to scan a long video (e.g. at a small size for similarity).
    Each chunk is a ``Frames`` whose ``frames`` is ``(b, H, W, 3)``; frames that fail to decode are skipped with a
    logged warning, and ``VideoDecodeError`` is raised if none decode.
    """
    # Not a generator itself: bad arguments and unreadable files raise here, at the call, not at the first next().
    if (indices is None) == (times is None):
        raise ValueError("iter_frames needs exactly one of indices= or times=")
    if batch < 1:
        raise ValueError(f"iter_frames needs batch >= 1, got {batch}")
    reader = _open(path, backend, size)
    if times is not None:
        wanted = _nearest(reader.times, np.asarray(times, dtype=np.float64).reshape(-1))
    else:
        wanted = np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))
        if len(wanted) and (wanted[0] < 0 or wanted[-1] >= len(reader.times)):
            raise ValueError(f"{reader.path.name}: frame indices must be in [0, {len(reader.times)})")
    return _decode(reader, wanted, batch=batch) if len(wanted) else iter(())


def write_video(
    path: str | Path,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    *,
    pts: Sequence[float] | None = None,
    codec: str = "libx264",
    crf: int = 23,
) -> Path:
    """Encode RGB uint8 frames ``(H, W, 3)`` to ``path`` with PyAV, streaming (frames may be a generator).

    ``pts`` (seconds, one per frame, increasing) writes a variable-frame-rate file whose times are exact to the
    millisecond; otherwise frames are ``1/fps`` apart. Odd widths/heights are cropped to even (yuv420p).
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)  # 1001 keeps NTSC rates (30000/1001) exact
    time_base = Fraction(1, 1000) if pts is not None else 1 / rate
    last_pts = -1
    with av.open(str(path), mode="w") as container:
        stream = None
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
                    stream.options = {"crf": str(crf), "preset": "veryfast"}
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
        if stream is None:
            raise ValueError(f"{path}: write_video got no frames")
        for packet in stream.encode():
            container.mux(packet)
    if pts is not None and i + 1 != len(pts):
        raise ValueError(f"{path}: write_video got {i + 1} frames for {len(pts)} pts")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Sampling helpers


def _timing(times: np.ndarray, declared_fps: float | None) -> tuple[float, float]:
    """(native_fps, duration) of frames at ``times``; see ``VideoInfo``."""
    if len(times) >= 2 and times[-1] > times[0]:
        span = float(times[-1] - times[0])
        native_fps = (len(times) - 1) / span
        return native_fps, span + float(np.median(np.diff(times)))
    native_fps = declared_fps or 1.0
    return native_fps, 1.0 / native_fps


def _nearest(times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the frame nearest each target (ties to the earlier frame), deduplicated: ``(<= len(targets),)``."""
    if len(times) == 1:
        return np.zeros(min(1, len(targets)), dtype=np.int64)
    right = np.clip(np.searchsorted(times, targets), 1, len(times) - 1)  # first frame at or after the target
    left = right - 1
    take_left = (targets - times[left]) <= (times[right] - targets) + _TIE_S
    return np.unique(np.where(take_left, left, right).astype(np.int64))


def _resolve_size(size: Size, native_h: int, native_w: int) -> tuple[int, int]:
    """Output (height, width) for ``size`` (None, (h, w) or a callable of the native (h, w))."""
    if size is None:
        return native_h, native_w
    h, w = size(native_h, native_w) if callable(size) else size
    if int(h) != h or int(w) != w or h < 1 or w < 1:
        raise ValueError(f"frame size must be positive integers (height, width), got {(h, w)}")
    return int(h), int(w)


# ---------------------------------------------------------------------------------------------------------------
# Backends. A reader is opened once per call for one output size; it knows every frame's time (``times``) and
# decodes a sorted array of indices chunk by chunk (``iter``). The PyAV header check runs first for both backends,
# so a bad file gives the same error whichever backend is asked for.


class _BackendError(Exception):
    """decord failed on this file (it raises bare RuntimeError/DECORDError with C++ log text)."""


@dataclass
class _Header:
    width: int
    height: int
    declared_fps: float | None  # the container's average frame rate
    declared_duration: float | None  # seconds, from the stream or container header


def _read_header(path: Path) -> _Header:
    import av

    if not path.exists():
        raise VideoDecodeError(path, "no such file")
    if path.is_dir():
        raise VideoDecodeError(path, "is a directory, not a video file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["none"]
                raise VideoDecodeError(path, f"no video stream (streams: {', '.join(kinds)})")
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = container.duration / 1e6 if container.duration else None
            rate = stream.average_rate or stream.guessed_rate
            return _Header(
                width=stream.codec_context.width,
                height=stream.codec_context.height,
                declared_fps=float(rate) if rate else None,
                declared_duration=duration,
            )
    except av.error.FFmpegError as e:
        raise VideoDecodeError(
            path, f"cannot open as a video: not a video file, or a truncated/corrupt container ({e.strerror})"
        ) from e


def _open(
    path: str | Path, backend: str, size: Size = None, decode: bool = True
) -> _PyAVReader | _DecordReader:
    """The reader for ``path``; ``decode=False`` when only times/info are needed (no frame is decoded)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    path = Path(path)
    header = _read_header(path)
    hw = _resolve_size(size, header.height, header.width)
    if backend == "decord" and not _decord_available():
        raise ImportError("backend='decord' but decord is not installed (pip install decord), or use 'pyav'")
    if backend == "decord" or (backend == "auto" and _decord_available()):
        try:
            reader = _DecordReader(path, header, hw, check=decode)
            reader.fallback = backend == "auto"  # an explicit backend="decord" never switches silently
            return reader
        except _BackendError as e:
            if backend == "decord":
                raise VideoDecodeError(path, f"decord cannot read it: {e}") from e
            logger.warning("%s: decord failed (%s); falling back to PyAV", path.name, e)
    return _PyAVReader(path, header, hw)


def _decode(reader: _PyAVReader | _DecordReader, indices: np.ndarray, batch: int) -> Iterator[Frames]:
    """Chunks of ``Frames`` for sorted ``indices``; on a decord failure the rest comes from PyAV (warned)."""
    done = 0  # how many of ``indices`` have been handled by a finished chunk
    yielded = 0
    try:
        for frames, idx in reader.iter(indices, batch):
            done = int(np.searchsorted(indices, idx[-1], side="right"))
            yielded += len(idx)
            yield Frames(frames=frames, times=reader.times[idx], indices=idx, info=reader.info)
    except _BackendError as e:
        if not reader.fallback:
            raise VideoDecodeError(reader.path, f"decord failed while decoding: {e}") from e
        logger.warning(
            "%s: decord failed while decoding (%s); decoding the rest with PyAV", reader.path.name, e
        )
        reader = _PyAVReader(reader.path, reader.header, reader.size)
        rest = indices[done:]
        rest = rest[rest < len(reader.times)]
        for frames, idx in reader.iter(rest, batch):
            yielded += len(idx)
            yield Frames(frames=frames, times=reader.times[idx], indices=idx, info=reader.info)
    if yielded == 0:
        why = f" ({reader.errors} of {reader.info.num_frames} packets failed)" if reader.errors else ""
        raise VideoDecodeError(reader.path, f"no decodable frames{why}")


def _make_info(path: Path, header: _Header, times: np.ndarray, backend: str) -> VideoInfo:
    native_fps, duration = _timing(times, header.declared_fps)
    if header.declared_duration and header.declared_duration > duration * 1.05 + 1.0:
        logger.warning(
            "%s: header says %.1f s but frames cover only %.1f s (truncated file?); using the readable part",
            path.name,
            header.declared_duration,
            duration,
        )
    # Rounded: decord's float32 times would otherwise show as 29.99999967 fps.
    return VideoInfo(
        path, round(duration, 6), round(native_fps, 6), len(times), header.width, header.height, backend
    )


@functools.cache
def _decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        logger.info("decord is not installed; decoding videos with PyAV")
        return False
    return True


class _PyAVReader:
    """Sequential decoding with PyAV. Frame times come from the demuxed packets (no decoding needed)."""

    name = "pyav"
    fallback = False

    def __init__(self, path: Path, header: _Header, size: tuple[int, int]):
        import av

        self.path, self.header, self.size = path, header, size
        self.errors = 0  # packets that failed to decode in the last ``iter``
        self._pts = self._packet_pts(av)  # (num_frames,) int64 in stream time_base, or None: no timestamps
        if self._pts is None:
            n = self._count_frames(av)
            fps = header.declared_fps or 25.0
            logger.warning(
                "%s: no timestamps in the file; timing frames at its declared %.3f fps", path.name, fps
            )
            self.times = np.arange(n, dtype=np.float64) / fps  # (num_frames,)
        else:
            self.times = (self._pts - self._start) * float(self._time_base)  # (num_frames,)
        if len(self.times) == 0:
            raise VideoDecodeError(path, "the video stream has no frames")
        self.info = _make_info(path, header, self.times, self.name)

    def _packet_pts(self, av) -> np.ndarray | None:
        pts = []
        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            self._time_base = stream.time_base
            self._start = stream.start_time or 0
            try:
                for packet in container.demux(stream):
                    # Empty packets flush the decoder; discarded ones (edit lists) are never shown.
                    if packet.size == 0 or packet.is_discard:
                        continue
                    if packet.pts is None:
                        return None
                    pts.append(packet.pts)
            except av.error.FFmpegError as e:
                logger.warning(
                    "%s: read error after %d frames (%s); using the readable part",
                    self.path.name,
                    len(pts),
                    e,
                )
        return np.unique(np.asarray(pts, dtype=np.int64))

    def _count_frames(self, av) -> int:
        with av.open(str(self.path)) as container:
            return sum(1 for _ in self._decoded(av, container))

    def _decoded(self, av, container) -> Iterator:
        """Every frame that decodes, in presentation order; undecodable packets are counted in ``self.errors``."""
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        self.errors = 0
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    self.errors += 1
                    continue
                yield from frames
        except av.error.FFmpegError as e:
            logger.warning("%s: read error while decoding (%s); stopping there", self.path.name, e)

    def _index_of(self, frame, counter: int) -> int:
        if self._pts is None or frame.pts is None:
            return counter
        j = int(np.clip(np.searchsorted(self._pts, frame.pts), 1, max(1, len(self._pts) - 1)))
        if len(self._pts) == 1 or frame.pts - self._pts[j - 1] <= self._pts[j] - frame.pts:
            return j - 1
        return j

    def iter(self, indices: np.ndarray, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Decode the whole stream up to the last wanted frame; convert only the wanted ones, at ``self.size``."""
        import av
        from av.video.reformatter import Interpolation, VideoReformatter

        h, w = self.size
        wanted = np.zeros(len(self.times), dtype=bool)
        wanted[indices] = True
        remaining = int(wanted.sum())
        if remaining == 0:
            return
        reformatter = VideoReformatter()  # one scaler context for all frames
        frames, idx = [], []
        with av.open(str(self.path)) as container:
            for counter, frame in enumerate(self._decoded(av, container)):
                i = self._index_of(frame, counter)
                if not wanted[i]:
                    continue
                wanted[i] = False
                remaining -= 1
                # bicubic: the scaler decord's ffmpeg filter graph uses, so both backends give the same pixels
                rgb = reformatter.reformat(
                    frame, width=w, height=h, format="rgb24", interpolation=Interpolation.BICUBIC
                )
                frames.append(rgb.to_ndarray())  # (H, W, 3)
                idx.append(i)
                if len(idx) == batch:
                    yield np.stack(frames), np.asarray(idx, dtype=np.int64)
                    frames, idx = [], []
                if remaining == 0:
                    break
        if idx:
            yield np.stack(frames), np.asarray(idx, dtype=np.int64)
        if self.errors:
            logger.warning("%s: %d packets failed to decode (corrupt file?)", self.path.name, self.errors)
        if remaining:
            logger.warning(
                "%s: %d of %d requested frames could not be decoded", self.path.name, remaining, len(indices)
            )


class _DecordReader:
    """Random access with decord: its index gives every frame's time; only the wanted frames are decoded."""

    name = "decord"
    errors = 0

    def __init__(self, path: Path, header: _Header, size: tuple[int, int], check: bool):
        import decord

        self.path, self.header, self.size = path, header, size
        h, w = size
        same = (h, w) == (header.height, header.width)
        try:
            # width/height make decord's own scaler resize each frame as it is decoded.
            self._vr = decord.VideoReader(
                str(path), ctx=decord.cpu(0), width=-1 if same else w, height=-1 if same else h
            )
            n = len(self._vr)
            self.times = (
                self._vr.get_frame_timestamp(np.arange(n))[:, 0].astype(np.float64) if n else np.zeros(0)
            )
        except (decord.DECORDError, RuntimeError) as e:
            raise _BackendError(_short(e)) from e
        if n == 0:
            raise _BackendError("no frames in decord's index")
        if check:
            # decord 0.6 mislays padded rows for some output widths (8, 12, 16, 24, 48, 72, ...: its
            # DLTensor takes linesize/width as the channel count). Decode one frame now, so such a width
            # falls back before any frame is handed out.
            try:
                self._vr.get_batch([0]).asnumpy()
            except (decord.DECORDError, RuntimeError) as e:
                raise _BackendError(f"cannot output {w}x{h} frames ({_short(e)})") from e
        self.info = _make_info(path, header, self.times, self.name)

    def iter(self, indices: np.ndarray, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        import decord

        for start in range(0, len(indices), batch):
            idx = indices[start : start + batch]  # (b,)
            try:
                frames = self._vr.get_batch(idx.tolist()).asnumpy()  # (b, H, W, 3)
            except (decord.DECORDError, RuntimeError) as e:
                raise _BackendError(_short(e)) from e
            yield frames, idx


def _short(e: Exception) -> str:
    """decord's messages carry C++ timestamps, file paths and failed checks: keep the human part, shortened."""
    text = re.sub(r"\[[\d:]+\] \S+?:\d+: ", "", str(e).strip().splitlines()[0] if str(e).strip() else "")
    text = re.sub(r"Check failed: .*? \(-?\d+ vs\. -?\d+\) ", "", text) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
