"""8-bit RGB -> HSV exactly as OpenCV's ``cv2.cvtColor(x, cv2.COLOR_RGB2HSV)`` (H in [0, 180)), in numpy.

keye-vl-utils computes Slow-Fast's similarity features with OpenCV; keye does not depend on OpenCV, so this reproduces
its fixed-point arithmetic bit for bit (tests/test_slowfast.py checks values printed by opencv-python-headless).
"""

from __future__ import annotations

import numpy as np

__all__ = ["hsv_planes", "rgb_to_hsv"]

# OpenCV's 8-bit RGB->HSV works in fixed point with these reciprocal tables (hsv_shift = 12); reproducing them makes
# the features bit-exact with the reference, which calls cv2.cvtColor (OpenCV is not a dependency of keye).
_HSV_SHIFT = 12
with np.errstate(divide="ignore"):
    _i = np.arange(256, dtype=np.float64)
    _SDIV = np.where(_i > 0, np.rint((255 << _HSV_SHIFT) / _i), 0).astype(np.int32)
    _HDIV = np.where(_i > 0, np.rint((180 << _HSV_SHIFT) / (6.0 * _i)), 0).astype(np.int32)
del _i


def hsv_planes(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """H (0..179), S, V of uint8 planes, exactly as ``cv2.cvtColor(x, cv2.COLOR_RGB2HSV)``."""
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)  # uint8, no wrap: v >= min
    d32 = diff.astype(np.int32)
    s = d32 * _SDIV[v]
    s += 1 << (_HSV_SHIFT - 1)
    s >>= _HSV_SHIFT
    r32, g32, b32 = r.astype(np.int32), g.astype(np.int32), b.astype(np.int32)
    # hue numerator: which channel is the maximum decides the sector (red first, then green, as OpenCV)
    h = r32 - g32
    h += 4 * d32
    is_g = v == g
    np.copyto(h, b32 - r32 + 2 * d32, where=is_g)
    np.copyto(h, g32 - b32, where=v == r)
    h *= _HDIV[diff]
    h += 1 << (_HSV_SHIFT - 1)
    h >>= _HSV_SHIFT  # arithmetic shift: floor, as in C for these operands
    h += (h < 0) * 180
    return h.astype(np.uint8), s.astype(np.uint8), v


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """8-bit RGB ``(..., 3)`` to HSV with H in [0, 180), bit-exact with OpenCV's ``COLOR_RGB2HSV``."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb_to_hsv: expected uint8 (..., 3), got {rgb.dtype} {rgb.shape}")
    h, s, v = hsv_planes(rgb[..., 0], rgb[..., 1], rgb[..., 2])
    return np.stack([h, s, v], axis=-1)
