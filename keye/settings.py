"""The processor's settings (`ProcessorSettings`, saved as ``keye_processor.json``) and where a model's come from.

Light on purpose (dataclasses and the Slow-Fast config, no torch): ``keye frames --model M`` reads the settings M's
processor would use without loading M.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from keye.encoders.slowfast import SlowFastConfig

PROCESSOR_CONFIG = "keye_processor.json"
OFFICIAL_SYSTEM = "You are a helpful assistant."  # Keye-VL-1.5's chat template, when a conversation has none
OFFICIAL_FETCH_MAX_PIXELS = 16_056_320  # keye-vl-utils' MAX_PIXELS (20,480 tokens of 28x28)

# keye-tiny's settings (what `keye.pretrained.build_keye_tiny` saves with it): 112x112-ish frames (16 tokens) for slow
# frames, a small budget for a 2-core CPU.
TINY_SETTINGS = dict(
    min_pixels=56 * 56,
    max_pixels=224 * 224,
    fps=2.0,
    max_frames=16,
    token_budget=1024,
    min_tokens=16,
    max_tokens=64,
    min_fast_tokens=4,
    max_length=8192,
)


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
    # Video frame selection (see keye.encoders.slowfast.SlowFastConfig)
    fps: float = 2.0
    max_frames: int = 1365
    token_budget: int = 65536
    min_tokens: int = 48
    max_tokens: int = 768
    fast_ratio: float = 0.3
    min_fast_tokens: int = 48
    slowfast: bool = True
    # Video frames resized from the decoded frame with "bilinear" (antialiased, keye's default) or "bicubic" (PIL, as
    # the official image processor does; keeps sampled frames at native size until the plan is final).
    video_resample: str = "bilinear"
    # "actual" (keye: frames sized by their actual tokens, never over token_budget) or "reference" (keye-vl-utils 1.5.2)
    video_budget_rule: str = "actual"
    max_length: int = 131072
    default_system: str | None = None  # inserted when a conversation has no system turn
    # think=True/False appends "/think" or "/no_think" to the last user turn after this separator; no-think mode also
    # pre-fills an empty think block when prefill_no_think is set (keye-tiny's layout; the official one does not).
    think_separator: str = " "
    prefill_no_think: bool = True

    def video_config(self, **overrides) -> SlowFastConfig:
        """The Slow-Fast config these settings give videos; ``overrides`` (fps, max_frames, token_budget, ...:
        `SlowFastConfig` fields, ``None`` values ignored) replace fields. What `KeyeProcessor.load_video` and
        ``keye frames --model`` plan with."""
        fields = dict(
            fps=self.fps,
            max_frames=self.max_frames,
            token_budget=self.token_budget,
            min_tokens=self.min_tokens,
            max_tokens=self.max_tokens,
            fast_ratio=self.fast_ratio,
            min_fast_tokens=self.min_fast_tokens,
            enabled=self.slowfast,
            resample=self.video_resample,
            budget_rule=self.video_budget_rule,
        )
        return SlowFastConfig(**{**fields, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_dict(cls, d: dict) -> ProcessorSettings:
        d = dict(d)
        d.pop("tokens_per_second", None)  # written by keye <= 0.1; now read from the model's config.json
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown processor settings: {sorted(unknown)}")
        return cls(**d)

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
            video_resample="bicubic",
            video_budget_rule="reference",
            default_system=OFFICIAL_SYSTEM,
            think_separator="",
            prefill_no_think=False,
        )


def read_processor_settings(name_or_path: str | Path) -> ProcessorSettings:
    """The settings model ``name_or_path`` (``keye-tiny`` or a model folder) gives its processor, without loading it:
    keye-tiny's `TINY_SETTINGS`, a folder's ``keye_processor.json`` (defaults when it has none)."""
    if str(name_or_path) == "keye-tiny":
        return ProcessorSettings(**TINY_SETTINGS)
    folder = Path(name_or_path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"{folder}: not a keye model folder (no config.json); use keye-tiny or a saved folder"
        )
    path = folder / PROCESSOR_CONFIG
    if not path.exists():
        return ProcessorSettings()
    try:
        return ProcessorSettings.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        from keye.encoders.errors import ConfigError

        raise ConfigError(path, str(err)) from err
