"""Training configuration: nested dataclasses loaded from YAML (`keye.config`), overridable with dotted keys.

    cfg = load_config("configs/pretrain/stage1_tiny.yaml", ["train.lr=1e-4", "data.max_length=1024"])

One source of truth for every recipe (pretraining stages, post-training SFT): a YAML file names fields of
`TrainConfig`; anything it does not name keeps the dataclass default. Unknown keys, in the file or in an override,
are a `ConfigError` naming the key and the file; values are checked against the field's type.

Not for: model architecture (`keye.configuration`), or how a recipe uses these fields (`keye.training.trainer`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keye.config import build_config, read_config
from keye.errors import ConfigError

__all__ = [
    "ContrastiveConfig",
    "DataConfig",
    "FreezeConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "SourceConfig",
    "TrainConfig",
    "config_to_dict",
    "load_config",
]


@dataclass
class ModelConfig:
    """Where the model comes from and what a stage changes in its architecture."""

    # "keye-tiny", a folder written by save_pretrained, or "random:<folder>" (a config + processor folder whose
    # weights are freshly initialised with `seed`: tests and from-scratch runs).
    path: str = "keye-tiny"
    # Tensors to load on top (a previous stage's export or checkpoint folder, or a .safetensors file); applied in order.
    init_from: list[str] = field(default_factory=list)
    # Context extension (stage 3): a new RoPE base for the text model; None keeps the model's.
    rope_theta: float | None = None
    attn_implementation: str | None = None  # None: flash_attention_2 on a GPU when installed, else sdpa
    gradient_checkpointing: bool = False
    # Added tokens whose embedding rows (and tied output rows) start as the mean of their text's sub-word pieces
    # ("<think>" -> "<", "think", ">") instead of what the model holds; a resumed run restores its own rows.
    init_token_rows: list[str] = field(default_factory=list)
    # Model card fields the run changes in what it exports (`keye.configuration.ModelCard`), e.g. {tools: true} once
    # the model has learned to write Thyme code; the demo and ``keye info`` read the card.
    card: dict = field(default_factory=dict)


@dataclass
class LoraConfig:
    """LoRA adapters injected into the text model with peft (r=0: none)."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class FreezeConfig:
    """Which parameters train: names matching any ``trainable`` regex (re.match), minus any ``frozen`` regex.

    ``token_rows`` limits the trainable rows of the input embedding (and a tied lm_head) to the Keye special
    tokens the config names (``"special"``: Stage 1's "new token embeddings trainable") or leaves all rows
    (``"all"``); it applies only when ``language_model.embed_tokens.weight`` is trainable.
    """

    trainable: list[str] = field(default_factory=lambda: [".*"])
    frozen: list[str] = field(default_factory=list)
    token_rows: str = "all"

    def __post_init__(self):
        if self.token_rows not in ("all", "special"):
            raise ConfigError("freeze.token_rows", f"must be 'all' or 'special', got {self.token_rows!r}")


@dataclass
class SourceConfig:
    """One JSONL manifest and its share of the mix. ``kind`` (video/image/text) is for reporting the mix."""

    path: str = ""
    weight: float = 1.0
    kind: str = "mixed"

    def __post_init__(self):
        if self.kind not in ("video", "image", "text", "mixed"):
            raise ConfigError(
                f"data.sources[{self.path}]", f"kind must be video/image/text/mixed, got {self.kind!r}"
            )
        if self.weight < 0:
            raise ConfigError(f"data.sources[{self.path}]", f"weight must be >= 0, got {self.weight}")


@dataclass
class DataConfig:
    """The training stream: manifests mixed by weight, processed by the model's processor, packed or padded."""

    sources: list[SourceConfig] = field(default_factory=list)
    packing: bool = True
    max_length: int = 2048  # tokens per packed row (or the cap on one padded sample)
    rows_per_batch: int = 1  # packed rows per micro-batch; with packing off, samples per micro-batch
    num_workers: int = 0  # DataLoader worker processes (0 or 1: the stream is sequential, for exact resume)
    # Video sampling overrides passed to the processor (None keeps the processor's settings).
    fps: float | None = None
    max_frames: int | None = None
    token_budget: int | None = None
    # Keep decoded, planned videos in memory (a video with several questions is decoded once per worker).
    cache_videos: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    # Per-parameter-group learning-rate multipliers: {regex: factor}, first match wins (e.g. a faster projector).
    lr_scale: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError("optim.schedule", f"must be cosine/linear/constant, got {self.schedule!r}")


