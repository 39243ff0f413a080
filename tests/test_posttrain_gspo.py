"""GSPO / GRPO losses and group advantages: hand-worked values, the length-1 equivalence, the token variant."""

from __future__ import annotations

import math

import pytest
import torch

from keye.posttrain.gspo import (
    group_advantages,
    grpo_token_loss,
    gspo_loss,
    kl_k3,
    sequence_log_ratio,
)

D = torch.float64


def hand_example():
    """Three responses of lengths 2, 3, 1 (T = 3), eps_low 3e-4, eps_high 4e-4.

    response  new - old per token        log s    s = exp(log s)   A     branch of min(sA, clip(s)A)   term
    1         [1e-4, 3e-4, (pad)]        2e-4     1.000200020001   +1.0  inside [0.9997, 1.0004]: sA    1.000200020001
    2         [1e-3, 0, 2e-3]            1e-3     1.001000500167   +0.5  > 1.0004, A > 0: clipped       0.5 * 1.0004 = 0.5002
    3         [-2e-3, (pad), (pad)]      -2e-3    0.998001998667   -1.5  < 0.9997, A < 0: clipped       -1.5 * 0.9997 = -1.49955

    loss = -(1.000200020001 + 0.5002 - 1.49955) / 3 = -0.000283340000444
    Only response 1 has a gradient: d loss / d new[0, t] = -(1/3) * A * s / |y| = -(1/6) * 1.00020002 = -0.166700003
    for its two tokens, 0 everywhere else.
    """
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.9], [-1.2, -1.4, -1.6]], dtype=D)
    diff = torch.tensor([[1e-4, 3e-4, 9.0], [1e-3, 0.0, 2e-3], [-2e-3, 5.0, -7.0]], dtype=D)  # pads hold junk
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, 0.5, -1.5], dtype=D)
    new = (old + diff).requires_grad_(True)
    return new, old, adv, mask


def test_sequence_log_ratio_is_mean_over_response_tokens():
    new, old, _, mask = hand_example()
    torch.testing.assert_close(sequence_log_ratio(new, old, mask), torch.tensor([2e-4, 1e-3, -2e-3], dtype=D))


def test_gspo_loss_hand_worked_value_gradient_and_clip_stats():
    new, old, adv, mask = hand_example()
    loss, stats = gspo_loss(new, old, adv, mask)
    assert math.isclose(loss.item(), -(1.000200020001333 + 0.5002 - 1.49955) / 3, rel_tol=0, abs_tol=1e-12)
    assert math.isclose(loss.item(), -0.000283340000444, abs_tol=1e-12)
    loss.backward()
    expected = torch.zeros(3, 3, dtype=D)
    expected[0, :2] = -(1 / 6) * 1.000200020001333
    torch.testing.assert_close(new.grad, expected)
    assert stats.clip_high == pytest.approx(1 / 3) and stats.clip_low == pytest.approx(1 / 3)
    assert stats.clip == pytest.approx(2 / 3)
    assert stats.ratio_max == pytest.approx(1.0010005001667) and stats.ratio_min == pytest.approx(
        0.998001998667
    )
    assert stats.kl == 0.0 and stats.policy_loss == pytest.approx(loss.item())


def test_clipping_counts_only_the_side_the_advantage_pushes():
    # s above the range with A < 0, or below it with A > 0, keeps the unclipped branch (and its gradient).
    old = torch.zeros(4, 1, dtype=D)
    new = torch.tensor([[0.01], [0.01], [-0.01], [-0.01]], dtype=D, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=D)
    loss, stats = gspo_loss(new, old, adv, torch.ones(4, 1))
    assert (stats.clip_high, stats.clip_low) == (0.25, 0.25)
    loss.backward()
    assert new.grad[0].item() == 0.0 and new.grad[3].item() == 0.0  # clipped: no gradient
    assert new.grad[1].item() != 0.0 and new.grad[2].item() != 0.0


def test_gspo_equals_token_grpo_when_every_response_has_one_token():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(6, 1, generator=g, dtype=D)
    new = old + 1e-3 * torch.randn(6, 1, generator=g, dtype=D)  # some inside, some outside the clip range
    adv = torch.randn(6, generator=g, dtype=D)
    a, _ = gspo_loss(new, old, adv, torch.ones(6, 1))
    b, _ = grpo_token_loss(new, old, adv, torch.ones(6, 1), eps_low=3e-4, eps_high=4e-4)
    torch.testing.assert_close(a, b)
    # Length 1 inside padded rows, at different positions.
    mask = torch.zeros(6, 4, dtype=torch.long)
    mask[torch.arange(6), torch.tensor([0, 1, 2, 3, 0, 2])] = 1
    old4 = -torch.rand(6, 4, generator=g, dtype=D)
    new4 = old4 + 1e-3 * torch.randn(6, 4, generator=g, dtype=D)
    a, sa = gspo_loss(new4, old4, adv, mask)
    b, sb = grpo_token_loss(new4, old4, adv, mask, eps_low=3e-4, eps_high=4e-4)
    torch.testing.assert_close(a, b)
    assert (sa.clip_low, sa.clip_high) == (sb.clip_low, sb.clip_high)


