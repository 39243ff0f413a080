"""KeyePredictor: reusing the video prefix's KV cache gives the same answers as encoding per question."""

from __future__ import annotations

import pytest

from keye.eval.keye_predictor import KeyePredictor


@pytest.mark.slow
def test_cache_reuse_matches_fresh_encoding(keye_tiny, sample_video):
    reuse = KeyePredictor(*keye_tiny, name="keye-tiny", reuse_cache=True)
    fresh = KeyePredictor(*keye_tiny, name="keye-tiny", reuse_cache=False)
    enc = dict(
        fps=None, max_frames=None, token_budget=None, compress="none", subtitles=None
    )  # model defaults
    a, b = reuse.prepare_video(str(sample_video), **enc), fresh.prepare_video(str(sample_video), **enc)
    assert a.prefix.cache.get_seq_length() == a.prefix.ids.shape[1] and b.prefix.cache is None
    assert reuse.sampled_frame_times(a) == fresh.sampled_frame_times(b)
    for prompt in ("What colour is the first shape?\nThe best answer is:", "How many objects are there?"):
        ra = reuse.answer(a, prompt, max_new_tokens=6, think=False)
        rb = fresh.answer(b, prompt, max_new_tokens=6, think=False)
        assert ra.text == rb.text and ra.num_tokens == rb.num_tokens > 0
        assert a.prefix.cache.get_seq_length() == a.prefix.ids.shape[1]  # cropped back after each question
    # the reused prefix is the prefix's own KV state: its last token's logits equal a fresh forward's
    import torch

    model, n = keye_tiny[0], a.prefix.ids.shape[1]
    with torch.inference_mode():
        full = model(input_ids=b.prefix.ids, position_ids=b.prefix.positions, video_embeds=b.video_embeds)
        a.prefix.cache.crop(-1)  # the prefix without its last token
        cached = model(
            input_ids=a.prefix.ids[:, n - 1 :],
            position_ids=a.prefix.positions[:, :, n - 1 :],
            attention_mask=torch.ones(1, n, dtype=torch.long),
            cache=a.prefix.cache,
        )
    full, cached = full.logits[0, -1], cached.logits[0, -1]
    torch.testing.assert_close(cached, full, atol=2e-4, rtol=1e-4)