@dataclass
class ContrastiveConfig:
    """Stage 0: SigLIP sigmoid loss between pooled vision-tower features and pooled caption embeddings."""

    embed_dim: int = 128
    init_temperature: float = 10.0
    init_bias: float = -10.0


@dataclass
class TrainConfig:
    """A whole training run. ``objective``: "lm" (next-token loss on assistant tokens) or "contrastive" (stage 0)."""

    # The recipe this config is for (the command that runs it: `keye pretrain`, `keye sft`, `keye dpo`, `keye rl`);
    # each recipe's config class has its own default, and a YAML naming another recipe is refused.
    recipe: str = "pretrain"
    name: str = "run"
    output_dir: str = "runs/run"
    objective: str = "lm"
    seed: int = 0
    max_steps: int = 100
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | no | bf16 | fp16
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 1
    deepspeed: str | None = None  # a ZeRO JSON (configs/deepspeed/zero2.json); needs accelerate + deepspeed
    export: bool = True  # write <output_dir>/final (trained tensors, and a loadable model folder)
    model: ModelConfig = field(default_factory=ModelConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)

    def __post_init__(self):
        _check_recipe(type(self), self.recipe)
        if self.objective not in ("lm", "contrastive"):
            raise ConfigError("objective", f"must be 'lm' or 'contrastive', got {self.objective!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError("mixed_precision", f"must be auto/no/bf16/fp16, got {self.mixed_precision!r}")
        if self.max_steps < 1 or self.grad_accum < 1 or self.keep_last < 1:
            raise ConfigError("train", "max_steps, grad_accum and keep_last must be >= 1")


def _check_recipe(cls: type, recipe: object) -> None:
    """A config names the recipe of ``cls`` (the one that reads it), or the error says which command runs it."""
    expected = cls.__dataclass_fields__["recipe"].default
    if recipe == expected:
        return
    if recipe not in RECIPES:
        raise ConfigError("recipe", f"unknown recipe {recipe!r}; one of {', '.join(RECIPES)}")
    command = {"labels": "pretrain"}.get(recipe, recipe)  # the command that runs each recipe
    raise ConfigError("recipe", f"a {recipe!r} config; run it with `keye {command}`, not `keye {expected}`")


# recipe -> its config class ("module:Class", imported on use: the post-training recipes live above this layer)
RECIPES = {
    "pretrain": "keye.training.config:TrainConfig",
    "labels": "keye.pretrain.labels:LabelsConfig",  # Stage 0's label objective, run by `keye pretrain` too
    "sft": "keye.posttrain.sft:PostTrainConfig",
    "dpo": "keye.posttrain.dpo:DPOConfig",
    "rl": "keye.posttrain.rl:RLConfig",
}


def recipe_config_class(path: str | Path, default: str | None = None) -> type:
    """The config class of the recipe a YAML file names (its ``recipe:`` key; ``default`` when it names none)."""
    data, _ = read_config(path)
    recipe = data.get("recipe", default)
    if recipe not in RECIPES:
        raise ConfigError(str(path), f"recipe: must be one of {', '.join(RECIPES)}, got {recipe!r}")
    return recipe_class(recipe)


def recipe_class(recipe: str) -> type:
    """The config class of ``recipe`` (a key of `RECIPES`)."""
    import importlib

    module, name = RECIPES[recipe].split(":")
    return getattr(importlib.import_module(module), name)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, cls: type = TrainConfig
) -> Any:
    """Load ``cls`` from a YAML file (None: defaults) with ``key.sub=value`` overrides (values parsed as YAML); a
    config naming another recipe is refused first, with the command that runs it."""
    data, source = read_config(path, overrides)
    if "recipe" in data and "recipe" in getattr(cls, "__dataclass_fields__", {}):
        try:
            _check_recipe(cls, data["recipe"])  # before the other keys: a wrong recipe explains them all
        except ConfigError as e:
            raise ConfigError(source, e.args[0]) from e
    return build_config(cls, data, source)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
