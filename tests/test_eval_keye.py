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
    assert a.cache.get_seq_length() == a.prefix_ids.shape[1] and b.cache is None
    assert reuse.sampled_frame_times(a) == fresh.sampled_frame_times(b)
    for prompt in ("What colour is the first shape?\nThe best answer is:", "How many objects are there?"):
        ra = reuse.answer(a, prompt, max_new_tokens=6, think=False)
        rb = fresh.answer(b, prompt, max_new_tokens=6, think=False)
        assert ra.text == rb.text and ra.num_tokens == rb.num_tokens > 0
        assert a.cache.get_seq_length() == a.prefix_ids.shape[1]  # cropped back after each question
