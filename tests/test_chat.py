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
    assert session.ids[0, :n].tolist() == full["input_ids"][0].tolist()
    assert session.positions[:, 0, :n].tolist() == full["position_ids"][:, 0].tolist()


def test_stream_yields_the_reply(keye_tiny):
    model, processor = keye_tiny
    session = ChatSession(model, processor)
    pieces = list(session.stream("Say hello.", max_new_tokens=8))
    assert len(pieces) >= 2
    assert "".join(pieces).strip() == session.last_reply.text
    assert ChatSession(model, processor).ask("Say hello.", max_new_tokens=8).text == session.last_reply.text
