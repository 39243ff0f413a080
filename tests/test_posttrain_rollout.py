"""Rollouts: per-token log-probs, and group sampling on the real keye-tiny (text and video prompts)."""

from __future__ import annotations

import pytest
import torch

from keye.posttrain.rollout import mask_after_eos, policy_logprobs, response_logprobs, sample_group


def test_response_logprobs_aligned_with_the_tokens_they_score():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, requires_grad=True)  # (B, T, V)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 0]])
    out = response_logprobs(logits, ids, mask)
    full = torch.log_softmax(logits.detach(), dim=-1)
    expected = torch.zeros(2, 5)
    for b, t in mask.nonzero().tolist():
        expected[b, t] = full[b, t - 1, ids[b, t]]  # token t is predicted by the logits at t - 1
    torch.testing.assert_close(out, expected)
    hot = response_logprobs(logits, ids, mask, temperature=0.5)
    assert hot[0, 2].item() == pytest.approx(
        torch.log_softmax(logits[0, 1].detach() / 0.5, -1)[ids[0, 2]].item()
    )
    out.sum().backward()
    assert logits.grad[1, :2].abs().sum() == 0 and logits.grad[1, 2].abs().sum() > 0  # only scoring positions
    with pytest.raises(ValueError, match="position 0"):
        response_logprobs(logits, ids, torch.ones(2, 5))


def test_mask_after_eos():
    response = torch.tensor([[5, 6, 2, 2], [5, 2, 7, 2], [5, 6, 7, 8]])
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(mask_after_eos(response, [2]), expected)
    torch.testing.assert_close(mask_after_eos(response, [2, 6])[0], torch.tensor([1, 1, 0, 0]))


def _check_rollout(model, rollout, *, also_policy_logprobs: bool, group_size=2, max_new_tokens=4):
    g, r = rollout.response_ids.shape
    assert g == group_size and 1 <= r <= max_new_tokens
    assert rollout.response_mask.shape == rollout.old_logps.shape == (g, r)
    assert len(rollout.texts) == g and all(isinstance(t, str) for t in rollout.texts)
    valid = rollout.response_mask.bool()
    assert valid[:, 0].all()
    assert (rollout.old_logps[valid] < 0).all() and (rollout.old_logps[~valid] == 0).all()
    # Recompute with one full forward pass over prompt + responses, logits at every position.
    inputs = rollout.model_inputs(model.device)
    p = rollout.prompt_length
    assert inputs["input_ids"].shape == (g, p + r) and inputs["position_ids"].shape == (3, g, p + r)
    full_mask = torch.cat([torch.zeros(g, p, dtype=torch.long), rollout.response_mask], dim=1)
    with torch.no_grad():
        logits = model(**inputs).logits  # (G, P+R, V)
    recomputed = response_logprobs(logits, inputs["input_ids"], full_mask, temperature=rollout.temperature)[
        :, p:
    ]
    torch.testing.assert_close(rollout.old_logps, recomputed, atol=1e-4, rtol=0)
    if also_policy_logprobs:  # the recipe's path: logits only for the response positions (one more forward)
        with torch.no_grad():
            torch.testing.assert_close(policy_logprobs(model, rollout), recomputed, atol=1e-4, rtol=0)


def test_sample_group_text_prompt(keye_tiny):
    model, processor = keye_tiny
    torch.manual_seed(0)
    messages = [{"role": "user", "content": "Name a colour."}]
    rollout = sample_group(model, processor, messages, 2, max_new_tokens=4, temperature=0.7)
    _check_rollout(model, rollout, also_policy_logprobs=True)
    assert rollout.temperature == 0.7 and rollout.messages == messages
    assert "pixel_values_videos" not in rollout.model_inputs()


def test_sample_group_video_prompt(keye_tiny, tmp_path):
    from keye.synthetic import make_video_sample

    model, processor = keye_tiny
    sample = make_video_sample(tmp_path, seed=0)
    qa = sample.questions[0]
    messages = [
        {
            "role": "user",
            "content": [{"type": "video", "video": sample.media}, {"type": "text", "text": qa.question}],
        }
    ]
    torch.manual_seed(0)
    rollout = sample_group(model, processor, messages, 2, max_new_tokens=4, temperature=1.0)
    _check_rollout(model, rollout, also_policy_logprobs=True)
    inputs = rollout.model_inputs()
    frames = rollout.prompt["video_grid_thw"].shape[0]
    assert inputs["video_grid_thw"].shape == (2 * frames, 3)  # one copy of the video per sequence, in order
    torch.testing.assert_close(
        inputs["pixel_values_videos"][: len(rollout.prompt["pixel_values_videos"])],
        rollout.prompt["pixel_values_videos"],
    )
    refs = rollout.prompt["video_reference_index"]  # the second copy's frames refer to the second copy
    assert inputs["video_reference_index"].tolist() == refs.tolist() + (refs + frames).tolist()


def test_policy_logprobs_runs_the_prompt_once_with_the_gradients_of_full_sequences(keye_tiny, tmp_path):
    """The prompt (a video) runs once and its KV cache serves both responses: the same log-probs as one forward over
    the two full sequences, and the same gradients in the vision tower and the first layer's key projection from
    the responses' later tokens (which reach the prompt only through its keys and values)."""
    from keye.synthetic import make_video_sample

    model, processor = keye_tiny
    sample = make_video_sample(tmp_path, seed=1)
    content = [
        {"type": "video", "video": sample.media},
        {"type": "text", "text": sample.questions[0].question},
    ]
    torch.manual_seed(1)
    rollout = sample_group(model, processor, [{"role": "user", "content": content}], 2, max_new_tokens=5)
    assert rollout.response_mask[:, 1:].sum() >= 2
    weights = torch.tensor([[1.0], [-2.0]])  # the rows pull opposite ways, as advantages do
    params = [
        model.vision.embeddings.patch_embedding.weight,
        model.language_model.layers[0].self_attn.k_proj.weight,
    ]

    def grads(lp):
        return torch.autograd.grad((lp[:, 1:] * weights).sum(), params, allow_unused=True)

    shared = policy_logprobs(model, rollout)
    ours = grads(shared)
    inputs = rollout.model_inputs()
    p = rollout.prompt_length
    mask = torch.cat([torch.zeros(2, p, dtype=torch.long), rollout.response_mask], dim=1)
    full = response_logprobs(model(**inputs).logits, inputs["input_ids"], mask, temperature=1.0)[:, p:]
    torch.testing.assert_close(shared.detach(), full.detach(), atol=1e-4, rtol=0)
    for a, b in zip(ours, grads(full)):
        assert a is not None and float((a - b).norm() / b.norm()) < 1e-4  # float32 noise (measured ~1e-5)
