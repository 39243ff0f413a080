"""RL data selection: keep prompts the policy sometimes solves, and replay earlier successes (RLEP).

*Pass-rate filter.* A prompt whose G responses all succeed, or all fail, has zero group-normalised advantages and adds
nothing but cost to a GSPO step. Keye-VL-1.5 keeps RL prompts whose measured pass rate (share of successful responses
over a few samples from the current model) lies strictly between 0 and 1: `pass_rates` measures it from rewards, and
`filter_by_pass_rate` keeps the prompts in ``(low, high)``.

*Replay (RLEP).* `ReplayBuffer` keeps up to ``capacity`` successful rollouts per prompt from earlier steps and mixes up
to ``per_prompt`` of them (2 in RLEP) into a new group (of e.g. 16), so a prompt the policy has solved before keeps a
positive example while it explores. Draws are seeded per ``(seed, prompt, draw number)``, so they do not depend on the
order in which other prompts are visited. A replayed rollout was sampled by an older policy: its sampling-time
log-probs are stale, so the recipe recomputes its "old" log-probs with the current policy before the update (GSPO's
clip range of 4e-4 would otherwise clip it away), and computes advantages over the mixed group.

A rollout succeeds when its reward is >= ``success_threshold`` (1.0, fully correct, by default; with 0/1 rewards any
threshold in (0, 1] is the same). Not for sampling or scoring; a rollout here is any object the recipe uses.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

__all__ = ["FilterResult", "ReplayBuffer", "ReplayMix", "filter_by_pass_rate", "pass_rates"]

T = TypeVar("T")


def pass_rates(
    rewards: torch.Tensor | Sequence[Sequence[float]], success_threshold: float = 1.0
) -> torch.Tensor:
    """Share of successful responses per prompt: rewards ``(P, G)`` (or P lists of any length) -> ``(P,)``."""
    if isinstance(rewards, torch.Tensor):
        if rewards.ndim != 2:
            raise ValueError(f"rewards must be (prompts, samples), got shape {tuple(rewards.shape)}")
        return (rewards >= success_threshold).float().mean(dim=1)  # (P,)
    rates = []
    for i, group in enumerate(rewards):
        if len(group) == 0:
            raise ValueError(f"prompt {i} has no scored samples: its pass rate is undefined")
        rates.append(sum(float(r) >= success_threshold for r in group) / len(group))
    return torch.tensor(rates, dtype=torch.float32)  # (P,)


@dataclass
class FilterResult(Generic[T]):
    """``kept``: the items whose pass rate is in ``(low, high)``, in input order; ``indices``: their positions;
    ``rates``: every item's pass rate ``(P,)``; ``n_unsolved`` / ``n_solved``: dropped at <= low / >= high."""

    kept: list[T]
    indices: list[int]
    rates: torch.Tensor
    n_unsolved: int
    n_solved: int


def filter_by_pass_rate(
    items: Sequence[T],
    rewards: torch.Tensor | Sequence[Sequence[float]],
    *,
    success_threshold: float = 1.0,
    low: float = 0.0,
    high: float = 1.0,
) -> FilterResult[T]:
    """Keep the items whose measured pass rate is strictly between ``low`` and ``high`` (0 and 1: neither always
    failed nor always solved). ``rewards[i]`` are the rewards of the samples drawn for ``items[i]``."""
    rates = pass_rates(rewards, success_threshold)  # (P,)
    if len(items) != len(rates):
        raise ValueError(f"{len(items)} items but rewards for {len(rates)} prompts")
    keep = (rates > low) & (rates < high)  # (P,)
    indices = torch.nonzero(keep).flatten().tolist()
    return FilterResult(
        kept=[items[i] for i in indices],
        indices=indices,
        rates=rates,
        n_unsolved=int((rates <= low).sum()),
        n_solved=int((rates >= high).sum()),
    )


@dataclass
class ReplayMix(Generic[T]):
    """A group to train on: the new rollouts first, then the replayed ones. ``replayed[i]`` marks replayed rollouts
    (whose old log-probs must be recomputed with the current policy)."""

    rollouts: list[T]
    rewards: list[float]
    replayed: list[bool]

    @property
    def n_replayed(self) -> int:
        return sum(self.replayed)


class ReplayBuffer(Generic[T]):
    """Per-prompt store of successful rollouts for RLEP-style replay.

    ``capacity``: successes kept per prompt (the newest); ``per_prompt``: how many `mix` adds to a new group;
    ``seed``: makes every draw reproducible.
    """

    def __init__(
        self, per_prompt: int = 2, capacity: int = 16, *, success_threshold: float = 1.0, seed: int = 0
    ):
        if per_prompt < 0 or capacity < per_prompt:
            raise ValueError(
                f"need 0 <= per_prompt <= capacity, got per_prompt={per_prompt}, capacity={capacity}"
            )
        self.per_prompt = per_prompt
        self.capacity = capacity
        self.success_threshold = success_threshold
        self.seed = seed
        self._store: dict[Hashable, deque[tuple[T, float]]] = {}
        self._draws: dict[Hashable, int] = {}

    def __len__(self) -> int:
        """Number of stored rollouts over all prompts."""
        return sum(len(d) for d in self._store.values())

    def stored(self, prompt_id: Hashable) -> list[T]:
        """The successes stored for a prompt, oldest first."""
        return [r for r, _ in self._store.get(prompt_id, ())]

    def add(self, prompt_id: Hashable, rollouts: Sequence[T], rewards: Sequence[float]) -> int:
        """Store the successful ``rollouts`` of a prompt (keeping the newest ``capacity``); returns how many were new
        successes."""
        if len(rollouts) != len(rewards):
            raise ValueError(f"{len(rollouts)} rollouts but {len(rewards)} rewards for prompt {prompt_id!r}")
        store = self._store.setdefault(prompt_id, deque(maxlen=self.capacity))
        wins = [(r, float(w)) for r, w in zip(rollouts, rewards) if float(w) >= self.success_threshold]
        store.extend(wins)
        return len(wins)

    def sample(self, prompt_id: Hashable, k: int | None = None) -> list[tuple[T, float]]:
        """Up to ``k`` (default ``per_prompt``) distinct stored successes of a prompt with their rewards, drawn
        without replacement; the n-th draw for a prompt depends only on ``(seed, prompt_id, n)``."""
        k = self.per_prompt if k is None else k
        pool = list(self._store.get(prompt_id, ()))
        if not pool or k <= 0:
            return []
        n = self._draws.get(prompt_id, 0)
        self._draws[prompt_id] = n + 1
        # A str seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
        rng = random.Random(f"{self.seed}:{prompt_id!r}:{n}")
        return rng.sample(pool, min(k, len(pool)))

    def mix(self, prompt_id: Hashable, rollouts: Sequence[T], rewards: Sequence[float]) -> ReplayMix[T]:
        """New rollouts plus up to ``per_prompt`` successes from *earlier* calls; then the new successes are stored.

        Replay is drawn before storing, so a group never replays its own rollouts.
        """
        if len(rollouts) != len(rewards):
            raise ValueError(f"{len(rollouts)} rollouts but {len(rewards)} rewards for prompt {prompt_id!r}")
        old = self.sample(prompt_id)
        self.add(prompt_id, rollouts, rewards)
        return ReplayMix(
            rollouts=[*rollouts, *(r for r, _ in old)],
            rewards=[*(float(w) for w in rewards), *(w for _, w in old)],
            replayed=[False] * len(rollouts) + [True] * len(old),
        )
