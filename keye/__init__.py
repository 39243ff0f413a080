"""keye: build, train, evaluate and serve Keye-VL-1.5-style video-language models.

The public entry point is `load_pretrained`. The model stack (torch, transformers) loads on first use of a name
below (PEP 562), so ``import keye.encoders``, ``keye --help`` and ``keye frames`` stay light. The modules that
define the config, the model and the processor register them with transformers' Auto classes (``AutoConfig``,
``AutoModelForImageTextToText``, ``AutoProcessor``) when they load.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "KeyeConfig": "keye.configuration",
    "KeyeProjectorConfig": "keye.configuration",
    "KeyeTextConfig": "keye.configuration",
    "KeyeVisionConfig": "keye.configuration",
    "KeyeForConditionalGeneration": "keye.modeling",
    "KeyeProcessor": "keye.processing",
    "load_pretrained": "keye.pretrained",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'keye' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
