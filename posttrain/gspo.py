"""GSPO policy-gradient losses (2507.18071) and group-normalised advantages, as pure tensor functions.

For one prompt the sampler draws a group of G responses from the old policy pi_old; each gets a scalar reward, and
`group_advantages` turns the rewards into advantages by normalising within the group. GSPO then weights every response
by its *sequence* importance ratio, the geometric mean of its token ratios,

    s_i = (pi(y_i | x) / pi_old(y_i | x)) ^ (1 / |y_i|) = exp(mean_t [log pi(y_i,t) - log pi_old(y_i,t)])

and minimises  -mean_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)  (`gspo_loss`, ``variant="sequence"``).
Clipping a whole response at once is why GSPO's clip range is so narrow (3e-4 / 4e-4 by default, against GRPO's 0.2):
s_i is a per-token geometric mean, so it moves about |y| times less than a token ratio.

``variant="token"`` is GSPO-token: s_i,t = sg[s_i] * pi(y_i,t) / sg[pi(y_i,t)], whose value is s_i at every token but
whose gradient flows through each token's own log-prob; the loss is the per-response mean over tokens of the clipped
term. With one advantage per response (the usual case) it equals GSPO in value, clipping *and* gradient (the paper's
eqs. 11 and 18); it differs only when the advantages vary within a response, shape ``(B, T)``, which only the token
variant accepts. `grpo_token_loss` is the standard token-level GRPO loss for comparison: one ratio and one clip
decision per token, averaged over each response's tokens and then over responses (TRL's ``loss_type="grpo"``).

Every loss returns ``(loss, stats)``; the loss is a mean over responses (each response weighs the same whatever its
length), so a trainer that accumulates micro-batches divides by their number. Inputs are per-token log-probs already
aligned with the response tokens (`keye.posttrain.rollout.response_logprobs`) and a response mask; padding positions
may hold anything.

Not for sampling, rewards or the optimiser step: see `keye.posttrain.rollout`, `keye.posttrain.rewards` and the
``keye rl`` recipe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

__all__ = [
    "PolicyLossStats",
    "group_advantages",
    "grpo_token_loss",
    "gspo_loss",
    "kl_k3",
    "sequence_log_ratio",
]


@dataclass(frozen=True)
class PolicyLossStats:
    """What a policy loss reports for logging (plain floats, no graph).

    ``ratio_*`` describe the importance ratios the loss clipped: one per response for GSPO (s_i), one per response token
    for GSPO-token (s_i repeated over the response's tokens) and GRPO. ``clip_low`` / ``clip_high`` are the shares of those ratios whose objective took the clipped branch: the
    ratio left the trust region on the side that the advantage pushes it towards (below 1 - eps_low with A < 0, above
    1 + eps_high with A > 0); such a response (or token) gets no gradient. ``clip = clip_low + clip_high``.
    ``kl`` is the mean k3 estimate of KL(pi || pi_ref) over response tokens, 0 when the KL term is off.
    """

    policy_loss: float
    kl: float
    ratio_mean: float
    ratio_min: float
    ratio_max: float
    clip_low: float
    clip_high: float
    clip: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6, *, unbiased: bool = False) -> torch.Tensor:
    """Rewards ``(P, G)`` (G responses to each of P prompts) -> advantages ``(P, G)``: ``(r - mean) / (std + eps)``.

    The std is the population std of the group (divide by G) unless ``unbiased``: the G responses are the whole group
    being compared, not a sample of it, and with it a group's advantages have unit root-mean-square whatever G is (two
    responses scored 0 and 1 get -1 and +1). TRL (``scale_rewards="group"``) uses the unbiased std with eps 1e-4;
    ``unbiased=True, eps=1e-4`` reproduces it. A group whose rewards are all equal carries no learning signal and gets
    exactly zero advantages (not rounding noise divided by eps).
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (prompts, group), got shape {tuple(rewards.shape)}")
    r = rewards.float() if not rewards.is_floating_point() else rewards
    mean = r.mean(dim=1, keepdim=True)  # (P, 1)
    std = (
        r.std(dim=1, keepdim=True, unbiased=unbiased) if r.shape[1] > 1 else torch.zeros_like(mean)
    )  # (P, 1)
    adv = (r - mean) / (std + eps)  # (P, G)
    constant = (r == r[:, :1]).all(dim=1, keepdim=True)  # (P, 1)
    return adv.masked_fill(constant, 0.0)


def _lengths(mask: torch.Tensor) -> torch.Tensor:
    lengths = mask.sum(dim=-1)  # (B,)
    if (lengths == 0).any():
        rows = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(
            f"response_mask rows {rows} have no response token; drop empty responses before the loss"
        )
    return lengths


