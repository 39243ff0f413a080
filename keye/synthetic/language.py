"""Captions and questions of a sample's scenes (open answers and four lettered options)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from keye.synthetic.world import (
    _ORDINALS,
    BACKGROUNDS,
    COLOURS,
    DIGITS,
    DIRECTIONS,
    LETTERS,
    QA,
    SHAPES,
    WORDS,
    Scene,
)

# ----------------------------------------------------------------------------------------------------------------------
# Captions and questions
# ----------------------------------------------------------------------------------------------------------------------


def _ordinal(n: int) -> str:
    if n <= len(_ORDINALS):
        return _ORDINALS[n - 1]
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _text_phrase(text: str) -> str:
    return f"the number {text}" if text.isdigit() else f"the word {text}"


def _scene_clause(scene: Scene, capital: bool) -> str:
    objs = _join([_a(f"{o.colour} {o.shape}") for o in scene.objects])
    if capital:
        objs = objs[0].upper() + objs[1:]
    clause = objs
    if scene.motion is not None:
        verb = "moves" if len(scene.objects) == 1 else "move"
        clause += f" {verb} {scene.motion}"
    clause += f" on {_a(scene.background)} background"
    if scene.text is not None:
        clause += f", with {_text_phrase(scene.text)} on screen"
    return clause


def make_caption(scenes: Sequence[Scene]) -> str:
    """One sentence describing every scene in order."""
    if len(scenes) == 1:
        return _scene_clause(scenes[0], capital=True) + "."
    parts = [f"First, {_scene_clause(scenes[0], False)}"]
    parts += [f"then, {_scene_clause(s, False)}" for s in scenes[1:-1]]
    parts.append(f"{'finally' if len(scenes) > 2 else 'then'}, {_scene_clause(scenes[-1], False)}")
    return "; ".join(parts) + "."


def _options(rng: np.random.Generator, answer: str, preferred: Iterable[str], vocab: Iterable[str]):
    """Four shuffled options: the answer, distractors from ``preferred`` first (hard negatives), then from ``vocab``."""
    values = [answer]
    for pool in (list(preferred), list(vocab)):
        pool = [v for v in dict.fromkeys(pool) if v not in values]
        for i in rng.permutation(len(pool)):
            if len(values) == 4:
                break
            values.append(pool[i])
    if len(values) != 4:
        raise ValueError(f"not enough distinct options for answer {answer!r}")
    values = [values[i] for i in rng.permutation(4)]
    letter = LETTERS[values.index(answer)]
    return [f"{L}. {v}" for L, v in zip(LETTERS, values)], letter


def _qa(rng, qtype: str, question: str, answer: str, preferred, vocab, scene: int | None) -> QA:
    options, letter = _options(rng, answer, preferred, vocab)
    return QA(qtype, question, answer, options, letter, scene)


def make_questions(
    rng: np.random.Generator, kind: str, scenes: Sequence[Scene], max_objects: int = 4
) -> list[QA]:
    """One question per applicable qtype (motion and order only for videos; order needs two scenes; text needs a
    scene with text). In multi-scene videos, scene-bound questions start with "In the second scene, "."""
    multi = len(scenes) > 1
    medium = "video" if kind == "video" else "image"

    def ask(k: int, q: str) -> str:
        return f"In the {_ordinal(k + 1)} scene, {q[0].lower()}{q[1:]}" if multi else q

    def pick_scene(candidates: Sequence[int] | None = None) -> int:
        candidates = list(range(len(scenes))) if candidates is None else list(candidates)
        return int(candidates[rng.integers(len(candidates))])

    qas: list[QA] = []
    k = pick_scene()
    obj = scenes[k].objects[rng.integers(len(scenes[k].objects))]
    others = [o.colour for o in scenes[k].objects]
    qas.append(_qa(rng, "colour", ask(k, f"What colour is the {obj.shape}?"), obj.colour, others, COLOURS, k))

    k = pick_scene()
    obj = scenes[k].objects[rng.integers(len(scenes[k].objects))]
    others = [o.shape for o in scenes[k].objects]
    qas.append(
        _qa(
            rng,
            "shape",
            ask(k, f"What is the shape of the {obj.colour} object?"),
            obj.shape,
            others,
            SHAPES,
            k,
        )
    )

    k = pick_scene()
    n = len(scenes[k].objects)
    top = max(4, max_objects)
    lo = int(rng.integers(max(1, n - 3), min(n, top - 3) + 1))
    counts = [str(i) for i in range(lo, lo + 4)]
    q = f"How many shapes are in the {medium}?" if not multi else ask(k, "How many shapes are there?")
    qas.append(_qa(rng, "count", q, str(n), counts, counts, k))

    moving = [i for i, s in enumerate(scenes) if s.motion is not None]
    if kind == "video" and moving:
        k = pick_scene(moving)
        sc = scenes[k]
        if len(sc.objects) == 1 or rng.random() < 0.5:
            obj = sc.objects[rng.integers(len(sc.objects))]
            q = f"In which direction does the {obj.colour} {obj.shape} move?"
        else:
            q = "In which direction do the shapes move?"
        qas.append(_qa(rng, "motion", ask(k, q), sc.motion, DIRECTIONS, DIRECTIONS, k))

    if kind == "video" and multi:
        order = _order_question(rng, scenes)
        if order is not None:
            qas.append(order)

    with_text = [i for i, s in enumerate(scenes) if s.text is not None]
    if with_text:
        k = pick_scene(with_text)
        text = scenes[k].text
        where = "on the screen" if kind == "video" else "in the image"
        if text.isdigit():
            q, vocab = f"What number is shown {where}?", DIGITS
        else:
            q, vocab = f"What word is written {where}?", WORDS
        qas.append(_qa(rng, "text", ask(k, q), text, vocab, vocab, k))
    return qas


def _order_question(rng: np.random.Generator, scenes: Sequence[Scene]) -> QA | None:
    """'Which X appears first, a or b?' where a first appears in an earlier scene than b (None if no such pair)."""
    # White is left out of colour order questions: white text on a dark background would make "white" ambiguous.
    getters = {
        "shape": (lambda s: [o.shape for o in s.objects], SHAPES),
        "colour": (
            lambda s: [o.colour for o in s.objects if o.colour != "white"],
            tuple(c for c in COLOURS if c != "white"),
        ),
        "background": (lambda s: [s.background], tuple(BACKGROUNDS)),
    }
    candidates = []
    for attr, (get, vocab) in getters.items():
        first: dict[str, int] = {}
        for k, s in enumerate(scenes):
            for v in get(s):
                first.setdefault(v, k)
        pairs = [(a, b) for a in first for b in first if first[a] < first[b]]
        if pairs:
            candidates.append((attr, pairs, vocab))
    if not candidates:
        return None
    attr, pairs, vocab = candidates[rng.integers(len(candidates))]
    a, b = pairs[rng.integers(len(pairs))]
    x, y = (a, b) if rng.random() < 0.5 else (b, a)
    question = {
        "shape": f"Which shape appears first in the video, the {x} or the {y}?",
        "colour": f"Which colour appears first in the video, {x} or {y}?",
        "background": f"Which background colour comes first in the video, {x} or {y}?",
    }[attr]
    return _qa(rng, "order", question, a, [b], vocab, None)
