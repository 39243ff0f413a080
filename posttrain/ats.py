"""Thyme's GRPO-ATS sampling and reward, the parts that do not depend on a trainer.

- `CodeTemperatureProcessor`: a transformers ``LogitsProcessor`` that samples text at ``text_temperature`` (1.0)
  and code, between ``<code>`` and ``</code>``, at ``code_temperature`` (0.0 = greedy), switching inside one
  ``generate`` call, and records the temperature used for every sampled token so that an RL ratio can be computed
  under the same distribution (`tempered_logprobs`).
- `thyme_reward`: R = R_result x (1 + 0.5 x R_consistency) + 0.5 x R_format; `thyme_score` computes its three
  terms for one tool conversation (a `keye.tools.loop.ToolTrace`), `trace_consistency` and `trace_format` being the
  last two (defined in their docstrings).

The tool-loop rollouts that use them for ``keye rl`` are in `keye.posttrain.thyme`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import LogitsProcessor

from keye.posttrain.rewards import Reference, extract_answer, normalize_answer, numbers_in, parse_number
from keye.tools.loop import ToolTrace
from keye.tools.protocol import CODE_CLOSE, CODE_OPEN

GREEDY_FLOOR = 1e-4  # temperature 0 is greedy sampling; log-probs use this floor instead of dividing by zero


class CodeTemperatureProcessor(LogitsProcessor):
    """Per-row temperature: code tokens at ``code_temperature``, everything else at ``text_temperature``.

    Use with ``generate(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, logits_processor=[proc])``. After the
    call, ``proc.temperatures()`` is ``(B, new_tokens)``: the temperature each sampled token was drawn at.
    """

    def __init__(
        self, tokenizer, prompt_length: int, text_temperature: float = 1.0, code_temperature: float = 0.0
    ):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.text_temperature = text_temperature
        self.code_temperature = code_temperature
        self._steps: list[torch.Tensor] = []

    def in_code(self, generated_ids: torch.Tensor) -> bool:
        """Whether the text generated so far has an open ``<code>`` (the next token is code)."""
        text = self.tokenizer.decode(generated_ids, skip_special_tokens=False)
        return text.rfind(CODE_OPEN) > text.rfind(CODE_CLOSE)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        temps = torch.tensor(
            [self.code_temperature if self.in_code(row) else self.text_temperature for row in generated],
            dtype=scores.dtype,
            device=scores.device,
        )  # (B,)
        self._steps.append(temps.cpu())
        out = scores / temps.clamp_min(GREEDY_FLOOR)[:, None]
        greedy = temps == 0
        if greedy.any():  # temperature 0: only the argmax can be sampled
            only_best = torch.full_like(scores, float("-inf")).scatter(
                1, scores.argmax(-1, keepdim=True), 0.0
            )
            out[greedy] = (scores + only_best)[greedy]
        return out

    def temperatures(self) -> torch.Tensor:
        return torch.stack(self._steps, dim=1) if self._steps else torch.zeros(0, 0)


def tempered_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """log pi_tau(token): logits ``(B, T, V)``, tokens ``(B, T)``, temperatures ``(B, T)`` -> ``(B, T)`` (any
    leading shape: ``(N, V)``, ``(N,)``, ``(N,)`` -> ``(N,)`` works too).

    The same per-token temperatures as at sampling time, so new/old policy ratios compare like with like. A
    temperature-0 (greedy) token is scored at `GREEDY_FLOOR`: about 0 for the argmax token the sampler had to pick,
    with a vanishing gradient, as the limit of a point mass.
    """
    scaled = logits.float() / temperatures.clamp_min(GREEDY_FLOOR)[..., None].to(logits.device)
    # the token's logit minus the log-normaliser: no vocabulary-wide log-softmax tensor (nor its copy for backward)
    return scaled.gather(-1, tokens[..., None]).squeeze(-1) - scaled.logsumexp(dim=-1)


def thyme_reward(result: float, consistency: float, format_ok: float) -> float:
    """Thyme's reward: the answer's correctness scaled up by reasoning/answer consistency, plus a format bonus."""
    return result * (1.0 + 0.5 * consistency) + 0.5 * format_ok


# ----------------------------------------------------------------------------------------------------------------------
# The terms of Thyme's reward for one tool conversation
# ----------------------------------------------------------------------------------------------------------------------


def final_text(trace: ToolTrace) -> str:
    """The model's last turn: the one holding the final answer (R_result reads it as any verifier reads a response)."""
    return trace.rounds[-1].text if trace.rounds else ""


def _evidence(trace: ToolTrace) -> str:
    """What the final answer should follow from: the stdout of the last code run that succeeded and printed
    something, else the reasoning (``<think>``) of the final turn."""
    for rnd in reversed(trace.rounds):
        if rnd.result is not None and rnd.result.ok and rnd.result.stdout.strip():
            return rnd.result.stdout
    return (trace.rounds[-1].parsed.think or "") if trace.rounds else ""


def _agrees(answer: str, evidence: str) -> bool:
    number = parse_number(answer)
    if number is not None:
        printed = numbers_in(evidence) or set()
        return any(math.isclose(number, x, rel_tol=1e-6, abs_tol=1e-6) for x in printed)
    words = normalize_answer(answer)
    return bool(words) and f" {words} " in f" {normalize_answer(evidence)} "


def trace_consistency(trace: ToolTrace) -> float:
    """R_consistency in {0, 1}: the final answer agrees with what the conversation derived it from.

    The answer is read from the final turn as R_result reads it (`extract_answer`). The evidence is the stdout of the
    last code run that succeeded and printed something (what the code computed), or, when no run printed anything
    (e.g. the code only cropped and zoomed), the final turn's ``<think>`` text (the reasoning's conclusion). They
    agree when the answer states one number and the evidence prints that number (``rel/abs_tol`` 1e-6), or, for a
    non-numeric answer, when its normalised words (`normalize_answer`) occur as whole words in the evidence's. No
    answer or no evidence: 0. A verifiable stand-in for Thyme's reasoning/answer consistency; it only matters for
    correct answers, since the reward multiplies it by R_result.
    """
    answer = extract_answer(final_text(trace))
    evidence = _evidence(trace)
    return float(answer is not None and bool(evidence.strip()) and _agrees(answer, evidence))


def trace_format(trace: ToolTrace) -> float:
    """R_format in {0, 1}: every model turn is well formed (`keye.tools.protocol.ParsedTurn.format_ok`: a
    ``<think>``, then exactly one closed ``<code>`` block with a fence, or one closed ``<answer>``) and the
    conversation ends with an answer."""
    ok = bool(trace.rounds) and trace.answer is not None
    return float(ok and all(rnd.parsed.format_ok for rnd in trace.rounds))


@dataclass(frozen=True)
class ThymeScore:
    """One conversation's reward and its terms (logged per step)."""

    result: float
    consistency: float
    format: float
    reward: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def thyme_score(trace: ToolTrace, result: Callable[[str, Reference], float], ref: Reference) -> ThymeScore:
    """Thyme's reward for one conversation: R_result = ``result(final turn, ref)`` (a verifier or a
    `keye.posttrain.rewards.CombinedReward`, in [0, 1]), `trace_consistency`, `trace_format`, `thyme_reward`."""
    r = float(result(final_text(trace), ref))
    c, f = trace_consistency(trace), trace_format(trace)
    return ThymeScore(result=r, consistency=c, format=f, reward=thyme_reward(r, c, f))
