"""keye: build, train, evaluate and serve Keye-VL-1.5-style video-language models.

Importing ``keye`` registers the model with transformers' Auto classes (``AutoConfig``,
``AutoModelForImageTextToText``, ``AutoProcessor``). The public entry point is `load_pretrained`.
"""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from keye.configuration import KeyeConfig, KeyeProjectorConfig, KeyeTextConfig, KeyeVisionConfig
from keye.modeling import KeyeForConditionalGeneration
from keye.pretrained import load_pretrained
from keye.processing import KeyeProcessor

__version__ = "0.1.0"

AutoConfig.register("keye", KeyeConfig, exist_ok=True)
AutoModelForImageTextToText.register(KeyeConfig, KeyeForConditionalGeneration, exist_ok=True)
AutoProcessor.register(KeyeConfig, KeyeProcessor, exist_ok=True)

__all__ = [
    "KeyeConfig",
    "KeyeForConditionalGeneration",
    "KeyeProcessor",
    "KeyeProjectorConfig",
    "KeyeTextConfig",
    "KeyeVisionConfig",
    "load_pretrained",
]
