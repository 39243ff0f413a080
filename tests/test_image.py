"""Image loading (encoders/image.py): every input kind becomes an upright RGB PIL image; bad files name themselves."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from keye.encoders.image import load_image
from keye.errors import ImageLoadError


def _quadrants(h: int = 20, w: int = 40) -> np.ndarray:
    """(h, w, 3) uint8: red top-left, green top-right, blue bottom-left, white bottom-right."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2 :] = (0, 255, 0)
    a[h // 2 :, : w // 2] = (0, 0, 255)
    a[h // 2 :, w // 2 :] = (255, 255, 255)
    return a


def test_png_path_round_trip(tmp_path):
    path = tmp_path / "q.png"
    Image.fromarray(_quadrants()).save(path)
    for source in (path, str(path)):
        img = load_image(source)
        assert img.mode == "RGB" and img.size == (40, 20)
        np.testing.assert_array_equal(np.asarray(img), _quadrants())


def test_exif_orientation_is_applied(tmp_path):
    # Orientation 6: the camera stored the picture rotated; viewers turn it 90 degrees clockwise.
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_quadrants()).save(path, exif=exif, quality=95)
    img = load_image(path)
    assert img.size == (20, 40)  # (width, height): turned upright
    a = np.asarray(img).astype(int)
    # Clockwise turn: the stored bottom-left (blue) comes to the top-left, top-left (red) to the top-right.
    assert np.abs(a[5, 5] - (0, 0, 255)).max() < 40
    assert np.abs(a[5, 15] - (255, 0, 0)).max() < 40


def test_modes_become_rgb(tmp_path):
    gray = load_image(np.full((4, 6), 77, dtype=np.uint8))
    assert gray.mode == "RGB" and np.asarray(gray)[0, 0].tolist() == [77, 77, 77]
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent black -> white background
    rgba[0, 0] = (10, 20, 30, 255)  # opaque pixel kept
    out = np.asarray(load_image(rgba))
    assert out[1, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [10, 20, 30]
    # 16-bit grayscale PNG: scaled to 8 bits, not clipped to white.
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 6), 32768, dtype=np.uint16)).save(path)
    assert np.asarray(load_image(path))[0, 0].tolist() == [127, 127, 127]
    pil = Image.new("L", (3, 2), 9)
    out = load_image(pil)
    assert out.mode == "RGB" and out is not pil and pil.mode == "L"  # the caller's image is untouched


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such file"),
        ("empty", "empty file (0 bytes)"),
        ("text", "not an image file"),
        ("truncated_png", "corrupt or truncated image"),
        ("truncated_jpg", "corrupt or truncated image"),
    ],
)
def test_bad_files_raise_image_load_error(tmp_path, case, message):
    ext = "jpg" if case.endswith("jpg") else "png"
    path = tmp_path / f"{case}.{ext}"
    rng = np.random.default_rng(0)
    if case == "empty":
        path.touch()
    elif case == "text":
        path.write_text("not an image\n" * 10)
    elif case.startswith("truncated"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=re.escape(message)) as err:
        load_image(path)
    assert str(err.value).startswith(f"{path}: ")


def test_bad_arguments():
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape|\\(H, W"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(TypeError):
        load_image(42)
