"""Multiple-choice answer extraction: from a model's raw text to one option letter, or to nothing.

The official scorers are loose on purpose (Video-MME's takes the first capital A-D anywhere in the text, so "A dog
runs" reads as "A"); that inflates weak models. Here a letter is accepted only when the text commits to one option:
a bare letter, a letter that opens the answer ("B. red", "C) ..."), an answer phrase ("The answer is (B)", "Best
Option: (C)"), "option B", the text of exactly one option, or a single stand-alone capital letter that is not an
English article. Anything that names two letters ("A or B"), an empty answer, or an unclosed ``<think>`` block gives
``None``, which the harness scores as wrong.

Not for free-form (generation) answers: those go to a judge.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["extract_choice", "normalize_text", "option_letters", "strip_thinking"]

_THINK_CLOSE = "</think>"


def option_letters(n: int) -> str:
    """The letters of ``n`` options: ``option_letters(4) == "ABCD"``."""
    if not 1 <= n <= 26:
        raise ValueError(f"a multiple-choice question needs 1..26 options, got {n}")
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n]


def strip_thinking(text: str) -> str | None:
    """The text after the last ``</think>``; ``None`` when a ``<think>`` block was opened but never closed."""
    if _THINK_CLOSE in text:
        return text.rsplit(_THINK_CLOSE, 1)[1]
    if "<think>" in text:  # ran out of tokens while reasoning: there is no answer
        return None
    return text


def normalize_text(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed: for comparing an answer with an option's text."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(text.split())


def _clean(text: str) -> str:
    text = text.replace("（", "(").replace("）", ")").replace("：", ":")
    text = re.sub(r"</?answer>", " ", text)  # "<answer>B</answer>"
    text = re.sub(r"[*_`#]+", "", text)  # markdown emphasis / headings / code: "**C**" -> "C"
    return text.strip().strip("\"'").strip()


def _letter_patterns(letters: str) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    any_case = f"[{letters}{letters.lower()}]"
    bare = re.compile(rf"^[(\[]?({any_case})[)\].:]?$")  # "B", "(b)", "C.", "[D]"
    leading = re.compile(
        rf"^[(\[]?({any_case})(?:[)\].:]|\s+-\s)"
    )  # "B. red", "(C) red", "c) red", "D - red"
    # "The answer is (B).", "Best Option: (C)", "correct choice: d", "Option B is right", "answer would be C".
    phrase = re.compile(
        rf"\b(?:answer|option|choice)\s*(?:is|would be|should be|[:=-])?\s*:?\s*[(\[]?({any_case})(?![A-Za-z0-9])",
        re.IGNORECASE,
    )
    return bare, leading, phrase


def _phrase_letters(pattern: re.Pattern[str], text: str) -> set[str]:
    found = set()
    for m in pattern.finditer(text):
        letter = m.group(1)
        # "the answer is a red ball": a lower-case letter followed by a word is the article, not an option.
        if letter.islower() and re.match(r"\s+[A-Za-z]", text[m.end() :]):
            continue
        found.add(letter.upper())
    return found


def _match_option_text(text: str, options: Sequence[str], letters: str) -> str | None:
    """The letter of the one option whose text the answer states; ``None`` if none or several."""
    answer = normalize_text(text)
    if not answer:
        return None
    texts = [normalize_text(o) for o in options]
    exact = [letters[i] for i, t in enumerate(texts) if t and t == answer]
    if len(exact) == 1:
        return exact[0]
    found = [i for i, t in enumerate(texts) if t and re.search(rf"(?<!\w){re.escape(t)}(?!\w)", answer)]
    # "dark red" also contains the option "red": keep only options not contained in another found option.
    found = [i for i in found if not any(j != i and texts[i] in texts[j] for j in found)]
    if len(found) == 1:
        return letters[found[0]]
    return None


def _lone_letter(text: str, letters: str) -> str | None:
    """A single stand-alone capital letter (``... so C.``); ``None`` if there are several or it reads as "A ..."."""
    hits = list(re.finditer(rf"(?<![A-Za-z0-9'])([{letters}])(?![A-Za-z0-9'])", text))
    if not hits or len({m.group(1) for m in hits}) != 1:
        return None
    letter = hits[0].group(1)
    if letter == "A" or letter == "I":
        # The article "A dog ..." (and the pronoun "I") is not an answer: accept only a letter that is not followed
        # by a word.
        if all(re.match(r"\s+[A-Za-z]", text[m.end() :]) for m in hits):
            return None
    return letter


def extract_choice(response: str, options: Sequence[str]) -> str | None:
    """The option letter a response commits to, or ``None``.

    ``options`` are the options' texts, with or without their letters ("red" or "A. red"); their number fixes the
    valid letters. A leading ``<think>...</think>`` block is skipped.
    """
    letters = option_letters(len(options))
    options = [re.sub(rf"^\(?[{letters}][).:]\s*", "", o.strip()) for o in options]
    text = strip_thinking(response)
    if text is None:
        return None
    text = _clean(text)
    if not text:
        return None
    # A hedge between two options ("A or B", "B/C") commits to neither.
    if re.search(rf"(?<![A-Za-z])[{letters}]\)?\s*(?:or|and|/|,)\s*\(?[{letters}](?![A-Za-z])", text):
        return None
    bare, leading, phrase = _letter_patterns(letters)
    # The first line usually holds the answer and explanations follow: try it first, then the whole text.
    first_line = text.splitlines()[0].strip()
    for candidate in dict.fromkeys([first_line, text]):
        if m := bare.match(candidate) or leading.match(candidate):
            return m.group(1).upper()
    found = _phrase_letters(phrase, text)
    if len(found) == 1:
        return found.pop()
    if len(found) > 1:
        return None  # "the answer is A ... no, the answer is B": not committed
    if (letter := _match_option_text(text, options, letters)) is not None:
        return letter
    return _lone_letter(text, letters)
