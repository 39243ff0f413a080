"""Preference-alignment losses from per-sequence log-probs: DPO (sigmoid) and MPO (preference + quality + generation).

Inputs are, for B preference pairs, the summed log-probs of the chosen and rejected responses under the policy (with
grad) and under the frozen reference model, shape ``(B,)`` each. With ``h_c = log pi(y_c) - log pi_ref(y_c)`` and
``h_r`` likewise:

- `dpo_loss` (Rafailov et al. 2023):  ``-log sigmoid(beta (h_c - h_r))``;
- `bco_quality_loss` (MPO's quality term, BCO pair form):  ``-log sigmoid(beta h_c - delta) - log sigmoid(-(beta h_r -
  delta))``, an absolute judgement of each response rather than a comparison; ``delta`` is the reward shift, a moving
  average of past rewards (`RewardShift`) or 0 (TRL's ``bco_pair``);
- `sft_nll`: the generation term, the negative log-likelihood per chosen token, pooled over the batch (sum of NLL / number
  of chosen tokens, as TRL's ``"sft"`` loss and keye's training core count tokens);
- `mpo_loss` (InternVL's Mixed Preference Optimization):  ``w_pref * dpo + w_quality * bco + w_gen * sft``, defaults
  0.8 / 0.2 / 1.0, the same as TRL's ``loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]``.

Each pair weighs the same (losses are means over pairs). Not for computing the log-probs (sum
`keye.posttrain.rollout.response_logprobs` over each response) or for building preference pairs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "MPOStats",
    "PreferenceStats",
    "RewardShift",
    "bco_quality_loss",
    "dpo_loss",
    "mpo_loss",
    "sft_nll",
]


@dataclass(frozen=True)
class PreferenceStats:
    """Implicit rewards ``beta * h`` of the chosen and rejected responses (means over pairs), their mean margin, and
    the share of pairs where the chosen reward is higher."""

    loss: float
    reward_chosen: float
    reward_rejected: float
    margin: float
    accuracy: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class MPOStats:
    """The three MPO terms (unweighted), the total, and the preference statistics of the DPO term."""

    loss: float
    preference: float
    quality: float
    generation: float
    reward_chosen: float
    reward_rejected: float
    margin: float
    accuracy: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _log_ratios(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"per-sequence log-probs must all be (B,), got shapes {sorted(shapes)}")
    # The reference is frozen: no gradient flows into it even if the caller forgot no_grad.
    return policy_chosen - ref_chosen.detach(), policy_rejected - ref_rejected.detach()  # (B,), (B,)


def _pref_stats(loss: torch.Tensor, h_c: torch.Tensor, h_r: torch.Tensor, beta: float) -> PreferenceStats:
    with torch.no_grad():
        rc, rr = beta * h_c, beta * h_r
        return PreferenceStats(
            loss=float(loss),
            reward_chosen=float(rc.mean()),
            reward_rejected=float(rr.mean()),
            margin=float((rc - rr).mean()),
            accuracy=float((rc > rr).float().mean()),
        )


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> tuple[torch.Tensor, PreferenceStats]:
    """Sigmoid DPO: ``mean_b -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``; inputs ``(B,)`` summed
    log-probs."""
    h_c, h_r = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = -F.logsigmoid(beta * (h_c - h_r)).mean()
    return loss, _pref_stats(loss, h_c, h_r, beta)


def bco_quality_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    delta: float = 0.0,
) -> torch.Tensor:
    """MPO's quality loss: ``mean_b [-log sigmoid(beta h_c - delta) - log sigmoid(-(beta h_r - delta))]``."""
    h_c, h_r = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (-F.logsigmoid(beta * h_c - delta) - F.logsigmoid(-(beta * h_r - delta))).mean()


def sft_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Generation loss: ``-sum_b log pi(y_c,b) / sum_b |y_c,b|``, the NLL per chosen token over the batch."""
    if policy_chosen_logps.shape != chosen_lengths.shape:
        raise ValueError(
            f"chosen log-probs {tuple(policy_chosen_logps.shape)} and lengths {tuple(chosen_lengths.shape)} differ"
        )
    tokens = chosen_lengths.sum()
    if tokens <= 0:
        raise ValueError("the chosen responses have no tokens")
    return -policy_chosen_logps.sum() / tokens.to(policy_chosen_logps.dtype)


def mpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    *,
    beta: float = 0.1,
    w_pref: float = 0.8,
    w_quality: float = 0.2,
    w_gen: float = 1.0,
    delta: float = 0.0,
) -> tuple[torch.Tensor, MPOStats]:
    """MPO: ``w_pref * dpo_loss + w_quality * bco_quality_loss + w_gen * sft_nll``. ``chosen_lengths`` ``(B,)``: the
    chosen responses' token counts; ``delta``: the quality term's reward shift (`RewardShift.value`)."""
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    pref, stats = dpo_loss(*logps, beta=beta)
    quality = bco_quality_loss(*logps, beta=beta, delta=delta)
    generation = sft_nll(policy_chosen_logps, chosen_lengths)
    loss = w_pref * pref + w_quality * quality + w_gen * generation
    return loss, MPOStats(
        loss=float(loss.detach()),
        preference=float(pref.detach()),
        quality=float(quality.detach()),
        generation=float(generation.detach()),
        reward_chosen=stats.reward_chosen,
        reward_rejected=stats.reward_rejected,
        margin=stats.margin,
        accuracy=stats.accuracy,
    )


class RewardShift:
    """MPO's ``delta``: an exponential moving average of the mean implicit reward ``beta * h`` over chosen and
    rejected responses. Call `update` once per optimizer step, after the loss, with that step's log-probs; the
    recipe saves `value` in its checkpoints."""

    def __init__(self, momentum: float = 0.99, value: float = 0.0):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.value = value

    def update(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor,
        ref_rejected_logps: torch.Tensor,
        *,
        beta: float = 0.1,
    ) -> float:
        """Fold this batch's mean reward into the average; returns the new ``delta``."""
        with torch.no_grad():
            h_c, h_r = _log_ratios(
                policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
            )
            batch = float(beta * torch.cat([h_c, h_r]).mean())
        self.value = self.momentum * self.value + (1.0 - self.momentum) * batch
        return self.value
