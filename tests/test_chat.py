"""Multi-turn chat: the KV cache carries the video, streaming matches the full reply."""

from __future__ import annotations

from keye.chat import ChatSession


def test_second_question_does_not_reencode_the_video(keye_tiny, sample_video, monkeypatch):
    model, processor = keye_tiny
    calls = []
    original = model.vision.forward
    monkeypatch.setattr(model.vision, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    session = ChatSession(model, processor)
    first = session.ask("What is in the video?", videos=[str(sample_video)], max_new_tokens=6)
    second = session.ask("And what colour is it?", max_new_tokens=6)
    assert len(calls) == 1
    assert first.num_tokens > 0 and second.num_tokens > 0
    assert second.prompt_tokens > first.prompt_tokens + first.num_tokens
    # The cached conversation is token-for-token what a fresh render of it gives.
    full = processor(session.messages[:-1], think=None)
    n = full["input_ids"].shape[1]
    assert session.prefix.ids[0, :n].tolist() == full["input_ids"][0].tolist()
    assert session.prefix.positions[:, 0, :n].tolist() == full["position_ids"][:, 0].tolist()
    # ... and what the cache holds gives the logits a fresh forward of that render gives (not only the same ids)
    import torch

    from keye.processing import VISION_INPUTS

    with torch.no_grad():
        fresh = model(
            input_ids=full["input_ids"],
            position_ids=full["position_ids"],
            **{k: full[k] for k in VISION_INPUTS if k in full},
        ).logits[0, -1]
        session.prefix.cache.crop(
            n - 1 - session.prefix.cache.get_seq_length()
        )  # keep the first n - 1 tokens
        cached = model(
            input_ids=session.prefix.ids[:, n - 1 : n],
            position_ids=session.prefix.positions[:, :, n - 1 : n],
            attention_mask=torch.ones(1, n, dtype=torch.long),
            cache=session.prefix.cache,
        ).logits[0, -1]
    torch.testing.assert_close(cached, fresh, atol=2e-4, rtol=1e-4)


def test_stream_yields_the_reply(keye_tiny):
    model, processor = keye_tiny
    session = ChatSession(model, processor)
    pieces = list(session.stream("Say hello.", max_new_tokens=8))
    assert len(pieces) >= 2
    assert "".join(pieces).strip() == session.last_reply.text
    assert ChatSession(model, processor).ask("Say hello.", max_new_tokens=8).text == session.last_reply.text


def test_the_compression_is_chosen_once(keye_tiny):
    import pytest

    from keye.compression import Clapper

    with pytest.raises(ValueError, match="unknown compression 'zip'"):
        ChatSession(*keye_tiny, compress="zip")  # at creation, not at the first question
    assert isinstance(ChatSession(*keye_tiny, compress="clapper").compress, Clapper)
