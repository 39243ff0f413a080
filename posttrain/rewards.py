"""Verifiable rewards for RL: a small registry of verifiers that score one response against a reference, in [0, 1].

A verifier is a callable ``(response, Reference) -> float``; `make_verifier` builds one by name from the registry
(``VERIFIERS``, extended with `register_verifier`), and `build_reward` combines several with weights, as a recipe
config would list them::

    reward = build_reward([RewardSpec("choice", 0.9), RewardSpec("format", 0.1)])
    reward("<think>red</think><answer>B</answer>", Reference("B", options=("A. blue", "B. red")))  # 1.0

Shipped verifiers (all strict: an answer that hedges between values, or commits to none, scores 0):

- ``choice``: the option letter the answer commits to, read by the evaluation harness's parser
  (`keye.extract.extract_choice`, so training and evaluation agree), equals ``Reference.answer``;
- ``number``: the one number the answer states (digits, decimals, thousands separators, fractions, signs, number
  words up to ninety) is within ``abs_tol`` or ``rel_tol`` of the reference;
- ``exact``: the answer text equals the reference after trimming whitespace;
- ``normalized``: equal after `normalize_answer` (case, Unicode width, punctuation, articles, number words);
- ``format``: the whole response is ``<think>...</think>`` then ``<answer>...</answer>``, each non-empty and once.

The content verifiers read the answer from the response with `extract_answer`: the last ``<answer>`` block if any,
else the text after ``</think>``, else the whole response; a response still inside an unclosed ``<think>`` has no
answer. Not for model-based (generative or reward-model) rewards, which need a model and batching; they plug in as
any callable with the same signature.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from keye.extract import extract_choice, option_letters, strip_thinking

__all__ = [
    "VERIFIERS",
    "CombinedReward",
    "Reference",
    "RewardSpec",
    "Verifier",
    "build_reward",
    "extract_answer",
    "make_verifier",
    "normalize_answer",
    "numbers_in",
    "parse_number",
    "register_verifier",
    "score_groups",
]


@dataclass(frozen=True)
class Reference:
    """The ground truth a response is scored against. ``answer``: the option letter for ``choice``, a number for
    ``number``, the answer text otherwise; ``options``: a multiple-choice question's options ("A. red" or "red")."""

    answer: str
    options: tuple[str, ...] = ()


Verifier = Callable[[str, Reference], float]

# name -> factory(**kwargs) -> Verifier. Factories rather than verifiers, so a config can pass tolerances and the like.
VERIFIERS: dict[str, Callable[..., Verifier]] = {}


def register_verifier(name: str) -> Callable[[Callable[..., Verifier]], Callable[..., Verifier]]:
    """Decorator: register a verifier factory under ``name`` (an error if the name is taken)."""

    def add(factory: Callable[..., Verifier]) -> Callable[..., Verifier]:
        if name in VERIFIERS:
            raise ValueError(f"a verifier named {name!r} is already registered")
        VERIFIERS[name] = factory
        return factory

    return add


def make_verifier(name: str, **kwargs) -> Verifier:
    """The registered verifier ``name`` built with ``kwargs`` (its options, e.g. ``abs_tol`` for ``number``)."""
    if name not in VERIFIERS:
        raise KeyError(f"unknown verifier {name!r}; registered: {sorted(VERIFIERS)}")
    return VERIFIERS[name](**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Reading the answer
# ----------------------------------------------------------------------------------------------------------------------

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(response: str) -> str | None:
    """The part of a response that states its answer, stripped; ``None`` if there is none.

    The last ``<answer>...</answer>`` block when present; otherwise the text after the last ``</think>``, or the whole
    response when it has no thinking block. ``None`` for an unclosed ``<think>`` (the model ran out of tokens while
    reasoning) and for an empty answer.
    """
    blocks = _ANSWER_BLOCK.findall(response)
    text = blocks[-1] if blocks else strip_thinking(response)
    if text is None:
        return None
    text = text.strip()
    return text or None


_NUMBER_WORDS: dict[str, int] = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
} | {w: 10 * i for i, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split(), start=3)}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Canonical form for comparing short answers: NFKC, lower case, number words as digits ("three" -> "3"),
    punctuation to spaces, the articles a/an/the dropped, whitespace collapsed. ``"The Red."`` -> ``"red"``."""
    text = unicodedata.normalize("NFKC", text).lower()
    words = re.sub(r"[^\w\s]|_", " ", text).split()
    words = [str(_NUMBER_WORDS[w]) if w in _NUMBER_WORDS else w for w in words if w not in _ARTICLES]
    return " ".join(words)


# A number not glued to a word or another number: "-3", "1,234.5", "3/4", "2.5e-3"; not the 3 of "3rd" or "v3".
_NUMBER = re.compile(
    r"(?<![\w.,/])([-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?)(?![\w/]|[.,]\d)"
)


def numbers_in(text: str) -> set[float] | None:
    """Every number ``text`` states (as `parse_number` reads them), or ``None`` when one of them cannot be scored
    ("1/0"). ``"size (60, 40)"`` -> ``{60.0, 40.0}``."""
    text = unicodedata.normalize("NFKC", text)
    values: set[float] = set()
    for m in _NUMBER.finditer(text):
        s = m.group(1).replace(",", "").replace("−", "-")
        try:
            values.add(float(Fraction(s)) if "/" in s else float(s))
        except (ValueError, ZeroDivisionError):
            return None  # "1/0": not a number this reward can score
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in _NUMBER_WORDS:
            values.add(float(_NUMBER_WORDS[word]))
    return values


def parse_number(text: str) -> float | None:
    """The one number ``text`` states, or ``None`` when it states none or several different ones ("3 or 4").

    Digits (with a sign, thousands separators, decimals, an exponent, or as a fraction ``a/b``) and number words up to
    ninety ("seven") both count; the same value written twice ("3 (three)") is one number.
    """
    values = numbers_in(text)
    return values.pop() if values is not None and len(values) == 1 else None


# ----------------------------------------------------------------------------------------------------------------------
# Verifiers
# ----------------------------------------------------------------------------------------------------------------------


@register_verifier("choice")
def choice_verifier() -> Verifier:
    """1 when the answer commits to the reference option letter (``Reference.options`` required), else 0."""

    def score(response: str, ref: Reference) -> float:
        if not ref.options:
            raise ValueError(f"choice verifier: reference {ref.answer!r} has no options")
        letter = ref.answer.strip().upper()
        if letter not in option_letters(len(ref.options)):
            raise ValueError(
                f"choice verifier: reference answer {ref.answer!r} is not one of the option letters"
            )
        answer = extract_answer(response)
        return float(answer is not None and extract_choice(answer, ref.options) == letter)

    return score


@register_verifier("number")
def number_verifier(abs_tol: float = 1e-6, rel_tol: float = 1e-6) -> Verifier:
    """1 when the answer's one number is within ``abs_tol`` or ``rel_tol`` (relative to the reference) of it."""

    def score(response: str, ref: Reference) -> float:
        expected = parse_number(ref.answer)
        if expected is None:
            raise ValueError(f"number verifier: reference answer {ref.answer!r} is not a single number")
        answer = extract_answer(response)
        got = parse_number(answer) if answer is not None else None
        return float(got is not None and math.isclose(got, expected, rel_tol=rel_tol, abs_tol=abs_tol))

    return score