def sequence_log_ratio(new_logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log s_i``: the mean over response tokens of ``new - old`` log-probs; ``(B, T)`` x3 -> ``(B,)``.

    ``exp`` of it is GSPO's sequence ratio ``(pi(y|x) / pi_old(y|x)) ** (1 / |y|)``.
    """
    mask = mask.to(new_logps.dtype)  # (B, T)
    return ((new_logps - old_logps) * mask).sum(dim=-1) / _lengths(mask)  # (B,)


def kl_k3(new_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) on tokens sampled from pi: ``exp(d) - d - 1`` with ``d = ref - new``.

    Unbiased, always >= 0, and lower variance than ``-d`` (Schulman's "Approximating KL divergence"). ``(B, T)``.
    """
    d = ref_logps - new_logps  # (B, T)
    return torch.exp(d) - d - 1.0


def _clipped_objective(
    ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-unit loss ``-min(r A, clip(r) A)`` and the masks of units that took the clipped branch (low, high)."""
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    with torch.no_grad():
        low = (ratio < 1.0 - eps_low) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)
    return loss, low, high


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over response tokens of each row: ``(B, T)`` -> ``(B,)``."""
    return (x * mask).sum(dim=-1) / mask.sum(dim=-1)


def _kl_term(
    new_logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor | float, float]:
    if kl_coef == 0.0:
        return 0.0, 0.0
    if ref_logps is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logps (the reference policy's per-token log-probs)")
    kl = _masked_mean(kl_k3(new_logps, ref_logps), mask).mean()  # scalar: mean over responses
    return kl_coef * kl, float(kl.detach())


def _stats(
    loss: torch.Tensor, kl: float, ratios: torch.Tensor, low: torch.Tensor, high: torch.Tensor
) -> PolicyLossStats:
    """``ratios``/``low``/``high`` hold only the units (responses or response tokens) that count."""
    with torch.no_grad():
        lo, hi = float(low.float().mean()), float(high.float().mean())
        return PolicyLossStats(
            policy_loss=float(loss.detach()),
            kl=kl,
            ratio_mean=float(ratios.mean()),
            ratio_min=float(ratios.min()),
            ratio_max=float(ratios.max()),
            clip_low=lo,
            clip_high=hi,
            clip=lo + hi,
        )


def gspo_loss(
    new_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    variant: Literal["sequence", "token"] = "sequence",
    kl_coef: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """The GSPO loss, ``-mean_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)`` (+ ``kl_coef`` * KL).

    ``new_logps`` ``(B, T)``: the current policy's log-probs of the response tokens (with grad); ``old_logps``
    ``(B, T)``: the sampling policy's, recorded at sampling time; ``advantages`` ``(B,)``, or ``(B, T)`` with
    ``variant="token"``; ``mask`` ``(B, T)``: 1 on response tokens. ``variant="token"`` is GSPO-token (see the module
    docstring). ``kl_coef > 0`` adds the k3 KL to ``ref_logps`` ``(B, T)``, a masked mean per response averaged over
    responses; GSPO uses none, the default.
    """
    if variant not in ("sequence", "token"):
        raise ValueError(f"variant must be 'sequence' or 'token', got {variant!r}")
    mask = mask.to(new_logps.dtype)  # (B, T)
    log_s = sequence_log_ratio(new_logps, old_logps, mask)  # (B,)
    if variant == "sequence":
        if advantages.ndim != 1:
            raise ValueError(
                f"variant='sequence' needs one advantage per response (B,), got {tuple(advantages.shape)}; "
                "token-level advantages need variant='token'"
            )
        s = torch.exp(log_s)  # (B,)
        per_seq, low, high = _clipped_objective(s, advantages, eps_low, eps_high)  # (B,)
        units = (s.detach(), low, high)
    else:
        adv = advantages[:, None] if advantages.ndim == 1 else advantages  # (B, 1) or (B, T)
        # s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)]: the value of s_i, the gradient of log pi(y_t) times s_i.
        s_tok = torch.exp(log_s.detach()[:, None] + new_logps - new_logps.detach())  # (B, T)
        per_tok, low, high = _clipped_objective(s_tok, adv, eps_low, eps_high)  # (B, T)
        per_seq = _masked_mean(per_tok, mask)  # (B,)
        keep = mask.bool()
        units = (s_tok.detach()[keep], low.expand_as(keep)[keep], high.expand_as(keep)[keep])
    policy = per_seq.mean()
    kl_loss, kl = _kl_term(new_logps, ref_logps, mask, kl_coef)
    return policy + kl_loss, _stats(policy, kl, *units)


def grpo_token_loss(
    new_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    kl_coef: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Token-level GRPO: ``r_t = pi(y_t) / pi_old(y_t)``, ``-min(r_t A, clip(r_t) A)`` averaged over each response's
    tokens, then over responses (+ the same optional k3 KL as `gspo_loss`). Shapes as in `gspo_loss`; advantages
    ``(B,)`` or ``(B, T)``. For comparison and ablations; ``keye rl`` trains with `gspo_loss`."""
    mask = mask.to(new_logps.dtype)  # (B, T)
    _lengths(mask)
    adv = advantages[:, None] if advantages.ndim == 1 else advantages  # (B, 1) or (B, T)
    ratio = torch.exp(new_logps - old_logps)  # (B, T)
    per_tok, low, high = _clipped_objective(ratio, adv, eps_low, eps_high)  # (B, T)
    policy = _masked_mean(per_tok, mask).mean()
    kl_loss, kl = _kl_term(new_logps, ref_logps, mask, kl_coef)
    keep = mask.bool()
    return policy + kl_loss, _stats(
        policy, kl, ratio.detach()[keep], low.expand_as(keep)[keep], high.expand_as(keep)[keep]
    )