def test_gspo_differs_from_token_grpo_on_longer_responses():
    old = torch.zeros(1, 2, dtype=D)
    new = torch.tensor([[0.5, -0.5]], dtype=D)  # token ratios e^0.5, e^-0.5; sequence ratio exactly 1
    adv = torch.tensor([1.0], dtype=D)
    gspo, _ = gspo_loss(new, old, adv, torch.ones(1, 2))
    grpo, _ = grpo_token_loss(new, old, adv, torch.ones(1, 2))
    assert gspo.item() == pytest.approx(-1.0)
    assert grpo.item() == pytest.approx(-(1.2 + math.exp(-0.5)) / 2)  # e^0.5 clipped to 1.2


def _grads(variant, adv, new0, old, mask):
    new = new0.clone().requires_grad_(True)
    loss, _ = gspo_loss(new, old, adv, mask, variant=variant)
    loss.backward()
    return loss.detach(), new.grad


def test_token_variant_same_value_and_gradient_as_sequence_with_one_advantage_per_response():
    # GSPO paper eqs. (11) and (18): identical when all tokens of a response share its advantage.
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(4, 5, generator=g, dtype=D)
    new0 = old + 2e-4 * torch.randn(4, 5, generator=g, dtype=D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    adv = torch.tensor([0.7, -1.2, 0.3, -0.1], dtype=D)
    seq = _grads("sequence", adv, new0, old, mask)
    tok = _grads("token", adv, new0, old, mask)
    torch.testing.assert_close(seq[0], tok[0])
    torch.testing.assert_close(seq[1], tok[1])


def test_token_variant_same_value_different_gradients_with_token_advantages():
    # Inside the clip range both equal -mean_i s_i * mean_t A_i,t; the token variant weights token t by its own A_i,t.
    old = torch.zeros(1, 3, dtype=D)
    new0 = torch.tensor([[1e-4, -1e-4, 0.0]], dtype=D)  # s = 1: inside the range
    mask = torch.ones(1, 3)
    tok_adv = torch.tensor([[2.0, -1.0, 2.0]], dtype=D)  # mean 1.0
    seq_loss, seq_grad = _grads("sequence", tok_adv.mean(1), new0, old, mask)
    tok_loss, tok_grad = _grads("token", tok_adv, new0, old, mask)
    torch.testing.assert_close(seq_loss, tok_loss)
    assert seq_loss.item() == pytest.approx(-1.0)
    torch.testing.assert_close(seq_grad, torch.full((1, 3), -1 / 3, dtype=D))  # -s * A / |y|
    torch.testing.assert_close(tok_grad, -tok_adv / 3)
    with pytest.raises(ValueError, match="variant='token'"):
        gspo_loss(new0, old, tok_adv, mask)


def test_kl_term_is_k3_masked_mean_and_off_by_default():
    new, old, adv, mask = hand_example()
    ref = new.detach() + 0.1  # ref - new = 0.1 on every token: k3 = e^0.1 - 0.1 - 1 = 0.005170918075647624
    assert kl_k3(new.detach(), ref)[0, 0].item() == pytest.approx(0.005170918075647624, abs=1e-15)
    base, _ = gspo_loss(new, old, adv, mask)
    with_kl, stats = gspo_loss(new, old, adv, mask, kl_coef=0.5, ref_logps=ref)
    assert (with_kl - base).item() == pytest.approx(0.5 * 0.005170918075647624, abs=1e-12)
    assert stats.kl == pytest.approx(0.005170918075647624)
    assert stats.policy_loss == pytest.approx(base.item())
    with pytest.raises(ValueError, match="ref_logps"):
        gspo_loss(new, old, adv, mask, kl_coef=0.1)


def test_empty_response_is_an_error():
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        gspo_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2), torch.tensor([[1, 0], [0, 0]]))


def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor(
        [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.3, 0.3, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0]]
    )
    adv = group_advantages(rewards, eps=0.0)
    # Group 1: mean 0.5, population std 0.5 -> +-1. Group 2: mean 0.75, std sqrt(3)/4 -> 1/sqrt(3), -sqrt(3).
    torch.testing.assert_close(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    r3 = 1 / math.sqrt(3)
    torch.testing.assert_close(adv[1], torch.tensor([r3, r3, r3, -math.sqrt(3)]))
    assert adv[2:].eq(0).all()  # zero-variance groups: exactly zero
    torch.testing.assert_close(adv.mean(1), torch.zeros(4), atol=1e-6, rtol=0)
    # Each group stands alone: scaling or shifting another group's rewards changes nothing here.
    other = rewards.clone()
    other[1] = other[1] * 10 + 3
    torch.testing.assert_close(group_advantages(other, eps=0.0)[0], adv[0])


def test_group_advantages_unbiased_matches_trl_convention():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    adv = group_advantages(rewards, eps=1e-4, unbiased=True)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased: sqrt(1/3)
    torch.testing.assert_close(adv, (rewards - 0.5) / (std + 1e-4))
    with pytest.raises(ValueError, match="prompts, group"):
        group_advantages(torch.ones(4))
