"""Token compression applied to a processed prompt: DynTok merges similar neighbouring tokens of each video frame.

DynTok's merged tokens keep the M-RoPE positions of their group's first token (see `keye.encoders.dyntok`), a subset
of the full grid's positions, so compressing a prompt is: encode the frames once, group, then drop the pad tokens
(and their position ids) that were merged away, and hand the merged tokens to the model as ``video_embeds``.
Only batches of one conversation are compressed (chat and evaluation use one).
"""

from __future__ import annotations

import torch

from keye.encoders.dyntok import DYNTOK_THRESHOLD, DynTokResult, dyntok_frames

COMPRESSIONS = ("none", "dyntok")
_PER_TOKEN = ("input_ids", "attention_mask", "labels")


@torch.no_grad()
def dyntok_inputs(model, inputs, threshold: float = DYNTOK_THRESHOLD) -> tuple[dict, DynTokResult]:
    """Processor output with videos -> the same prompt with DynTok applied to every video frame.

    Returns new model inputs (``video_embeds`` instead of ``pixel_values_videos``) and the DynTok statistics.
    """
    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError("dyntok_inputs compresses one conversation at a time")
    grids = inputs["video_grid_thw"]
    device = model.device
    features = model.vision(inputs["pixel_values_videos"].to(device), grids)
    merged = model.projector.merge_patches(features, grids)  # (N, 4*D_vit): the features DynTok compares
    tokens = model.projector.project(merged)  # (N, D_llm)
    m = model.config.projector.merge_size
    result = dyntok_frames(merged, tokens, [(h // m, w // m) for _, h, w in grids.tolist()], threshold)

    slots = (ids[0] == model.config.video_token_id).nonzero().squeeze(1)  # sequence index of each video token
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[slots] = False
    keep[slots[result.keep_index.cpu()]] = True
    out = {k: v for k, v in inputs.items() if k not in ("pixel_values_videos", "video_grid_thw")}
    for k in _PER_TOKEN:
        if k in inputs:
            out[k] = inputs[k][:, keep]
    out["position_ids"] = inputs["position_ids"][:, :, keep]
    out["video_embeds"] = result.tokens
    return out, result


def compress_inputs(model, inputs, method: str) -> tuple[dict, int]:
    """Apply ``method`` ("none" | "dyntok") to a processed prompt; returns (inputs, video tokens after)."""
    if method not in COMPRESSIONS:
        raise ValueError(f"unknown compression {method!r}; choose from {COMPRESSIONS}")
    if method == "none" or "pixel_values_videos" not in inputs:
        n = int((inputs["input_ids"] == model.config.video_token_id).sum())
        return dict(inputs), n
    out, result = dyntok_inputs(model, inputs)
    return out, result.tokens_after
