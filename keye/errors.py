"""Errors raised on bad user input.

Every error names the input it is about. The CLI turns a `KeyeInputError` into a one-line message and exit status 2
(the traceback only with ``--debug``); library users catch the specific subclass.
"""

from __future__ import annotations


class KeyeInputError(Exception):
    """Bad input given by the user (a file, a prompt, a config); never a bug in keye."""

    def __init__(self, source: object, message: str):
        self.source = str(source)
        self.message = message
        super().__init__(f"{self.source}: {message}")


class VideoDecodeError(KeyeInputError):
    """A video file is missing, not a video, corrupt, or yields no frames."""


class ImageLoadError(KeyeInputError):
    """An image file is missing or cannot be decoded."""


class ContextLengthError(KeyeInputError):
    """The prompt plus its images/videos does not fit the model's context window."""


class ConfigError(KeyeInputError):
    """A configuration file or override is invalid (unknown key, wrong type)."""
