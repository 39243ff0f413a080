"""Slow-Fast video planning (Keye-VL-1.5): which frames to sample, which are slow (key) or fast, and at what size.

A video is sampled uniformly at ``min(fps, native fps)`` (at most ``max_frames``). Each sampled frame is compared with
the last slow frame, both downscaled to at most 256 patch tokens, in HSV, per 28x28 patch: a patch whose cosine
similarity exceeds 0.7 is unchanged (patches black in both frames are left out), and a frame with fewer than 90% of its
patches unchanged starts a new slow frame. The first frame is slow. Slow frames get the largest per-frame token count in
[48, 768] that keeps the whole video within the token budget; fast frames get 30% of it (at least 48).

This behaves like keye-vl-utils 1.5.2 (``process_vision_info``), with the same sampled frames (its float32 linspace,
reproduced without torch), OpenCV's 8-bit HSV (bit-exact), the same patch layout and thresholds; its features differ
from these only by the downscale's rounding (PIL's antialiased bilinear instead of torch's port of it: one grey level
on ~0.1% of pixels) and by float32 vs exact cosines (~1e-7), which left every label identical on the committed
fixtures and the benchmark clips. Differences by design:

- frames are decoded once, streaming, in bounded memory (`keye.encoders.video`): the reference holds every sampled
  frame at native resolution (gigabytes for a long 1080p video);
- the token budget is never exceeded (the reference's search can overshoot by one step, and its smart_resize can round
  above the cap); when even the minimum tokens per frame would exceed the budget, fewer frames are sampled, evenly
  spread, *before* labelling, so labels are always computed on the frames actually kept;
- the token budget counts each frame's actual tokens after resizing (the reference counts the caps, e.g. 48 for a
  fast frame that resizes to 45), so a long video gets somewhat larger slow frames for the same budget
  (``budget_rule="reference"`` restores the reference's rule; `SlowFastConfig.official` uses it);
- clips shorter than 1/fps give one frame (the reference gives none), frames that are black in both compared frames
  count as unchanged instead of dividing by zero, timestamps are presentation times (variable frame rate: frames
  nearest to instants uniform in time), videos without a video stream raise `VideoDecodeError`.

Frames come back resized with PIL's antialiased bilinear filter (``resample="bicubic"``: PIL's bicubic from the decoded
frame, as the official image processor resizes; converted Keye-VL-1.5 models use it). A frame is kept, while the video
streams by, at the largest size it can still get; when later slow frames shrink the budget share, it is downscaled
again at the end (two antialiased downscales instead of one: about 2 grey levels of mean difference).

No torch here: planning needs numpy and PIL (and the decoder, PyAV).

Not for: decoding (``keye.encoders.video``), pixels-to-patches and the prompt layout (``keye.processing``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keye.encoders import video as video_io
from keye.encoders.errors import ConfigError
from keye.encoders.hsv import hsv_planes
from keye.encoders.video import resize

__all__ = [
    "SlowFastConfig",
    "FramePlan",
    "VideoPlan",
    "fit_tokens",
    "feature_size",
    "label_frames",
    "token_budget_split",
    "max_frames_for_budget",
    "sample_positions",
    "plan_from_labels",
    "plan_video",
    "reference_frames",
]

# Features are computed this many frames at a time: about 20 MB of float32 patch vectors at 256 tokens per frame.
_FEATURE_BATCH = 8


@dataclass
class SlowFastConfig:
    """How a video is sampled, split into slow and fast frames, and sized to a token budget."""

    fps: float = 2.0  # sampling rate; the effective rate is min(fps, native fps)
    max_frames: int = 1365  # at most this many sampled frames
    token_budget: int = 65536  # vision tokens for the whole video (one token per 28x28 pixels)
    min_tokens: int = 48  # slow frames get between min_tokens and max_tokens tokens
    max_tokens: int = 768
    fast_ratio: float = 0.3  # a fast frame gets int(fast_ratio * slow tokens) tokens ...
    min_fast_tokens: int = 48  # ... but at least this many
    similarity_threshold: float = 0.7  # a patch is unchanged when its HSV cosine similarity exceeds this
    unchanged_ratio: float = 0.9  # new slow frame when fewer than this share of patches is unchanged
    enabled: bool = True  # False: every frame is slow and sampled uniformly (plain uniform sampling)
    patch: int = 28  # pixels per LLM token side (14-pixel ViT patches merged 2x2)
    feature_max_tokens: int = 256  # similarity features on frames of at most this many patches
    # How kept frames reach their planned size: "bilinear" (antialiased, streaming: frames are kept at their largest
    # possible size) or "bicubic" (PIL, from the decoded frame, as the official image processor resizes; sampled
    # frames are kept at native size until the plan is final, as keye-vl-utils keeps them).
    resample: str = "bilinear"
    # How the budget sizes frames: "actual" (keye: each frame's actual tokens counted, never over the budget) or
    # "reference" (keye-vl-utils 1.5.2: per-frame caps counted, its search and smart_resize, which can overshoot).
    budget_rule: str = "actual"

    def __post_init__(self) -> None:
        problems = []
        if not self.fps > 0:
            problems.append(f"fps must be > 0, got {self.fps}")
        if self.max_frames < 1:
            problems.append(f"max_frames must be >= 1, got {self.max_frames}")
        if not 1 <= self.min_tokens <= self.max_tokens:
            problems.append(f"need 1 <= min_tokens <= max_tokens, got {self.min_tokens}, {self.max_tokens}")
        if self.min_fast_tokens < 1 or not 0 <= self.fast_ratio <= 1:
            problems.append("need min_fast_tokens >= 1 and 0 <= fast_ratio <= 1")
        if self.budget_rule not in ("actual", "reference"):
            problems.append(f"budget_rule must be actual or reference, got {self.budget_rule!r}")
        if self.resample not in ("bilinear", "bicubic"):
            problems.append(f"resample must be bilinear or bicubic, got {self.resample!r}")
        if self.patch < 1 or self.feature_max_tokens < 1:
            problems.append("need patch >= 1 and feature_max_tokens >= 1")
        if self.token_budget < _min_frame_cost(self):
            problems.append(
                f"token_budget {self.token_budget} cannot hold one frame of {_min_frame_cost(self)} tokens"
            )
        if problems:
            raise ConfigError("SlowFastConfig", "; ".join(problems))

    @classmethod
    def official(cls, **overrides) -> SlowFastConfig:
        """Keye-VL-1.5's own settings, as keye-vl-utils 1.5.2 applies them: 2 fps, 65,536 tokens, its budget rule, and
        frames resized with bicubic from the decoded frame. ``overrides`` replace fields."""
        return cls(**{"budget_rule": "reference", "resample": "bicubic", **overrides})


@dataclass
class FramePlan:
    """One sampled frame: where it is in the source, whether it is slow or fast, and its size in pixels and tokens."""

    index: int  # index of the frame in the decoded source (presentation order)
    time: float  # presentation time in seconds from the start of the video stream (as encoders.video)
    kind: str  # "slow" | "fast"
    height: int  # multiples of `patch`
    width: int
    tokens: int  # (height / patch) * (width / patch)


@dataclass
class VideoPlan:
    """The Slow-Fast plan of one video; `to_dict()` is the object `keye frames --json` prints."""

    video: str
    duration: float  # seconds
    native_fps: float
    sample_fps: float  # the rate actually sampled (lower than requested when frames were capped)
    frames: list[FramePlan]
    slow_tokens_per_frame: int
    fast_tokens_per_frame: int
    total_tokens: int  # vision tokens of all frames, text markers excluded
    budget: int
    compress: str = "none"  # set by the caller that applies DynTok / Clapper
    tokens_after_compression: int | None = None  # None means: equal to total_tokens

    def to_dict(self) -> dict:
        return {
            "video": self.video,
            "duration": self.duration,
            "native_fps": self.native_fps,
            "sample_fps": self.sample_fps,
            "frames": [
                {"index": f.index, "time": f.time, "kind": f.kind, "tokens": f.tokens} for f in self.frames
            ],
            "slow_tokens_per_frame": self.slow_tokens_per_frame,
            "fast_tokens_per_frame": self.fast_tokens_per_frame,
            "total_tokens": self.total_tokens,
            "budget": self.budget,
            "compress": self.compress,
            "tokens_after_compression": (
                self.total_tokens if self.tokens_after_compression is None else self.tokens_after_compression
            ),
        }


def reference_frames(kinds: list[str]) -> list[int]:
    """The frame each sampled frame is compared with (a projector's temporal branch, `keye.modeling.KeyeProjector`):
    a fast frame's reference is the latest slow frame (the one Slow-Fast found it similar to), a slow frame's the
    frame before it, the first frame's itself (no reference). Indices into ``kinds``."""
    refs, last_slow = [], 0
    for i, kind in enumerate(kinds):
        refs.append(last_slow if kind == "fast" else max(i - 1, 0))
        if kind == "slow":
            last_slow = i
    return refs


# ----------------------------------------------------------------------------------------------------------------------
# Sizes and the token budget


def fit_tokens(
    height: int, width: int, max_tokens: int, min_tokens: int = 1, patch: int = 28, strict: bool = True
) -> tuple[int, int]:
    """Size ``(h, w)`` in multiples of ``patch`` that keeps the aspect ratio and costs at most ``max_tokens`` tokens.

    Same rule as smart_resize (round each side to the patch; if that is too large scale down and floor, if too small
    scale up and ceil), so ordinary sizes give the reference's result, plus a guarantee smart_resize lacks: the token
    count never exceeds ``max_tokens`` (flooring a very thin side to zero, or ceiling a tiny frame, can overshoot
    there). ``min_tokens`` is a floor that gives way to that cap. ``strict=False`` is smart_resize itself (no such
    guarantee), for the reference's budget rule.
    """
    if height < 1 or width < 1 or max_tokens < 1:
        raise ValueError(
            f"fit_tokens: need a positive size and cap, got {height}x{width}, max_tokens={max_tokens}"
        )
    gh, gw = max(1, round(height / patch)), max(1, round(width / patch))
    if gh * gw > max_tokens:
        beta = math.sqrt(height * width / (max_tokens * patch * patch))
        gh, gw = max(1, math.floor(height / beta / patch)), max(1, math.floor(width / beta / patch))
    elif gh * gw < min_tokens:
        beta = math.sqrt(min_tokens * patch * patch / (height * width))
        gh, gw = math.ceil(height * beta / patch), math.ceil(width * beta / patch)
    aspect = math.log(height / width)
    while strict and gh * gw > max_tokens:  # shrink the side whose shrinking keeps the aspect ratio closest
        if gh == 1 or gw == 1:
            gh, gw = (1, max_tokens) if gh == 1 else (max_tokens, 1)
            break
        shrink_h = abs(math.log((gh - 1) / gw) - aspect)
        shrink_w = abs(math.log(gh / (gw - 1)) - aspect)
        gh, gw = (gh - 1, gw) if shrink_h <= shrink_w else (gh, gw - 1)
    return gh * patch, gw * patch


def feature_size(height: int, width: int, config: SlowFastConfig | None = None) -> tuple[int, int]:
    """Size of the downscaled frames the similarity features are computed on (at most 256 patches by default)."""
    cfg = config or SlowFastConfig()
    return fit_tokens(
        height, width, cfg.feature_max_tokens, min(cfg.min_tokens, cfg.feature_max_tokens), cfg.patch
    )


def _tokens(hw: tuple[int, int], patch: int) -> int:
    return (hw[0] // patch) * (hw[1] // patch)


def _sizes(
    slow_cap: int, height: int, width: int, cfg: SlowFastConfig
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Slow and fast frame sizes when slow frames may cost ``slow_cap`` tokens."""
    slow = fit_tokens(height, width, slow_cap, cfg.min_tokens, cfg.patch)
    fast_cap = max(int(cfg.fast_ratio * _tokens(slow, cfg.patch)), cfg.min_fast_tokens)
    fast = fit_tokens(height, width, min(fast_cap, slow_cap), min(cfg.min_fast_tokens, fast_cap), cfg.patch)
    return slow, fast


def _min_frame_cost(cfg: SlowFastConfig) -> int:
    """Most tokens a frame can cost at the smallest slow cap, whatever its label or aspect ratio.

    A fast frame is never given more than the slow cap (see `_sizes`), so this is ``min_tokens``.
    """
    return cfg.min_tokens


def max_frames_for_budget(config: SlowFastConfig | None = None) -> int:
    """The most frames that fit the budget at the minimum tokens per frame, whatever the labels (1365 by default)."""
    cfg = config or SlowFastConfig()
    return cfg.token_budget // _min_frame_cost(cfg)


def _reference_split_sizes(
    n_slow: int, n_fast: int, height: int, width: int, cfg: SlowFastConfig
) -> tuple[tuple[int, int], tuple[int, int]]:
    """keye-vl-utils 1.5.2's sizes: its search over per-frame caps (``left = mid + 1`` past the last fitting cap, so
    it can overshoot by one step), then smart_resize for slow and fast frames."""
    left, right = cfg.min_tokens, cfg.max_tokens
    while left < right:
        mid = (left + right) // 2
        if n_slow * mid + n_fast * max(int(cfg.fast_ratio * mid), cfg.min_tokens) > cfg.token_budget:
            right = mid
        else:
            left = mid + 1
    slow = fit_tokens(height, width, left, cfg.min_tokens, cfg.patch, strict=False)
    fast_cap = max(int(_tokens(slow, cfg.patch) * cfg.fast_ratio), cfg.min_fast_tokens)
    return slow, fit_tokens(height, width, fast_cap, cfg.min_tokens, cfg.patch, strict=False)


def _split_sizes(
    n_slow: int, n_fast: int, height: int, width: int, cfg: SlowFastConfig
) -> tuple[tuple[int, int], tuple[int, int]]:
    if cfg.budget_rule == "reference":
        return _reference_split_sizes(n_slow, n_fast, height, width, cfg)

    def total(cap: int) -> int:
        slow, fast = _sizes(cap, height, width, cfg)
        return n_slow * _tokens(slow, cfg.patch) + n_fast * _tokens(fast, cfg.patch)

    lo, hi = cfg.min_tokens, cfg.max_tokens
    if total(lo) > cfg.token_budget:
        raise ValueError(
            f"{n_slow} slow + {n_fast} fast frames of {height}x{width} exceed the budget of {cfg.token_budget} tokens "
            f"even at {cfg.min_tokens} tokens per frame; sample at most {max_frames_for_budget(cfg)} frames"
        )
    # Largest cap that fits. Only caps that were checked to fit are ever kept (lo), so the result never exceeds the
    # budget even where the token count is not monotone in the cap (rounding of odd aspect ratios).
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(mid) <= cfg.token_budget:
            lo = mid
        else:
            hi = mid - 1
    return _sizes(lo, height, width, cfg)


def token_budget_split(
    n_slow: int, n_fast: int, native_h: int, native_w: int, config: SlowFastConfig | None = None
) -> tuple[int, int]:
    """Tokens per slow frame and per fast frame for a video of ``native_h x native_w`` with these frame counts.

    The slow count is the largest cap in [min_tokens, max_tokens] (binary search) whose actual frame sizes keep
    ``n_slow * slow + n_fast * fast <= token_budget``; fast frames get ``max(int(fast_ratio * slow), min_fast_tokens)``.
    Raises ValueError when even ``min_tokens`` per frame does not fit (see `max_frames_for_budget`).
    """
    cfg = config or SlowFastConfig()
    slow, fast = _split_sizes(n_slow, n_fast, native_h, native_w, cfg)
    return _tokens(slow, cfg.patch), _tokens(fast, cfg.patch)


# ----------------------------------------------------------------------------------------------------------------------
# Similarity features


def _patch_features(small: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """HSV patch vectors and their squared norms (0: a black patch) of a batch of small RGB frames.

    small: (B, h, w, 3) uint8 RGB, h and w multiples of ``patch``.
    Returns (B, P, 3*patch*patch) int32 vectors in the reference's layout (c, p1, p2) and (B, P) int32 squared norms:
    exact integers (at most 255**2 * 2352 < 2**31), so the cosines computed from them are exact to float64 rounding;
    the reference's float32 cosines differ from these by about 1e-7.
    """
    b, h, w, _ = small.shape
    hsv = np.empty((b, 3, h, w), dtype=np.uint8)
    for i in range(b):  # one frame at a time keeps the int32 temporaries in cache
        hsv[i, 0], hsv[i, 1], hsv[i, 2] = hsv_planes(small[i, ..., 0], small[i, ..., 1], small[i, ..., 2])
    gh, gw = h // patch, w // patch
    vec = hsv.reshape(b, 3, gh, patch, gw, patch).transpose(0, 2, 4, 1, 3, 5)
    vec = vec.reshape(b, gh * gw, 3 * patch * patch).astype(np.int32)  # (B, P, D)
    return vec, np.einsum("bpd,bpd->bp", vec, vec)


class _Labeler:
    """Streaming slow/fast decision: feed batches of small frames in order, get one label per frame."""

    def __init__(self, cfg: SlowFastConfig):
        self.cfg = cfg
        self.ref: np.ndarray | None = None  # (P, D) HSV vectors of the last slow frame
        self.ref_sq: np.ndarray | None = None  # (P,) their squared norms

    def update(self, small: np.ndarray) -> list[bool]:
        """small: (B, h, w, 3) uint8 RGB at the feature size. Returns True (slow) / False (fast) per frame."""
        vec, sq = _patch_features(small, self.cfg.patch)  # (B, P, D), (B, P)
        labels = [False] * len(vec)
        i = 0
        if self.ref is None:
            self.ref, self.ref_sq = vec[0], sq[0]
            labels[0], i = True, 1
        # The sequential part: compare with the last slow frame. All remaining frames of the batch are compared at
        # once; when one turns out slow it becomes the reference and the frames after it are compared again.
        while i < len(labels):
            dot = np.einsum("pd,bpd->bp", self.ref, vec[i:])  # (B - i, P)
            with np.errstate(invalid="ignore", divide="ignore"):
                # a black patch: 0/0, not similar (as the reference)
                cos = dot / np.sqrt(self.ref_sq.astype(np.float64) * sq[i:])
            same = cos > self.cfg.similarity_threshold
            valid = (self.ref_sq > 0) | (sq[i:] > 0)  # a patch black in both frames says nothing
            n_valid = valid.sum(axis=1)
            n_same = (same & valid).sum(axis=1)
            for j in range(len(n_valid)):
                if self._is_new(int(n_same[j]), int(n_valid[j])):
                    labels[i + j] = True
                    self.ref, self.ref_sq = vec[i + j], sq[i + j]
                    i += j + 1
                    break
            else:
                break
        return labels

    def _is_new(self, same: int, valid: int) -> bool:
        if valid == 0:  # both frames entirely black: nothing changed (the reference computes 0/0 here)
            return False
        # float32 mean, as the reference's tensor mean: it decides ties such as 225/250 against 0.9
        return float(np.float32(same) / np.float32(valid)) < self.cfg.unchanged_ratio


def label_frames(small_frames: np.ndarray, config: SlowFastConfig | None = None) -> np.ndarray:
    """Slow (True) / fast (False) label of each frame of ``small_frames`` (N, h, w, 3) uint8 RGB.

    h and w must be multiples of ``config.patch`` (use `feature_size` and any resize). Frame 0 is slow; frame i is slow
    when fewer than ``unchanged_ratio`` of its patches have HSV cosine similarity above ``similarity_threshold`` with
    the last slow frame, patches black in both frames left out. Features are computed in batches; only the comparison
    with the last slow frame is sequential.
    """
    cfg = config or SlowFastConfig()
    small_frames = np.asarray(small_frames)
    if small_frames.ndim != 4 or small_frames.shape[-1] != 3 or small_frames.dtype != np.uint8:
        raise ValueError(
            f"label_frames: expected uint8 (N, h, w, 3), got {small_frames.dtype} {small_frames.shape}"
        )
    n, h, w, _ = small_frames.shape
    if h % cfg.patch or w % cfg.patch:
        raise ValueError(f"label_frames: frame size {h}x{w} is not a multiple of the patch ({cfg.patch})")
    if not cfg.enabled:
        return np.ones(n, dtype=bool)
    labeler = _Labeler(cfg)
    labels: list[bool] = []
    for s in range(0, n, _FEATURE_BATCH):
        labels += labeler.update(small_frames[s : s + _FEATURE_BATCH])
    return np.asarray(labels, dtype=bool)


# ----------------------------------------------------------------------------------------------------------------------
# Sampling


def _linspace_round(last: int, n: int) -> np.ndarray:
    """``torch.linspace(0, last, n, dtype=float32).round()`` (the reference's frame choice), without torch.

    torch computes ``step = last / (n - 1)`` in float32, then ``step * i`` for the first half and
    ``last - step * (n - 1 - i)`` for the second, each rounded to float32 once (fused multiply-add); tested against
    torch itself for every n <= total < 300 and 100,000 random pairs up to 3 million frames.
    """
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    end = np.float32(last)
    step = np.float64(np.float32(end / np.float32(n - 1)))
    i = np.arange(n)
    values = np.where(i < n // 2, step * i, np.float64(end) - step * (n - 1 - i)).astype(np.float32)
    return np.round(values).astype(np.int64)  # half to even, as torch.round


def sample_positions(pts: np.ndarray, n: int) -> np.ndarray:
    """Positions (into the presentation-ordered ``pts``) of ``n`` frames spread uniformly in time, increasing, unique.

    Constant frame rate: ``round(linspace(0, N-1, n))`` in float32, exactly the reference's frames (its float32
    linspace rounds differently from float64 where a value is within ~1e-3 of a half). Variable frame rate:
    the frame nearest each of ``n`` instants uniform between the first and the last presentation time. Nearest-frame
    collisions (long gaps in a variable-rate stream) are dropped, so fewer than ``n`` positions may come back.
    """
    pts = np.asarray(pts)
    total = len(pts)
    if total == 0 or n <= 0:
        return np.zeros(0, dtype=np.int64)
    n = min(n, total)
    steps = np.diff(pts)
    if total < 3 or steps.max() - steps.min() <= 1:  # constant frame rate (one tick of rounding allowed)
        return np.unique(_linspace_round(total - 1, n))
    pos = np.interp(np.linspace(pts[0], pts[-1], n), pts, np.arange(total))
    return np.unique(np.round(pos).astype(np.int64))


def _frame_count(duration: float, sample_fps: float, cfg: SlowFastConfig) -> int:
    # +1e-9: 60 s at 2 fps must give 120 frames even when the duration is 59.99999999 in floating point
    n = int(duration * sample_fps + 1e-9)
    return max(1, min(n, cfg.max_frames, max_frames_for_budget(cfg)))


def plan_from_labels(
    labels: np.ndarray,
    indices: np.ndarray,
    times: np.ndarray,
    native_h: int,
    native_w: int,
    config: SlowFastConfig | None = None,
    *,
    video: str = "",
    duration: float = 0.0,
    native_fps: float = 0.0,
    sample_fps: float = 0.0,
) -> VideoPlan:
    """The `VideoPlan` of frames already sampled and labelled (True = slow), sized to the token budget."""
    cfg = config or SlowFastConfig()
    labels = np.asarray(labels, dtype=bool)
    n_slow = int(labels.sum())
    slow, fast = _split_sizes(n_slow, len(labels) - n_slow, native_h, native_w, cfg)
    frames = []
    for lab, idx, t in zip(labels, indices, times):
        h, w = slow if lab else fast
        frames.append(
            FramePlan(
                int(idx), round(float(t), 6), "slow" if lab else "fast", h, w, _tokens((h, w), cfg.patch)
            )
        )
    return VideoPlan(
        video=video,
        duration=round(float(duration), 6),
        native_fps=round(float(native_fps), 6),
        sample_fps=round(float(sample_fps), 6),
        frames=frames,
        slow_tokens_per_frame=_tokens(slow, cfg.patch),
        fast_tokens_per_frame=_tokens(fast, cfg.patch),
        total_tokens=sum(f.tokens for f in frames),
        budget=cfg.token_budget,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Planning a video file (decoding is `keye.encoders.video`'s)


def plan_video(
    path: str | Path,
    config: SlowFastConfig | None = None,
    *,
    backend: str = "auto",
    keep_frames: bool = True,
) -> tuple[VideoPlan, list[np.ndarray]]:
    """Sample, label and size the frames of a video; return the plan and the frames at their planned sizes.

    Returns ``(plan, frames)`` with ``frames[i]`` an (h, w, 3) uint8 RGB array of ``plan.frames[i].height x width``
    (an empty list with ``keep_frames=False``: the plan alone, which is all ``keye frames`` needs). The video is
    decoded once, streaming (`keye.encoders.video.decode`): each sampled frame is downscaled for the similarity
    features and kept at no more than the largest size it can still get (the budget with the slow frames seen so far
    and every later frame fast); after the last frame the sizes are final and kept frames are downscaled to them when
    needed. Memory is a few native frames plus, at worst, about twice the budget's pixels.

    backend: "auto", "pyav" or "decord" (see `keye.encoders.video`); the pixels are identical.
    """
    cfg = config or SlowFastConfig()
    path = str(path)
    index = video_io.index(path, backend)
    duration = index.duration
    native_fps = index.fps or float(cfg.fps)
    sample_fps = min(cfg.fps, native_fps)
    positions = sample_positions(index.pts, _frame_count(duration, sample_fps, cfg))
    n = len(positions)
    if n < int(duration * sample_fps + 1e-9):  # capped (max_frames, budget): report the rate used
        sample_fps = n / duration
    # the plan alone needs only the features' small frames, which the decoder's thread makes
    small = None if keep_frames or not cfg.enabled else feature_size(index.height, index.width, cfg)
    frames = video_io.decode(path, positions, small, backend=backend, video_index=index)
    labels, kept = _label_stream(frames, n, index.height, index.width, cfg, keep_frames)
    plan = plan_from_labels(
        labels,
        positions,
        index.times[positions],
        index.height,
        index.width,
        cfg,
        video=path,
        duration=duration,
        native_fps=native_fps,
        sample_fps=sample_fps,
    )
    out = [resize(img, (fp.height, fp.width), cfg.resample) for fp, img in zip(plan.frames, kept)]
    return plan, out


def _label_stream(
    frames: Iterator[np.ndarray], n: int, height: int, width: int, cfg: SlowFastConfig, keep_frames: bool
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Label each of the ``n`` frames as it comes; keep it (``keep_frames``) at its largest possible size."""
    small_hw = feature_size(height, width, cfg)
    labeler = _Labeler(cfg)
    labels = np.ones(n, dtype=bool)  # stays all-slow when Slow-Fast is disabled
    kept: list[np.ndarray] = []
    n_slow = 0 if cfg.enabled else n
    # Largest sizes any frame can still get: the slow frames so far, every later frame fast. Sizes only shrink as
    # slow frames come in, so a frame kept at the bound is never upscaled at the end.
    bound = _split_sizes(max(n_slow, 1), n - max(n_slow, 1), height, width, cfg)
    # bicubic resizes from the decoded frame, and the reference's budget rule need not shrink as slow frames come in:
    # either way the frames wait at native size for the final plan, as keye-vl-utils keeps them
    keep_native = cfg.resample == "bicubic" or cfg.budget_rule == "reference"
    track_bound = keep_frames and not keep_native  # the bound only sizes frames kept while streaming
    batch: list[np.ndarray] = []
    done = 0

    def flush() -> None:
        nonlocal n_slow, bound, done
        if cfg.enabled:
            small = np.stack([resize(f, small_hw) for f in batch])  # (B, h, w, 3); as is when decoded small
            labels[done : done + len(batch)] = labeler.update(small)
        for frame in batch:
            slow = bool(labels[done])
            done += 1
            if cfg.enabled and slow:
                n_slow += 1
                if n_slow > 1 and track_bound:
                    bound = _split_sizes(n_slow, n - n_slow, height, width, cfg)
            if keep_frames:
                kept.append(frame if keep_native else resize(frame, bound[0] if slow else bound[1]))
        batch.clear()

    for frame in frames:
        batch.append(frame)
        if len(batch) == _FEATURE_BATCH:
            flush()
    if batch:
        flush()
    return labels, kept
