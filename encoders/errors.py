"""Errors raised on bad user input.

Every error names the input it is about and says what was wrong, in one line: ``"clip.mp4: no video stream"``. The
CLI prints that line and exits with status 2 (the traceback only with ``--debug``); library users catch the specific
subclass. They live here, in the lightest layer, so that decoding and planning need nothing else; ``keye.errors``
re-exports them.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "KeyeInputError",
    "VideoDecodeError",
    "ImageLoadError",
    "ContextLengthError",
    "ConfigError",
    "check_input_file",
]

_MAX_MESSAGE = 300  # characters of the message part; longer text (a library's log dump) is cut


def one_line(text: object, limit: int = _MAX_MESSAGE) -> str:
    """``text`` on one line, at most ``limit`` characters (a library's multi-line message kept readable)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _name(source: object) -> str:
    """What to call the input: a path or name as given; never an object's repr (which can be megabytes of pixels)."""
    if isinstance(source, (str, os.PathLike)):
        return one_line(os.fspath(source))
    return f"<{type(source).__name__}>"


class KeyeInputError(Exception):
    """Bad input given by the user (a file, a prompt, a config); never a bug in keye."""

    def __init__(self, source: object, message: str):
        self.source = _name(source)
        self.message = one_line(message)
        super().__init__(f"{self.source}: {self.message}")


class VideoDecodeError(KeyeInputError):
    """A video file is missing, not a video, corrupt, or yields no frames."""


class ImageLoadError(KeyeInputError):
    """An image file is missing or cannot be decoded."""


class ContextLengthError(KeyeInputError):
    """The prompt plus its images/videos does not fit the model's context window."""


class ConfigError(KeyeInputError):
    """A configuration file or override is invalid (unknown key, wrong type)."""


def check_input_file(path: str | os.PathLike, error: type[KeyeInputError], what: str) -> Path:
    """``path`` when it is a non-empty file; else ``error`` naming it: no such file, a directory (not ``what``), an
    empty file. The first check of every media file keye reads."""
    p = Path(path)
    if not p.exists():
        raise error(path, "no such file")
    if not p.is_file():
        raise error(path, f"is a directory, not {what}" if p.is_dir() else "not a regular file")
    if p.stat().st_size == 0:
        raise error(path, "empty file (0 bytes)")
    return p