@register_verifier("exact")
def exact_verifier() -> Verifier:
    """1 when the answer equals the reference exactly, apart from surrounding whitespace."""

    def score(response: str, ref: Reference) -> float:
        return float(extract_answer(response) == ref.answer.strip())

    return score


@register_verifier("normalized")
def normalized_verifier() -> Verifier:
    """1 when the answer equals the reference after `normalize_answer` on both."""

    def score(response: str, ref: Reference) -> float:
        expected = normalize_answer(ref.answer)
        if not expected:
            raise ValueError(f"normalized verifier: reference answer {ref.answer!r} is empty once normalised")
        answer = extract_answer(response)
        return float(answer is not None and normalize_answer(answer) == expected)

    return score


_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


@register_verifier("format")
def format_verifier(require_thinking: bool = True) -> Verifier:
    """1 when the response is exactly ``<think>...</think>`` then ``<answer>...</answer>`` (whitespace around them
    allowed), each tag once and the answer non-empty; the reasoning must be non-empty too unless
    ``require_thinking=False`` (no-think mode emits an empty ``<think></think>``)."""

    def score(response: str, ref: Reference) -> float:
        m = _FORMAT.fullmatch(response)
        if m is None or any(response.count(t) != 1 for t in ("<think>", "</think>", "<answer>", "</answer>")):
            return 0.0
        thinking, answer = m.group(1).strip(), m.group(2).strip()
        return float(bool(answer) and (bool(thinking) or not require_thinking))

    return score


# ----------------------------------------------------------------------------------------------------------------------
# Combining
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardSpec:
    """One term of a combined reward, as a config lists it: a registered verifier, its weight and its options."""

    name: str
    weight: float = 1.0
    options: Mapping[str, object] = field(default_factory=dict)


class CombinedReward:
    """Weighted mean of verifiers: ``sum_k w_k v_k(response) / sum_k w_k``, so it stays in [0, 1].

    Each verifier's score is checked to lie in [0, 1] (a custom verifier that returns 3 is an error, not a silent
    distortion). `scores` returns the per-verifier scores for logging.
    """

    def __init__(self, terms: Sequence[tuple[str, Verifier, float]]):
        if not terms:
            raise ValueError("a combined reward needs at least one verifier")
        if any(w < 0 for _, _, w in terms) or sum(w for _, _, w in terms) <= 0:
            raise ValueError(
                f"reward weights must be >= 0 with a positive sum, got {[w for _, _, w in terms]}"
            )
        names = [n for n, _, _ in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate verifier names in a combined reward: {names}")
        self.terms = list(terms)
        self.total_weight = float(sum(w for _, _, w in terms))

    def scores(self, response: str, ref: Reference) -> dict[str, float]:
        out = {}
        for name, verifier, _ in self.terms:
            value = float(verifier(response, ref))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"verifier {name!r} returned {value}, outside [0, 1]")
            out[name] = value
        return out

    def __call__(self, response: str, ref: Reference) -> float:
        scores = self.scores(response, ref)
        return sum(w * scores[name] for name, _, w in self.terms) / self.total_weight


def build_reward(specs: Sequence[RewardSpec]) -> CombinedReward:
    """A `CombinedReward` from config entries: each names a registered verifier, its weight and its options."""
    return CombinedReward([(s.name, make_verifier(s.name, **dict(s.options)), s.weight) for s in specs])


def score_groups(
    reward: Verifier, responses: Sequence[Sequence[str]], references: Sequence[Reference]
) -> torch.Tensor:
    """Rewards ``(P, G)`` for G responses to each of P prompts; ``responses[p]`` is scored against ``references[p]``."""
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} groups of responses but {len(references)} references")
    sizes = {len(group) for group in responses}
    if len(sizes) > 1:
        raise ValueError(f"groups of different sizes {sorted(sizes)}; score them one group at a time")
    rows = [[reward(r, ref) for r in group] for group, ref in zip(responses, references)]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(responses), -1)  # (P, G)
