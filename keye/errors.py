"""Errors raised on bad user input (defined in `keye.encoders.errors`, the lightest layer; re-exported here).

Every error names the input it is about in one line. The CLI turns a `KeyeInputError` into that line and exit status
2 (the traceback only with ``--debug``); library users catch the specific subclass.
"""

from keye.encoders.errors import (
    ConfigError,
    ContextLengthError,
    ImageLoadError,
    KeyeInputError,
    VideoDecodeError,
)

__all__ = ["KeyeInputError", "VideoDecodeError", "ImageLoadError", "ContextLengthError", "ConfigError"]
