"""Progressive hints (Keye-VL-1.5): when every response to a hard prompt fails, re-sample it with a stronger hint.

A group in which all G responses fail gives GSPO nothing to learn from (all advantages are zero). Keye-VL-1.5 then
re-samples the prompt with a hint, escalating through five levels until some response succeeds:

    NONE -> CONCEPT -> STRATEGY -> TOOL (tool or formula) -> FIRST_STEP -> SOLUTION (the full solution)

and records the level that was needed (the share of groups still failing at NONE is the difficulty signal the
report tracks: 25.56% -> 0.20% with hints).

The hint goes in the *prompt*, never in the loss target: `hinted_prompt` takes only the prompt messages (which must end
with the user turn) and returns new prompt messages with the hint appended to that turn; it never sees the reference
answer or the response, and the caller's messages are not modified. The policy is then trained on its own responses
to the hinted prompt, so the loss only ever covers tokens the model produced.

A sample carries its hints as a mapping from level name to text (``{"concept": ..., "strategy": ..., "tool": ...,
"first_step": ..., "solution": ...}``); a level without text is skipped, as re-sampling an unchanged prompt would
teach nothing new. Not for writing the hints (an offline data step, typically a stronger model) or for sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Generic, TypeVar

__all__ = [
    "HINT_TEMPLATE",
    "HintLevel",
    "HintedGroup",
    "hint_levels",
    "hinted_prompt",
    "sample_with_hints",
]

T = TypeVar("T")


class HintLevel(IntEnum):
    """Hint strength, weakest first. ``NONE`` is the plain prompt."""

    NONE = 0
    CONCEPT = 1
    STRATEGY = 2
    TOOL = 3
    FIRST_STEP = 4
    SOLUTION = 5

    @property
    def key(self) -> str:
        """The sample field naming this level's hint: ``"concept"``, ..., ``"first_step"``, ``"solution"``."""
        return self.name.lower()

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    HintLevel.NONE: "",
    HintLevel.CONCEPT: "key concept",
    HintLevel.STRATEGY: "strategy",
    HintLevel.TOOL: "useful tool or formula",
    HintLevel.FIRST_STEP: "first step",
    HintLevel.SOLUTION: "reference solution",
}
# Appended to the last user turn, one line per hint given.
HINT_TEMPLATE = "\n\nHint ({label}): {text}"


def _check_hints(hints: Mapping[str, str]) -> None:
    known = {level.key for level in HintLevel if level is not HintLevel.NONE}
    unknown = set(hints) - known
    if unknown:
        raise ValueError(f"unknown hint fields {sorted(unknown)}; expected some of {sorted(known)}")


def hint_levels(hints: Mapping[str, str], max_level: HintLevel = HintLevel.SOLUTION) -> list[HintLevel]:
    """The levels a sample can be tried at, in escalation order: ``NONE``, then every level up to ``max_level`` whose
    hint text is non-empty."""
    _check_hints(hints)
    return [HintLevel.NONE] + [
        level
        for level in HintLevel
        if HintLevel.NONE < level <= max_level and (hints.get(level.key) or "").strip()
    ]


def hinted_prompt(
    messages: Sequence[dict], hints: Mapping[str, str], level: HintLevel, *, cumulative: bool = False
) -> list[dict]:
    """The prompt messages with the hint of ``level`` appended to the last (user) turn.

    Returns new messages; ``messages`` is left untouched. ``cumulative`` also includes the weaker levels' hints, in
    order (by default each level's hint is meant to stand alone). ``NONE`` returns a copy of the prompt. The prompt must
    end with a user turn: a hint is never written into an assistant turn, i.e. into a loss target.
    """
    _check_hints(hints)
    level = HintLevel(level)
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("a prompt must end with the user turn; the hint goes there, never into an answer")
    out = [dict(m) for m in messages]
    if level is HintLevel.NONE:
        return out
    given = [lv for lv in HintLevel if (cumulative and HintLevel.NONE < lv <= level) or lv == level]
    missing = [lv.key for lv in given if not (hints.get(lv.key) or "").strip()]
    if level.key in missing:
        raise ValueError(f"the sample has no {level.key!r} hint")
    text = "".join(
        HINT_TEMPLATE.format(label=lv.label, text=hints[lv.key].strip())
        for lv in given
        if lv.key not in missing
    )
    last = out[-1]
    content = last["content"]
    if isinstance(content, str):
        last["content"] = content + text
    else:  # content parts: the hint is one more text part after the question
        last["content"] = [*content, {"type": "text", "text": text}]
    return out


@dataclass
class HintedGroup(Generic[T]):
    """The group that was kept for one prompt. ``level``: the hint level it was sampled with; ``tried``: every level
    sampled, in order (``tried[-1] == level``); ``messages``: the (hinted) prompt the group was sampled from, which the
    loss must condition on; ``solved``: some response succeeded."""

    group: T
    rewards: list[float]
    level: HintLevel
    tried: list[HintLevel] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    solved: bool = False


def sample_with_hints(
    messages: Sequence[dict],
    hints: Mapping[str, str],
    sample: Callable[[list[dict]], T],
    score: Callable[[T], Sequence[float]],
    *,
    max_level: HintLevel = HintLevel.SOLUTION,
    success_threshold: float = 1.0,
    cumulative: bool = False,
) -> HintedGroup[T]:
    """Sample a group for one prompt, escalating the hint while the whole group fails.

    ``sample(messages) -> group`` draws G responses for a prompt; ``score(group) -> rewards`` scores them. A response
    succeeds when its reward is >= ``success_threshold`` (1.0: fully correct; pass the correctness reward here, not a
    mix with a format bonus, or a well-formatted wrong answer would stop the escalation). The group fails when none
    succeeds (with 0/1 rewards: all rewards are 0); then the next available level is tried, up to ``max_level``. The
    last group sampled is returned, solved or not.
    """
    levels = hint_levels(hints, max_level)
    tried: list[HintLevel] = []
    for level in levels:
        prompt = hinted_prompt(messages, hints, level, cumulative=cumulative)
        group = sample(prompt)
        rewards = [float(r) for r in score(group)]
        tried.append(level)
        solved = any(r >= success_threshold for r in rewards)
        if solved or level == levels[-1]:
            return HintedGroup(group, rewards, level, tried, prompt, solved)
    raise AssertionError("unreachable: hint_levels always returns NONE")
