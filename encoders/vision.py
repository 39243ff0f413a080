"""The native-resolution vision tower: a SigLIP-style ViT over packed variable-length patch sequences.

Images and video frames of different sizes are cut into 14x14 patches and packed into one sequence
``(num_patches, 3*14*14)``; ``grid_thw`` (one ``[t, h, w]`` row per image or video chunk, in patches) says where
each one starts. Attention is block-diagonal: every frame attends only to its own patches (flash-attn's varlen kernel
when installed on a GPU, otherwise SDPA over same-length groups, so no ``N x N`` mask is ever built). Positions are a
learned 27x27 table bilinearly resized to each grid, plus 2D RoPE on queries and keys.

Module and parameter names follow Keye-VL-1.5's ``visual.vision_model.*`` so its weights load by a prefix rename.
Not for: merging patches into LLM tokens (``keye.modeling.KeyeProjector``) or choosing frames (``slowfast``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.utils.import_utils import is_flash_attn_2_available


@strict
class KeyeVisionConfig(PreTrainedConfig):
    """SigLIP-style ViT over 14x14 patches at native resolution (2D RoPE + a bilinearly resized position table)."""

    model_type = "keye_vision"
    base_config_key = "vision_config"

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    # The learned absolute position table covers (image_size / patch_size)^2 positions (27x27 for SigLIP-so400m)
    # and is bilinearly resized to each image's patch grid.
    image_size: int = 378
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    # Keye-VL-1.5 checkpoints carry a `packing_position_embedding` table (32768 rows) that its forward pass does not
    # read when positions are interpolated. Kept for checkpoint compatibility; 0 leaves it out (keye-tiny does).
    packing_position_embedding_size: int = 32768
    spatial_merge_size: int = 2
    initializer_range: float = 0.02

    def validate_architecture(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads"
            )
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError(
                "vision head_dim must be a multiple of 4 (2D RoPE splits it into h and w halves)"
            )


def frame_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Patches per attention segment: one segment per frame, ``h*w`` repeated ``t`` times. ``(sum t,)``"""
    return torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor
) -> torch.Tensor:
    """Non-causal attention within each segment of a packed sequence.

    q, k, v: ``(N, heads, head_dim)``; seqlens: ``(S,)`` summing to N. Returns ``(N, heads, head_dim)``.
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and is_flash_attn_2_available():
        from flash_attn import flash_attn_varlen_func

        cu = F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
        max_len = int(seqlens.max())
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=False)

    # SDPA fallback: segments of equal length are batched together, so the cost is that of the real blocks only.
    out = torch.empty_like(q)
    starts = F.pad(seqlens.cumsum(0), (1, 0))[:-1]
    lens = seqlens.tolist()
    for length in sorted(set(lens)):
        seg_starts = starts[seqlens == length]  # (B,)
        idx = (seg_starts[:, None] + torch.arange(length, device=q.device)[None, :]).reshape(-1)  # (B*L,)
        b = seg_starts.numel()
        qb, kb, vb = (
            x[idx].view(b, length, *x.shape[1:]).transpose(1, 2) for x in (q, k, v)
        )  # (B, heads, L, hd)
        o = F.scaled_dot_product_attention(qb, kb, vb)  # (B, heads, L, head_dim)
        out[idx] = o.transpose(1, 2).reshape(b * length, *q.shape[1:])
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionRotaryEmbedding(nn.Module):
    """2D RoPE: the first half of each head's rotary frequencies encodes the patch row, the second half the column."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        dim = head_dim // 2
        self.inv_freq = nn.Buffer(
            1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim), persistent=False
        )

    def forward(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = [], []
        for t, h, w in grid_thw.tolist():
            rows.append(torch.arange(h).repeat_interleave(w).repeat(t))
            cols.append(torch.arange(w).repeat(h * t))
        hw = torch.stack([torch.cat(rows), torch.cat(cols)], dim=-1).to(self.inv_freq.device)  # (N, 2)
        freqs = (hw[..., None].float() * self.inv_freq).flatten(1)  # (N, head_dim/2): [row freqs, col freqs]
        emb = torch.cat((freqs, freqs), dim=-1)  # (N, head_dim)
        return emb.cos(), emb.sin()


class KeyeVisionEmbeddings(nn.Module):
    def __init__(self, config: KeyeVisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, config.patch_size
        )
        self.side = config.image_size // config.patch_size
        self.position_embedding = nn.Embedding(self.side * self.side, config.hidden_size)
        if config.packing_position_embedding_size:
            self.packing_position_embedding = nn.Embedding(
                config.packing_position_embedding_size, config.hidden_size
            )

    def resized_positions(self, h: int, w: int) -> torch.Tensor:
        """The position table bilinearly resized to an ``h x w`` patch grid. ``(h*w, hidden)``"""
        table = self.position_embedding.weight.view(1, self.side, self.side, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table.float(), size=(h, w), mode="bilinear", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(h * w, -1).to(self.position_embedding.weight.dtype)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        weight = self.patch_embedding.weight
        patches = pixel_values.view(-1, self.config.num_channels, p, p).to(weight.dtype)  # (N, 3, 14, 14)
        embeds = self.patch_embedding(patches).flatten(1)  # (N, hidden)
        # a video's frames share a few sizes: each table is resized once per call, not once per frame
        tables: dict[tuple[int, int], torch.Tensor] = {}
        for _, h, w in grid_thw.tolist():
            if (h, w) not in tables:
                tables[h, w] = self.resized_positions(h, w)
        positions = torch.cat([tables[h, w].repeat(t, 1) for t, h, w in grid_thw.tolist()])
        return embeds + positions


class KeyeVisionAttention(nn.Module):
    def __init__(self, config: KeyeVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, seqlens, rope):
        n = hidden_states.shape[0]
        q = self.q_proj(hidden_states).view(n, self.num_heads, self.head_dim)  # (N, heads, head_dim)
        k = self.k_proj(hidden_states).view(n, self.num_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(n, self.num_heads, self.head_dim)
        cos, sin = (x[:, None, :].float() for x in rope)  # (N, 1, head_dim)
        # in fp32 whatever the working dtype, as the official code does (bf16 angles lose the fine positions)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        out = varlen_attention(q, k, v, seqlens)  # (N, heads, head_dim)
        return self.out_proj(out.reshape(n, -1))


class KeyeVisionMLP(nn.Module):
    def __init__(self, config: KeyeVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class KeyeVisionEncoderLayer(nn.Module):
    def __init__(self, config: KeyeVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = KeyeVisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = KeyeVisionMLP(config)

    def forward(self, hidden_states, seqlens, rope):
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), seqlens, rope)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class KeyeVisionEncoder(nn.Module):
    def __init__(self, config: KeyeVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(KeyeVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, hidden_states, seqlens, rope):
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states = torch.utils.checkpoint.checkpoint(
                    layer, hidden_states, seqlens, rope, use_reentrant=False
                )
            else:
                hidden_states = layer(hidden_states, seqlens, rope)
        return hidden_states


class KeyeVisionModel(nn.Module):
    """``pixel_values (N, 3*14*14)`` + ``grid_thw (items, 3)`` -> patch features ``(N, hidden)`` in input order."""

    def __init__(self, config: KeyeVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = KeyeVisionEmbeddings(config)
        self.encoder = KeyeVisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary = VisionRotaryEmbedding(head_dim, config.rope_theta)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid_thw = grid_thw.to(torch.long).cpu()
        hidden_states = self.embeddings(pixel_values, grid_thw)  # (N, hidden)
        seqlens = frame_seqlens(grid_thw).to(hidden_states.device)  # (frames,)
        rope = self.rotary(grid_thw)
        hidden_states = self.encoder(hidden_states, seqlens, rope)
        return self.post_layernorm(hidden_states)
