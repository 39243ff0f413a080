"""The processor's settings (`ProcessorSettings`, saved as ``keye_processor.json``) and where a model's come from.

Light on purpose (dataclasses and the Slow-Fast config, no torch): ``keye frames --model M`` reads the settings M's
processor would use without loading M.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from keye.encoders.slowfast import SlowFastConfig

PROCESSOR_CONFIG = "keye_processor.json"
OFFICIAL_SYSTEM = "You are a helpful assistant."  # Keye-VL-1.5's chat template, when a conversation has none
OFFICIAL_FETCH_MAX_PIXELS = 16_056_320  # keye-vl-utils' MAX_PIXELS (20,480 tokens of 28x28)

# keye-tiny's settings (what `keye.pretrained.build_keye_tiny` saves with it; `ProcessorSettings.from_dict` reads
# them): 112x112-ish frames (16 tokens) for slow frames, a small budget for a 2-core CPU.
TINY_SETTINGS = dict(
    min_pixels=56 * 56,
    max_pixels=224 * 224,
    video=dict(fps=2.0, max_frames=16, token_budget=1024, min_tokens=16, max_tokens=64, min_fast_tokens=4),
    max_length=8192,
)
# keye_processor.json as keye <= 0.1 wrote it: the Slow-Fast fields flat, some under other names
_FLAT_VIDEO_KEYS = {
    "fps": "fps",
    "max_frames": "max_frames",
    "token_budget": "token_budget",
    "min_tokens": "min_tokens",
    "max_tokens": "max_tokens",
    "fast_ratio": "fast_ratio",
    "min_fast_tokens": "min_fast_tokens",
    "slowfast": "enabled",
    "video_resample": "resample",
    "video_budget_rule": "budget_rule",
}


@dataclass
class ProcessorSettings:
    """Everything `KeyeProcessor` needs besides the tokenizer; saved as ``keye_processor.json``."""

    patch_size: int = 14
    merge_size: int = 2
    image_mean: float = 0.5
    image_std: float = 0.5
    min_pixels: int = 3136
    max_pixels: int = 1003520
    # The official pipeline resizes an image twice: keye-vl-utils' fetch_image to at most this many pixels, then the
    # image processor to max_pixels (a different grid for some large images). None: one resize (keye's default).
    fetch_max_pixels: int | None = None
    # How videos are sampled, split into slow and fast frames and sized (`keye.encoders.slowfast.SlowFastConfig`)
    video: SlowFastConfig = field(default_factory=SlowFastConfig)
    max_length: int = 131072
    default_system: str | None = None  # inserted when a conversation has no system turn
    # think=True/False appends "/think" or "/no_think" to the last user turn after this separator; no-think mode also
    # pre-fills an empty think block when prefill_no_think is set (keye-tiny's layout; the official one does not).
    think_separator: str = " "
    prefill_no_think: bool = True

    def video_config(self, **overrides) -> SlowFastConfig:
        """``video`` with ``overrides`` (fps, max_frames, token_budget, ...: `SlowFastConfig` fields; ``None``
        values ignored) applied: what `KeyeProcessor.load_video` and ``keye frames --model`` plan with."""
        given = {
            _FLAT_VIDEO_KEYS.get(k, k): v for k, v in overrides.items() if v is not None
        }  # keye 0.1 names too
        return dataclasses.replace(self.video, **given)

    @classmethod
    def from_dict(cls, d: dict) -> ProcessorSettings:
        """Settings from ``keye_processor.json``: the nested ``video`` section, or the flat keys keye <= 0.1 wrote."""
        d = dict(d)
        d.pop("tokens_per_second", None)  # written by keye <= 0.1; now read from the model's config.json
        video = dict(d.pop("video", None) or {})
        for old, new in _FLAT_VIDEO_KEYS.items():
            if old in d:
                video[new] = d.pop(old)
        unknown = set(d) - set(cls.__dataclass_fields__)
        unknown |= {f"video.{k}" for k in set(video) - set(SlowFastConfig.__dataclass_fields__)}
        if unknown:
            raise ValueError(f"unknown processor settings: {sorted(unknown)}")
        return cls(**d, video=SlowFastConfig(**video))

    @classmethod
    def official(cls, preprocessor: dict) -> ProcessorSettings:
        """Keye-VL-1.5's own pipeline (keye-vl-utils 1.5.2 + the released processor), from the checkpoint's
        ``preprocessor_config.json``: default system prompt, two-step image resize, bicubic frames, the model card's
        thinking switch."""
        required = ("min_pixels", "max_pixels", "patch_size", "merge_size", "image_mean", "image_std")
        missing = [k for k in required if k not in preprocessor]
        if missing:
            raise ValueError(f"missing required key(s) {', '.join(missing)}")
        mean, std = preprocessor["image_mean"], preprocessor["image_std"]
        if len(set(mean)) != 1 or len(set(std)) != 1:
            raise ValueError(f"per-channel image_mean/std {mean}/{std} are not supported")
        return cls(
            patch_size=preprocessor["patch_size"],
            merge_size=preprocessor["merge_size"],
            image_mean=mean[0],
            image_std=std[0],
            min_pixels=preprocessor["min_pixels"],
            max_pixels=preprocessor["max_pixels"],
            fetch_max_pixels=OFFICIAL_FETCH_MAX_PIXELS,
            video=SlowFastConfig.official(),
            default_system=OFFICIAL_SYSTEM,
            think_separator="",
            prefill_no_think=False,
        )


def read_processor_settings(name_or_path: str | Path) -> ProcessorSettings:
    """The settings model ``name_or_path`` (``keye-tiny`` or a model folder) gives its processor, without loading it:
    keye-tiny's `TINY_SETTINGS`, a model folder's `folder_settings`."""
    if str(name_or_path) == "keye-tiny":
        return ProcessorSettings.from_dict(TINY_SETTINGS)
    folder = Path(name_or_path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"{folder}: not a keye model folder (no config.json); use keye-tiny or a saved folder"
        )
    return folder_settings(folder)


def folder_settings(folder: str | Path) -> ProcessorSettings:
    """A folder's ``keye_processor.json`` (the defaults when it has none); what `KeyeProcessor.from_pretrained` reads."""
    path = Path(folder) / PROCESSOR_CONFIG
    if not path.exists():
        return ProcessorSettings()
    try:
        return ProcessorSettings.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        from keye.encoders.errors import ConfigError

        raise ConfigError(path, str(err)) from err
