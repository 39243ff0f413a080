"""The Keye model: vision tower -> 2x2-merge projector -> causal decoder with M-RoPE.

Data flow of `KeyeForConditionalGeneration.forward`:

    pixel_values (N, 3*14*14), *_grid_thw  --vision-->  (N, D_vit)  --projector-->  (N/4, D_llm)
        (+ video_reference_index: each frame's tokens also see its reference frame's, when the projector has a
        temporal branch)
    input_ids (B, T)  --embed_tokens-->  (B, T, D_llm); vision tokens replace the <|image_pad|>/<|video_pad|> slots
    position_ids (3, B, T) M-RoPE (from `KeyeProcessor`; see `keye.rope`)  -->  decoder  -->  logits (B, T, V)

Only what transformers lacks is written here: the projector, the multimodal embedding merge and a text model that
composes transformers' own Llama or Qwen3 decoder blocks with Qwen2-VL's M-RoPE rotary embedding. The vision tower
lives in `keye.encoders.vision`; the optional Clapper TimePerceiver (``config.clapper_config``) in
`keye.encoders.clapper`, used by `keye.compression` on the projected tokens (``forward`` takes its output as
``video_embeds``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageTextToText, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from keye.configuration import KeyeConfig, KeyeTextConfig
from keye.encoders.clapper import TimePerceiver
from keye.encoders.vision import KeyeVisionConfig, KeyeVisionModel, VisionRotaryEmbedding


class KeyeTemporalBranch(nn.Module):
    """What a video frame's tokens add from its reference frame (``KeyeProjectorConfig.temporal_hidden_size``).

    Each merged token sees itself, the reference frame's merged tokens at the same place (average-pooled to this
    frame's grid when the sizes differ) and both frames' means; an MLP maps that to a residual on the projected token.
    The last layer starts at zero, so an untrained branch changes nothing."""

    def __init__(self, config: KeyeConfig):
        super().__init__()
        self.merge = config.projector.merge_size
        width = 4 * config.vision.hidden_size * self.merge**2
        self.norm = nn.LayerNorm(width, eps=config.projector.layer_norm_eps)
        self.linear_1 = nn.Linear(width, config.projector.temporal_hidden_size)
        self.act = ACT2FN[config.projector.hidden_act]
        self.linear_2 = nn.Linear(config.projector.temporal_hidden_size, config.text.hidden_size)
        self.linear_2._keye_zero_init = True  # KeyePreTrainedModel._init_weights

    def forward(self, merged: torch.Tensor, grid_thw: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """merged ``(M, 4*D_vit)`` in frame order; reference ``(frames,)``: the frame each frame compares with
        (itself: none). Returns ``(M, D_llm)``."""
        m = self.merge
        sizes = [(h // m, w // m) for t, h, w in grid_thw.tolist() for _ in range(t)]
        if reference.numel() != len(sizes):
            raise ValueError(f"temporal branch: {reference.numel()} reference frames for {len(sizes)} frames")
        frames = merged.split([h * w for h, w in sizes])
        rows = []
        for x, hw, r in zip(frames, sizes, reference.tolist()):
            ref = frames[r]
            if sizes[r] != hw:
                ref = F.adaptive_avg_pool2d(ref.t().reshape(1, -1, *sizes[r]), hw).flatten(2)[0].t()
            means = torch.cat([x.mean(0), frames[r].mean(0)]).expand(x.shape[0], -1)
            rows.append(torch.cat([x, ref, means], dim=1))  # (h*w, 4 * 4*D_vit)
        return self.linear_2(self.act(self.linear_1(self.norm(torch.cat(rows)))))


class KeyeProjector(nn.Module):
    """Merge each 2x2 block of patch features into one LLM token (Keye-VL-1.5's ``mlp_AR``), plus the temporal branch
    when configured."""

    def __init__(self, config: KeyeConfig):
        super().__init__()
        self.merge = config.projector.merge_size
        width = config.vision.hidden_size * self.merge**2
        self.pre_norm = nn.LayerNorm(width, eps=config.projector.layer_norm_eps)
        self.linear_1 = nn.Linear(width, width)
        self.act = ACT2FN[config.projector.hidden_act]
        self.linear_2 = nn.Linear(width, config.text.hidden_size)
        self.temporal = None
        if config.projector.temporal_hidden_size:
            # a seeded model's vision tower and projector (what keye-tiny trains from its seed) initialise as without it
            with torch.random.fork_rng(devices=[]):
                self.temporal = KeyeTemporalBranch(config)

    def merge_patches(self, features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Row-major patches ``(N, D)`` -> merged tokens ``(N/4, 4*D)``; token (i, j) holds patches (2i+a, 2j+b)."""
        m, out, start = self.merge, [], 0
        for t, h, w in grid_thw.tolist():
            x = features[start : start + t * h * w]
            start += t * h * w
            x = x.view(t, h // m, m, w // m, m, -1).permute(0, 1, 3, 2, 4, 5)  # (t, h/m, w/m, m, m, D)
            out.append(x.reshape(t * (h // m) * (w // m), -1))
        return torch.cat(out)

    def project(
        self,
        merged: torch.Tensor,
        grid_thw: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Merged patch features ``(M, 4*D_vit)`` -> LLM tokens ``(M, D_llm)``. With ``reference`` (video frames:
        `keye.encoders.slowfast.reference_frames`, counted over ``grid_thw``'s frames) the temporal branch adds its
        residual; without it, or without a branch, the projection is Keye-VL-1.5's."""
        out = self.linear_2(self.act(self.linear_1(self.pre_norm(merged))))
        if self.temporal is not None and reference is not None:
            out = out + self.temporal(merged, grid_thw.cpu(), reference.cpu())
        return out

    def forward(
        self, features: torch.Tensor, grid_thw: torch.Tensor, reference: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.project(self.merge_patches(features, grid_thw), grid_thw, reference)  # (N/4, D_llm)


class KeyeTextModel(nn.Module):
    """Token embeddings, N decoder blocks (Qwen3's when ``qk_norm``, else Llama's), final norm, M-RoPE."""

    def __init__(self, config: KeyeTextConfig):
        super().__init__()
        self.config = config
        block = Qwen3DecoderLayer if config.qk_norm else LlamaDecoderLayer
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(block(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2VLRotaryEmbedding(config)
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        text_position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        # `text_position_ids` (B, T) restart at 0 for every sample of a packed sequence; transformers builds the
        # block-diagonal causal mask (SDPA/eager) or the varlen boundaries (flash-attn) from them.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=text_position_ids,
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)  # cos, sin: (B, T, head_dim)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_ids=text_position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class KeyePreTrainedModel(PreTrainedModel):
    config_class = KeyeConfig
    config: KeyeConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "Qwen3DecoderLayer", "KeyeVisionEncoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, VisionRotaryEmbedding):  # a buffer transformers cannot re-create by itself
            dim = module.inv_freq.numel() * 2
            theta = self.config.vision_config.rope_theta
            module.inv_freq.copy_(1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        # TimePerceiver's own init, after its Linears': out_proj at zero (untrained output = pooled tokens)
        if isinstance(module, TimePerceiver):
            init.normal_(module.queries, std=0.02)
            init.zeros_(module.frame_embed)
            init.zeros_(module.out_proj.weight)
            init.zeros_(module.out_proj.bias)
        # the temporal branch starts as no change; marked on its Linear, since transformers skips initialising a
        # custom module without parameters of its own
        if getattr(module, "_keye_zero_init", False):
            init.zeros_(module.weight)
            init.zeros_(module.bias)


class KeyeForConditionalGeneration(KeyePreTrainedModel, GenerationMixin):
    """Keye vision-language model. Parameters: ``vision.*``, ``projector.*``, ``language_model.*``, ``lm_head``, and
    ``clapper.*`` when ``config.clapper_config`` is set."""

    _tied_weights_keys = {"lm_head.weight": "language_model.embed_tokens.weight"}

    def __init__(self, config: KeyeConfig):
        super().__init__(config)
        # Our sub-modules are plain nn.Modules reading their own sub-config: the setter copies the choice down.
        self.config._attn_implementation = self.config._attn_implementation
        self.vision = KeyeVisionModel(config.vision_config)
        self.projector = KeyeProjector(config)
        self.language_model = KeyeTextModel(config.text_config)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.clapper = TimePerceiver(config.clapper) if config.clapper is not None else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.language_model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear):
        self.lm_head = value

    def encode_vision(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, reference: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pixels ``(N, 3*14*14)`` -> LLM-width vision tokens ``(N/4, D_llm)``, in the order of ``grid_thw``.
        ``reference``: video frames' reference frames (``video_reference_index``), for the projector's temporal
        branch."""
        features = self.vision(pixel_values.to(self.vision.embeddings.patch_embedding.weight.dtype), grid_thw)
        return self.projector(features, grid_thw, reference)

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool = False, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            # Precomputed vision tokens belong to the prompt, like pixel values: only the prefill merges them.
            inputs.pop("image_embeds", None)
            inputs.pop("video_embeds", None)
        return inputs

    def _merge_vision(self, input_ids, inputs_embeds, token_id, embeds, kind):
        slots = input_ids == token_id  # (B, T)
        n = int(slots.sum())
        if n != embeds.shape[0]:
            raise ValueError(
                f"{kind}: the prompt has {n} <{kind}_pad> tokens but the vision tower produced {embeds.shape[0]} "
                "tokens; build inputs with KeyeProcessor so the pad counts match the grids"
            )
        return inputs_embeds.masked_scatter(slots[..., None], embeds.to(inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        video_reference_index: torch.LongTensor | None = None,
        image_embeds: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``position_ids``: ``(3, B, T)`` M-RoPE ids, ``(4, B, T)`` with per-sample text positions first (packed
        training), ``(B, T)`` for text only, or None (text only, continuing after the cache).
        ``video_reference_index`` ``(frames,)``: each video frame's reference frame (`KeyeProcessor` returns it; only
        a projector with a temporal branch reads it). ``logits_to_keep``: 0 for every position, ``k`` for the last k,
        or a ``(B, T)`` bool mask: logits ``(N, V)`` at its N true positions only (in row-major order; what a loss
        over some tokens needs, e.g. RL's model turns, without the vocabulary-wide rows of the rest)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.language_model.embed_tokens(input_ids)  # (B, T, D)
        if pixel_values is not None and image_embeds is None:
            image_embeds = self.encode_vision(pixel_values, image_grid_thw)
        if pixel_values_videos is not None and video_embeds is None:
            video_embeds = self.encode_vision(pixel_values_videos, video_grid_thw, video_reference_index)
        has_vision = image_embeds is not None or video_embeds is not None
        if has_vision and input_ids is None:
            raise ValueError("vision inputs need input_ids to locate their pad tokens")
        if image_embeds is not None:
            inputs_embeds = self._merge_vision(
                input_ids, inputs_embeds, self.config.image_token_id, image_embeds, "image"
            )
        if video_embeds is not None:
            inputs_embeds = self._merge_vision(
                input_ids, inputs_embeds, self.config.video_token_id, video_embeds, "video"
            )

        batch, length = inputs_embeds.shape[:2]
        text_position_ids = None
        if position_ids is None:
            if has_vision:
                raise ValueError(
                    "vision inputs need M-RoPE position_ids (3, B, T); KeyeProcessor returns them"
                )
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device).expand(batch, -1)
        if position_ids.ndim == 2:  # text only: all three axes equal
            position_ids = position_ids[None].expand(3, -1, -1)
        elif position_ids.shape[0] == 4:
            text_position_ids, position_ids = position_ids[0], position_ids[1:]

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            text_position_ids=text_position_ids,
            cache=cache,
            use_cache=use_cache if use_cache is not None else self.config.text.use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[logits_to_keep.to(hidden_states.device)]  # (N, D)
        elif logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


__all__ = [
    "KeyeForConditionalGeneration",
    "KeyePreTrainedModel",
    "KeyeProjector",
    "KeyeTemporalBranch",
    "KeyeTextModel",
    "KeyeVisionConfig",
]


AutoModelForImageTextToText.register(KeyeConfig, KeyeForConditionalGeneration, exist_ok=True)
