"""Configuration of a Keye model: a vision tower, a 2x2-merge projector and a causal text decoder.

`KeyeConfig` nests three sub-configs (``vision_config``, ``projector_config``, ``text_config``, also reachable as
``config.vision``, ``config.projector``, ``config.text``) and the ids of the vision special tokens. The defaults are
Keye-VL-1.5-8B's (SigLIP-so400m vision tower, Qwen3-8B text model); `keye_tiny_config` builds the small model that
runs on a laptop CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

from keye.encoders.clapper import ClapperConfig
from keye.encoders.vision import KeyeVisionConfig

# Names of the special tokens a Keye tokenizer carries (their ids live in `KeyeConfig`).
VISION_TOKENS = {
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "vision_pad": "<|vision_pad|>",
    "image_pad": "<|image_pad|>",
    "video_pad": "<|video_pad|>",
    "frame": "<|frame|>",
    "fast_start": "<|fast_start|>",
    "fast_end": "<|fast_end|>",
    "think_start": "<think>",
    "think_end": "</think>",
}


@strict
class KeyeProjectorConfig(PreTrainedConfig):
    """2x2 patch merge -> LayerNorm -> Linear -> GELU -> Linear (Keye-VL-1.5's `mlp_AR`).

    ``temporal_hidden_size`` > 0 adds a temporal branch (not in Keye-VL-1.5; keye-tiny has one): each video frame's
    merged tokens also see its reference frame's (`keye.encoders.slowfast.reference_frames`) at the same place, so a
    token can say how things moved, which a frame alone cannot show."""

    model_type = "keye_projector"
    base_config_key = "projector_config"

    merge_size: int = 2
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    temporal_hidden_size: int = 0


@strict
class KeyeTextConfig(PreTrainedConfig):
    """A Llama/Qwen3-family causal decoder with multimodal RoPE.

    ``qk_norm`` selects the decoder block once: Qwen3 blocks (RMSNorm on queries and keys) or Llama blocks.
    ``mrope_section`` splits the rotary half-dimension between the temporal, height and width position axes; text
    tokens carry the same index on all three axes, which makes M-RoPE exactly ordinary 1D RoPE.
    """

    model_type = "keye_text"
    base_config_key = "text_config"
    default_theta = 1_000_000.0
    ignore_keys_at_rope_validation = {"mrope_section"}

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    mlp_bias: bool = False
    qk_norm: bool = True
    # {"rope_type": "default", "rope_theta": ..., "mrope_section": [t, h, w]} (Qwen2-VL's layout)
    rope_parameters: dict | None = None
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if self.rope_parameters is None:
            self.rope_parameters = {
                "rope_type": "default",
                "rope_theta": kwargs.pop("rope_theta", self.default_theta),
            }
        if "mrope_section" not in self.rope_parameters:
            # Keye-VL-1.5 / Qwen2-VL split for head_dim 128 is [16, 24, 24]; scaled alike for other head sizes.
            half = self.head_dim // 2
            t = half // 4
            h = (half - t) // 2
            self.rope_parameters["mrope_section"] = [t, h, half - t - h]
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}"
            )

    @property
    def mrope_section(self) -> list[int]:
        return list(self.rope_parameters["mrope_section"])

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["rope_theta"])


@dataclass
class ModelCard:
    """What a model was trained to do, as the demo and ``keye info`` tell a user (``config.model_card``).

    A folder without a card (a converted Keye-VL-1.5, a model trained elsewhere) makes no claim: every mode stays
    available. ``answers`` describes the answer style in a few words; ``notes`` what to expect, in a sentence or two.
    """

    answers: str = ""
    thinking: bool = True  # writes a reasoning section when asked to think
    tools: bool = True  # writes Thyme code for the sandbox when given the tool prompt
    notes: str = ""

    @classmethod
    def from_dict(cls, d: dict | None) -> ModelCard:
        d = d or {}
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"model_card: unknown fields {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


KEYE_TINY_CARD = ModelCard(
    answers="one word or number",
    thinking=False,
    tools=False,
    notes=(
        "keye-tiny (a 135M language model with a 4-layer vision tower) was trained only on generated clips: the "
        "colour, shape, count and motion of simple shapes, on-screen words and digits, and the order of scenes. On "
        "clips like the generated examples here (up to four shapes, text in half of them) it is right about 3 times "
        "in 4 (counts and text nearly 9 times in 10, colours and shapes about 6 in 10); it does not reason step by "
        "step and has not learned to write code for tools."
    ),
)


@strict
class KeyeConfig(PreTrainedConfig):
    """Top-level Keye configuration.

    ``tokens_per_second`` ties the temporal M-RoPE index of a video frame to its timestamp: a frame at time ``t`` s
    gets temporal index ``video_start + round(t * tokens_per_second)``. ``None`` reproduces Keye-VL-1.5's released
    behaviour, where a frame's temporal index is simply its place in the sequence (see `keye.rope`).

    ``clapper_config`` (a `keye.encoders.clapper.ClapperConfig` as a dict) gives the model a Clapper TimePerceiver
    (``model.clapper``) for ``compress="clapper"``; ``None`` (the default, and every checkpoint without one): no such
    module, and `keye.compression` falls back to an untrained one.

    ``model_card`` (a `ModelCard` as a dict, ``config.card``) says what the model was trained to do.
    """

    model_type = "keye"
    sub_configs_defaults = {
        "vision_config": KeyeVisionConfig,
        "projector_config": KeyeProjectorConfig,
        "text_config": KeyeTextConfig,
    }

    vision_config: dict | PreTrainedConfig | None = None
    projector_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None

    # Qwen-vocabulary ids (Keye-VL-1.5); keye-tiny overrides them with the ids it adds to SmolLM2's vocabulary.
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_pad_token_id: int = 151654
    image_token_id: int = 151655
    video_token_id: int = 151656
    frame_token_id: int | None = None
    fast_start_token_id: int | None = None
    fast_end_token_id: int | None = None
    think_start_token_id: int | None = 151667
    think_end_token_id: int | None = 151668
    tokens_per_second: float | None = 2.0
    tie_word_embeddings: bool = False
    clapper_config: dict | None = None
    model_card: dict | None = None

    def validate_clapper(self):
        """Part of `@strict`-powered validation: the TimePerceiver works at the text model's width."""
        if self.clapper is not None and self.clapper.llm_width != self.text.hidden_size:
            raise ValueError(
                f"clapper_config.llm_width {self.clapper.llm_width} must equal text_config.hidden_size "
                f"{self.text.hidden_size}"
            )

    @property
    def vision(self) -> KeyeVisionConfig:
        return self.vision_config

    @property
    def projector(self) -> KeyeProjectorConfig:
        return self.projector_config

    @property
    def text(self) -> KeyeTextConfig:
        return self.text_config

    @property
    def clapper(self) -> ClapperConfig | None:
        return None if self.clapper_config is None else ClapperConfig.from_dict(self.clapper_config)

    @property
    def card(self) -> ModelCard:
        return ModelCard.from_dict(self.model_card)


def token_id_fields(ids: dict[str, int]) -> dict[str, int]:
    """`KeyeConfig`'s token-id fields from a ``{name: id}`` map of `VISION_TOKENS` (``add_keye_tokens``'s result)."""
    names = {"image_pad": "image_token_id", "video_pad": "video_token_id"}
    return {names.get(k, f"{k}_token_id"): ids[k] for k in VISION_TOKENS}


def keye_tiny_config(text_config: KeyeTextConfig | dict, **token_ids) -> KeyeConfig:
    """keye-tiny: a 4-layer, 192-wide ViT and projector in front of SmolLM2-135M-Instruct."""
    vision = KeyeVisionConfig(
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=224,
        packing_position_embedding_size=0,
    )
    text = text_config if isinstance(text_config, KeyeTextConfig) else KeyeTextConfig(**text_config)
    return KeyeConfig(
        vision_config=vision,
        projector_config=KeyeProjectorConfig(temporal_hidden_size=256),
        text_config=text,
        tie_word_embeddings=text.tie_word_embeddings,
        tokens_per_second=2.0,
        model_card=KEYE_TINY_CARD.to_dict(),
        **token_ids,
    )


AutoConfig.register("keye", KeyeConfig, exist_ok=True)
