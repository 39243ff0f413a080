"""DynTok wired into the prompt: fewer video tokens, positions kept from the full grid, generation works."""

from __future__ import annotations

import torch

from keye.chat import ChatSession
from keye.compression import compress_inputs, dyntok_inputs


def _video_prompt(processor, video):
    return processor([{"role": "user", "content": [{"type": "video", "video": str(video)},
                                                   {"type": "text", "text": "What is shown?"}]}])  # fmt: skip


def test_dyntok_drops_merged_pads_and_keeps_their_positions(keye_tiny, sample_video):
    model, processor = keye_tiny
    full = _video_prompt(processor, sample_video)
    out, result = dyntok_inputs(model, full)
    vid = model.config.video_token_id
    before, after = int((full["input_ids"] == vid).sum()), int((out["input_ids"] == vid).sum())
    assert after == result.tokens_after == out["video_embeds"].shape[0] < before  # flat backgrounds merge
    assert result.tokens_before == before
    # non-video tokens untouched, in order; every kept position column exists in the full layout, in order
    assert (out["input_ids"] != vid).sum() == (full["input_ids"] != vid).sum()
    full_cols = [tuple(c) for c in full["position_ids"][:, 0].T.tolist()]
    kept_cols = [tuple(c) for c in out["position_ids"][:, 0].T.tolist()]
    it = iter(full_cols)
    assert all(c in it for c in kept_cols)  # a subsequence
    with torch.no_grad():
        logits = model(**out).logits
    assert logits.shape[1] == out["input_ids"].shape[1]
    gen = model.generate(
        **out, max_new_tokens=4, min_new_tokens=4, do_sample=False
    )  # decode steps after prefill
    assert gen.shape[1] == out["input_ids"].shape[1] + 4


def test_compress_none_counts_tokens(keye_tiny, sample_video):
    model, processor = keye_tiny
    full = _video_prompt(processor, sample_video)
    out, n = compress_inputs(model, full, "none")
    assert n == int((full["input_ids"] == model.config.video_token_id).sum()) and "pixel_values_videos" in out


def test_chat_with_dyntok(keye_tiny, sample_video):
    model, processor = keye_tiny
    session = ChatSession(model, processor, compress="dyntok")
    first = session.ask("What is shown?", videos=[str(sample_video)], max_new_tokens=4)
    plain = ChatSession(model, processor).ask("What is shown?", videos=[str(sample_video)], max_new_tokens=4)
    assert first.prompt_tokens < plain.prompt_tokens
    assert session.ask("And then?", max_new_tokens=4).num_tokens > 0
