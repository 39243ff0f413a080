"""DPO and MPO against their formulas on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from keye.posttrain.preference import RewardShift, bco_quality_loss, dpo_loss, mpo_loss, sft_nll

D = torch.float64


def pairs():
    """Two pairs, beta = 0.1.

    pair  pi_c   pi_r   ref_c  ref_r   h_c = pi_c - ref_c   h_r = pi_r - ref_r   beta (h_c - h_r)
    1     -10    -12    -11    -11     +1                   -1                   +0.2
    2     -5     -4     -5     -5      0                    +1                   -0.1

    DPO  = mean(-log sigmoid(0.2), -log sigmoid(-0.1)) = mean(0.598138869382, 0.744396660074) = 0.671267764728
    BCO  = mean(-log s(0.1) - log s(0.1), -log s(0) - log s(-0.1))
         = mean(1.288793320147, 0.693147180560 + 0.744396660074) = 1.363168580390
    SFT  = -(-10 - 5) / (5 + 2 chosen tokens) = 15 / 7 = 2.142857142857
    MPO  = 0.8 * DPO + 0.2 * BCO + 1.0 * SFT = 2.952505070717
    """
    pc = torch.tensor([-10.0, -5.0], dtype=D, requires_grad=True)
    pr = torch.tensor([-12.0, -4.0], dtype=D, requires_grad=True)
    rc = torch.tensor([-11.0, -5.0], dtype=D)
    rr = torch.tensor([-11.0, -5.0], dtype=D)
    return pc, pr, rc, rr, torch.tensor([5, 2])


def test_dpo_hand_worked():
    pc, pr, rc, rr, _ = pairs()
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(0.671267764728, abs=1e-12)
    assert loss.item() == pytest.approx(
        (math.log1p(math.exp(-0.2)) + math.log1p(math.exp(0.1))) / 2, abs=1e-15
    )
    assert stats.reward_chosen == pytest.approx(0.05) and stats.reward_rejected == pytest.approx(0.0)
    assert stats.margin == pytest.approx(0.05) and stats.accuracy == 0.5
    loss.backward()
    # d/d pi_c of -log s(beta z) = -beta (1 - s(beta z)) / B
    sig = torch.sigmoid(torch.tensor([0.2, -0.1], dtype=D))
    torch.testing.assert_close(pc.grad, -0.1 * (1 - sig) / 2)
    torch.testing.assert_close(pr.grad, 0.1 * (1 - sig) / 2)


def test_bco_quality_hand_worked_and_reward_shift():
    pc, pr, rc, rr, _ = pairs()
    assert bco_quality_loss(pc, pr, rc, rr, beta=0.1).item() == pytest.approx(1.363168580390, abs=1e-12)
    # delta = 0.05: mean(-log s(0.05) - log s(0.15), -log s(-0.05) - log s(-0.05))
    ls = lambda x: -math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    expected = (ls(0.05) + ls(0.15) + 2 * ls(-0.05)) / 2
    assert bco_quality_loss(pc, pr, rc, rr, beta=0.1, delta=0.05).item() == pytest.approx(expected, abs=1e-12)
    shift = RewardShift(momentum=0.9)
    # Batch mean of beta * [h_c, h_r] = 0.1 * mean(1, 0, -1, 1) = 0.025 -> 0.9 * 0 + 0.1 * 0.025
    assert shift.update(pc, pr, rc, rr, beta=0.1) == pytest.approx(0.0025)
    assert shift.update(pc, pr, rc, rr, beta=0.1) == pytest.approx(0.9 * 0.0025 + 0.0025)


def test_sft_nll_per_chosen_token():
    pc, *_, lengths = pairs()
    assert sft_nll(pc, lengths).item() == pytest.approx(15 / 7)
    with pytest.raises(ValueError, match="no tokens"):
        sft_nll(pc, torch.tensor([0, 0]))


def test_mpo_is_the_weighted_sum():
    pc, pr, rc, rr, lengths = pairs()
    loss, stats = mpo_loss(pc, pr, rc, rr, lengths, beta=0.1)
    assert loss.item() == pytest.approx(0.8 * 0.671267764728 + 0.2 * 1.363168580390 + 15 / 7, abs=1e-11)
    assert loss.item() == pytest.approx(2.952505070717, abs=1e-11)
    assert (stats.preference, stats.quality, stats.generation) == pytest.approx(
        (0.671267764728, 1.36316858039, 15 / 7)
    )
    only_pref, _ = mpo_loss(pc, pr, rc, rr, lengths, w_pref=1.0, w_quality=0.0, w_gen=0.0)
    torch.testing.assert_close(only_pref, dpo_loss(pc, pr, rc, rr)[0])
    loss.backward()
    assert pc.grad is not None and torch.isfinite(pc.grad).all()


def test_reference_gets_no_gradient_and_shapes_are_checked():
    pc, pr, rc, rr, _ = pairs()
    rc = rc.clone().requires_grad_(True)
    dpo_loss(pc, pr, rc, rr)[0].backward()
    assert rc.grad is None
    with pytest.raises(ValueError, match="must all be \\(B,\\)"):
        dpo_loss(pc, pr, rc[:1], rr)
