"""Errors raised on bad user input.

Every error names the input it is about and says what was wrong, in one line: ``"clip.mp4: no video stream"``. The
CLI prints that line and exits with status 2 (the traceback only with ``--debug``); library users catch the specific
subclass. They live here, in the lightest layer, so that decoding and planning need nothing else; ``keye.errors``
re-exports them.
"""

from __future__ import annotations

import os

__all__ = ["KeyeInputError", "VideoDecodeError", "ImageLoadError", "ContextLengthError", "ConfigError"]

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
