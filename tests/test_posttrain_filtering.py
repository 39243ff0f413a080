"""Pass-rate filter and RLEP replay buffer."""

from __future__ import annotations

import pytest
import torch

from keye.posttrain.filtering import ReplayBuffer, filter_by_pass_rate, pass_rates


def test_pass_rates_from_tensor_and_ragged_lists():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(pass_rates(rewards), torch.tensor([0.75, 0.0, 1.0]))
    torch.testing.assert_close(pass_rates([[1.0, 0.0], [0.5, 0.9, 1.0]]), torch.tensor([0.5, 1 / 3]))
    torch.testing.assert_close(pass_rates([[0.5, 0.9, 1.0]], success_threshold=0.5), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="prompt 1 has no scored samples"):
        pass_rates([[1.0], []])


def test_filter_keeps_strictly_between_zero_and_one():
    items = ["always-wrong", "half", "always-right", "one-of-eight", "seven-of-eight"]
    rewards = [
        [0.0] * 8,
        [1.0, 0.0] * 4,
        [1.0] * 8,
        [1.0] + [0.0] * 7,
        [1.0] * 7 + [0.0],
    ]
    result = filter_by_pass_rate(items, rewards)
    assert result.kept == ["half", "one-of-eight", "seven-of-eight"]
    assert result.indices == [1, 3, 4]
    assert (result.n_unsolved, result.n_solved) == (1, 1)
    torch.testing.assert_close(result.rates, torch.tensor([0.0, 0.5, 1.0, 0.125, 0.875]))
    narrow = filter_by_pass_rate(items, rewards, low=0.2, high=0.8)
    assert narrow.kept == ["half"]
    with pytest.raises(ValueError, match="5 items but rewards for 2"):
        filter_by_pass_rate(items, rewards[:2])


def test_replay_mixes_earlier_successes_only():
    buf = ReplayBuffer(per_prompt=2, capacity=4, seed=0)
    first = buf.mix("q1", ["a", "b", "c"], [1.0, 0.0, 1.0])
    assert first.rollouts == ["a", "b", "c"] and first.n_replayed == 0  # nothing earlier to replay
    assert buf.stored("q1") == ["a", "c"]
    second = buf.mix("q1", [f"n{i}" for i in range(16)], [0.0] * 16)
    assert len(second.rollouts) == 18 and second.replayed == [False] * 16 + [True, True]
    assert sorted(second.rollouts[16:]) == ["a", "c"] and second.rewards[16:] == [1.0, 1.0]
    assert buf.mix("q2", ["x"], [1.0]).n_replayed == 0  # prompts do not share successes


def test_replay_capacity_keeps_newest_and_draws_without_replacement():
    buf = ReplayBuffer(per_prompt=2, capacity=3, seed=0)
    buf.add("q", ["r1", "r2", "r3", "r4", "bad"], [1, 1, 1, 1, 0.5])
    assert buf.stored("q") == ["r2", "r3", "r4"] and len(buf) == 3
    for _ in range(10):
        drawn = [r for r, _ in buf.sample("q")]
        assert len(drawn) == len(set(drawn)) == 2 and set(drawn) <= {"r2", "r3", "r4"}
    assert buf.sample("unknown") == []
    with pytest.raises(ValueError, match="per_prompt <= capacity"):
        ReplayBuffer(per_prompt=3, capacity=2)


def test_replay_is_deterministic_per_seed_and_independent_of_other_prompts():
    def draws(seed, interleave):
        buf = ReplayBuffer(per_prompt=2, capacity=16, seed=seed)
        buf.add("q", [f"r{i}" for i in range(10)], [1.0] * 10)
        buf.add("other", ["o1", "o2", "o3"], [1.0] * 3)
        out = []
        for _ in range(5):
            if interleave:
                buf.sample("other")
            out.append([r for r, _ in buf.sample("q")])
        return out

    assert draws(0, False) == draws(0, True)  # same seed: same draws, whatever else was sampled between
    assert draws(0, False) != draws(1, False)
    assert len({tuple(d) for d in draws(0, False)}) > 1  # successive draws differ
