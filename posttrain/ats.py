"""Thyme's GRPO-ATS sampling and reward, the parts that do not depend on a trainer.

- `CodeTemperatureProcessor`: a transformers ``LogitsProcessor`` that samples text at ``text_temperature`` (1.0)
  and code, between ``<code>`` and ``</code>``, at ``code_temperature`` (0.0 = greedy), switching inside one
  ``generate`` call, and records the temperature used for every sampled token so that an RL ratio can be computed
  under the same distribution (`tempered_logprobs`).
- `thyme_reward`: R = R_result x (1 + 0.5 x R_consistency) + 0.5 x R_format.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

CODE_OPEN, CODE_CLOSE = "<code>", "</code>"
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
    """log pi_tau(token): logits ``(B, T, V)``, tokens ``(B, T)``, temperatures ``(B, T)`` -> ``(B, T)``.

    The same per-token temperatures as at sampling time, so new/old policy ratios compare like with like.
    """
    scaled = logits.float() / temperatures.clamp_min(GREEDY_FLOOR)[..., None].to(logits.device)
    return torch.log_softmax(scaled, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def thyme_reward(result: float, consistency: float, format_ok: float) -> float:
    """Thyme's reward: the answer's correctness scaled up by reasoning/answer consistency, plus a format bonus."""
    return result * (1.0 + 0.5 * consistency) + 0.5 * format_ok
