"""Training objectives: next-token loss on assistant tokens, and Stage 0's SigLIP-style contrastive loss.

`lm_loss_sum` returns the *sum* of token losses and the token count, so the caller normalises once over everything
that makes one optimizer step (micro-batches, ranks): a packed row then gives exactly the sum of its samples' losses.
It computes logits only where a label is trained (a forward hook keeps those hidden states), which skips most of the
vocabulary projection on vision-heavy sequences.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from keye.processing import IGNORE_INDEX, VISION_INPUTS

__all__ = ["MODEL_INPUTS", "SigLIPHead", "contrastive_loss", "lm_loss_sum", "model_inputs"]

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", *VISION_INPUTS)


def model_inputs(batch: dict, device: torch.device) -> dict:
    return {k: batch[k].to(device) for k in MODEL_INPUTS if batch.get(k) is not None}


@contextmanager
def _keep_hidden(model: nn.Module, keep: torch.Tensor):
    """Within the block, the text model returns only the hidden states at ``keep`` (B, T) as (1, K, D)."""

    def hook(_module, _args, output):
        output.last_hidden_state = output.last_hidden_state[keep][None]  # (1, K, D)
        return output

    handle = model.language_model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def lm_loss_sum(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """``(sum of next-token cross-entropies over trained labels, number of trained labels)`` for one micro-batch."""
    device = next(model.parameters()).device
    labels = batch["labels"].to(device)  # (B, T)
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE_INDEX
    n = int(keep.sum())
    with _keep_hidden(model, keep):
        logits = model(**model_inputs(batch, device), use_cache=False).logits  # (1, K, V)
    loss = F.cross_entropy(logits[0].float(), labels[:, 1:][keep[:, :-1]], reduction="sum")
    return loss, n


class SigLIPHead(nn.Module):
    """Projections and the learned temperature/bias of SigLIP's pairwise sigmoid loss (Zhai et al., 2023)."""

    def __init__(
        self, vision_dim: int, text_dim: int, embed_dim: int, init_temperature: float, init_bias: float
    ):
        super().__init__()
        self.vision_proj = nn.Linear(vision_dim, embed_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.log_t = nn.Parameter(torch.tensor(float(init_temperature)).log())
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))


def _pool(features: torch.Tensor, grid_thw: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of patch features ``(N, D)`` per sample (``owner``: sample of each grid row) -> ``(n, D)``."""
    per_row = (grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).tolist()
    idx = torch.repeat_interleave(owner.to(features.device), torch.tensor(per_row, device=features.device))
    sums = torch.zeros(n, features.shape[1], device=features.device, dtype=features.dtype)
    sums.index_add_(0, idx, features)
    counts = torch.bincount(idx, minlength=n).clamp(min=1)[:, None]
    return sums / counts


def contrastive_loss(model: nn.Module, head: SigLIPHead, batch: dict) -> tuple[torch.Tensor, int]:
    """SigLIP loss between each sample's pooled vision features and its pooled caption (assistant) embeddings.

    The text tower is the language model's token embedding, mean-pooled: cheap, and enough to name the attributes a
    caption lists. Returns ``(mean loss over the B x B pairs, B)``.
    """
    device = next(model.parameters()).device
    n = batch["input_ids"].shape[0]
    vis = torch.zeros(n, model.config.vision.hidden_size, device=device)
    count = torch.zeros(n, 1, device=device)
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if batch.get(pix) is None:
            continue
        g = batch[grid].to(device)
        feats = model.vision(batch[pix].to(device), g).float()  # (N, D_vit)
        owner = batch[grid + "_owner"].to(device)
        vis = vis + _pool(feats, g, owner, n) * torch.bincount(owner, minlength=n).clamp(max=1)[:, None]
        count = count + torch.bincount(owner, minlength=n).clamp(max=1)[:, None]
    vis = vis / count.clamp(min=1)
    labels = batch["labels"].to(device)
    mask = (labels != IGNORE_INDEX).float()[..., None]  # (B, T, 1)
    emb = model.language_model.embed_tokens(labels.clamp(min=0)).float()  # (B, T, D_llm)
    txt = (emb * mask).sum(1) / mask.sum(1).clamp(min=1)
    zi = F.normalize(head.vision_proj(vis), dim=-1)
    zt = F.normalize(head.text_proj(txt), dim=-1)
    logits = zi @ zt.T * head.log_t.exp() + head.bias  # (B, B)
    target = 2 * torch.eye(n, device=device) - 1  # +1 on the diagonal, -1 elsewhere
    return -F.logsigmoid(target * logits).sum() / n, n
