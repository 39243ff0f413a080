"""Continuous batching (`keye.batching`) against transformers' own ``generate``: the same tokens for each sequence
whether it decodes alone or joins and leaves a running batch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from keye.batching import BatchDecoder, Sequence, prefill
from keye.prefix import CachedPrefix
from keye.processing import VISION_INPUTS


@pytest.fixture(scope="module")
def prompts(keye_tiny, sample_video):
    model, processor = keye_tiny
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (84, 112, 3), dtype=np.uint8))
    conversations = [
        [
            {"type": "video", "video": str(sample_video)},
            {"type": "text", "text": "What colour is the shape?"},
        ],
        [{"type": "image", "image": image}, {"type": "text", "text": "Describe the picture."}],
        "Name three colours.",
    ]
    return [processor([{"role": "user", "content": c}]) for c in conversations]


def _start(model, inputs, **settings) -> Sequence:
    kwargs = CachedPrefix.empty(model).continue_with(
        inputs["input_ids"], inputs["position_ids"], model.device
    )
    vision = {k: inputs[k] for k in VISION_INPUTS if k in inputs}
    return Sequence(**prefill(model, kwargs, **vision), **settings)


def _generate_alone(model, inputs, n: int) -> list[int]:
    """transformers' greedy decoding, never stopping early (its end token one the model cannot write)."""
    kwargs = CachedPrefix.empty(model).continue_with(
        inputs["input_ids"], inputs["position_ids"], model.device
    )
    vision = {k: inputs[k] for k in VISION_INPUTS if k in inputs}
    out = model.generate(
        **kwargs, **vision, max_new_tokens=n, do_sample=False, eos_token_id=model.config.video_token_id
    )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_batched_greedy_decoding_equals_generate_alone(keye_tiny, prompts):
    model, processor = keye_tiny
    lengths = [24, 17, 10]
    expected = [_generate_alone(model, p, n) for p, n in zip(prompts, lengths, strict=True)]
    decoder = BatchDecoder(model, processor.tokenizer)
    rows = []
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        rows.append(_start(model, p, max_new_tokens=n, ignore_eos=True))
        decoder.add(rows[-1])  # joins a batch already decoding (different cache lengths: left padding)
        for _ in range(2 * i + 1):
            decoder.step()
    while decoder:
        decoder.step()  # rows leave at different steps
    for row, want in zip(rows, expected, strict=True):
        assert row.tokens == want and row.finish_reason == "length"
        assert row.text == processor.tokenizer.decode(want, skip_special_tokens=True)


def test_stop_strings_cancel_and_seeded_sampling(keye_tiny, prompts):
    model, processor = keye_tiny
    reference = processor.tokenizer.decode(_generate_alone(model, prompts[0], 12), skip_special_tokens=True)
    stop = reference[3:6]
    decoder = BatchDecoder(model, processor.tokenizer)
    pieces: list[str] = []
    stopped = _start(
        model, prompts[0], max_new_tokens=12, ignore_eos=True, stop=[stop], on_text=pieces.append
    )
    cancelled = _start(model, prompts[2], max_new_tokens=50, ignore_eos=True)
    sampled = _start(model, prompts[1], max_new_tokens=8, ignore_eos=True, temperature=1.0, seed=7)
    for row in (stopped, cancelled, sampled):
        decoder.add(row)
    decoder.step()
    cancelled.cancelled = True
    while decoder:
        decoder.step()
    assert stopped.finish_reason == "stop" and stopped.text == reference[: reference.find(stop)]
    assert "".join(pieces) == stopped.text  # streamed pieces never showed part of the stop string
    assert cancelled.finish_reason == "cancelled" and len(cancelled.tokens) == 1
    alone = _start(model, prompts[1], max_new_tokens=8, ignore_eos=True, temperature=1.0, seed=7)
    decoder.add(alone)
    while decoder:
        decoder.step()
    assert alone.tokens == sampled.tokens  # the seed decides, not the batch's other rows
    other = _start(model, prompts[1], max_new_tokens=8, ignore_eos=True, temperature=1.0, seed=8)
    decoder.add(other)
    while decoder:
        decoder.step()
    assert other.tokens != sampled.tokens


def test_pooled_conversations_equal_chat_sessions_alone(keye_tiny):
    """Three multi-turn conversations (an image, text) decoded together by a `ConversationPool` give, turn
    for turn, the tokens `ChatSession` (transformers' generate) gives each alone: every turn after the first
    continues from the KV cache the batch handed back, left padding removed."""
    from keye.chat import ChatSession, ConversationPool

    model, processor = keye_tiny
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (84, 112, 3), dtype=np.uint8))
    scripts = [
        [[{"type": "image", "image": image}, {"type": "text", "text": "Describe the picture."}],
         "Is it bright?", "Name one colour in it."],
        ["Name three colours.", "And three animals?", "Which is the largest?"],
        ["Count from one to five.", "Now backwards.", "Thanks!"],
    ]  # fmt: skip
    lengths = [6, 16, 10]  # the turns end at different steps: rows leave and join a running batch

    def talk(session, script, n):
        return [session.send(t if isinstance(t, list) else [{"type": "text", "text": t}], max_new_tokens=n).text
                for t in script]  # fmt: skip

    alone = []
    for script, n in zip(scripts, lengths):
        session = ChatSession(model, processor)
        talk(session, script, n)
        alone.append(session.prefix.ids[0].tolist())
    pool = ConversationPool(model, processor, max_batch=3)
    sessions = [pool.session() for _ in scripts]
    pool.run([lambda s=s, c=c, n=n: talk(s, c, n) for s, c, n in zip(sessions, scripts, lengths)])
    assert [s.prefix.ids[0].tolist() for s in sessions] == alone
    for s in (
        sessions
    ):  # each holds its own KV, not a view pinning a whole batch's cache (64 rows ran out of memory)
        keys = s.prefix.cache.layers[0].keys
        assert keys.untyped_storage().nbytes() == keys.numel() * keys.element_size()
    assert len({len(ids) for ids in alone}) == 3
