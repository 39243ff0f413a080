"""Images in: any path, PIL image or array becomes an upright RGB ``PIL.Image``.

Not for resizing or patching (``keye.processing``) and not for video frames (``video``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from keye.encoders.errors import ImageLoadError, check_input_file

ImageInput = str | Path | Image.Image | np.ndarray


def load_image(image: ImageInput) -> Image.Image:
    """Return ``image`` as an RGB ``PIL.Image.Image``, fully decoded, with its EXIF orientation applied.

    Accepts a file path, a PIL image, or a uint8 array ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``. Transparent
    pixels are composited onto white (dropping alpha would show whatever colour they hide, often black); 16-bit
    grayscale is scaled to 8 bits. Raises ``ImageLoadError`` naming the file when it is missing, empty, not an
    image, or corrupt/truncated.
    """
    if isinstance(image, np.ndarray):
        return _to_rgb(_from_array(image))
    if isinstance(image, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(image))
    if not isinstance(image, str | Path):
        raise TypeError(f"load_image takes a path, a PIL image or an array, got {type(image).__name__}")
    path = check_input_file(image, ImageLoadError, "an image file")
    try:
        with warnings.catch_warnings():
            # A "possible decompression bomb" warning becomes an error: such an image is not model input.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now: a truncated file fails here, not later in the processor
                return _to_rgb(ImageOps.exif_transpose(img))
    except UnidentifiedImageError as e:
        raise ImageLoadError(path, "not an image file (unrecognised format)") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, f"image too large ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports corrupt data with these
        raise ImageLoadError(path, f"corrupt or truncated image ({e})") from e


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ValueError(f"load_image needs a uint8 array, got {array.dtype}")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4)):
        return Image.fromarray(array.squeeze(2) if array.ndim == 3 and array.shape[2] == 1 else array)
    raise ValueError(f"load_image needs an array (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        # convert("RGB") clips 16-bit values at 255 (nearly all white); scale instead.
        gray = (np.asarray(img, dtype=np.uint32) // 257).astype(np.uint8)  # (H, W)
        return Image.fromarray(gray).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img.copy()
