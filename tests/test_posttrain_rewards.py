"""Verifiable rewards: table-driven, with as many answers that must NOT match as ones that must."""

from __future__ import annotations

import pytest
import torch

from keye.posttrain.rewards import (
    VERIFIERS,
    CombinedReward,
    Reference,
    RewardSpec,
    build_reward,
    extract_answer,
    make_verifier,
    normalize_answer,
    parse_number,
    register_verifier,
    score_groups,
)

OPTIONS = ("A. green", "B. blue", "C. red", "D. white")

CHOICE = [  # (response, reward) against answer C
    ("C", 1.0),
    ("(C)", 1.0),
    ("C. red", 1.0),
    ("The answer is C.", 1.0),
    ("red", 1.0),  # the text of exactly one option
    ("<think>the star is red, so C</think><answer>C</answer>", 1.0),
    ("<think>maybe A</think>\nC", 1.0),
    ("<answer>B</answer> no wait <answer>C</answer>", 1.0),  # the last answer block counts
    ("B", 0.0),
    ("A or C", 0.0),  # hedging
    ("C/D", 0.0),
    ("A dog runs", 0.0),  # the article "A" is not option A
    ("<think>it is C", 0.0),  # unclosed reasoning: no answer
    ("", 0.0),
    ("<answer></answer>", 0.0),
    ("E", 0.0),
]


@pytest.mark.parametrize("response,expected", CHOICE)
def test_choice(response, expected):
    assert make_verifier("choice")(response, Reference("C", OPTIONS)) == expected


def test_choice_needs_options_and_a_letter():
    with pytest.raises(ValueError, match="no options"):
        make_verifier("choice")("C", Reference("C"))
    with pytest.raises(ValueError, match="not one of the option letters"):
        make_verifier("choice")("C", Reference("red", OPTIONS))


NUMBER = [  # (response, reference, reward)
    ("3", "3", 1.0),
    ("There are 3 objects.", "3", 1.0),
    ("three", "3", 1.0),
    ("Three (3).", "3", 1.0),  # the same value twice is one number
    ("3.0", "3", 1.0),
    ("<think>2 + 1</think><answer>3</answer>", "3", 1.0),
    ("1,234", "1234", 1.0),
    ("0.5", "1/2", 1.0),
    ("-2.5e-1", "-0.25", 1.0),
    ("forty", "40", 1.0),
    ("3 or 4", "3", 0.0),  # hedging between values
    ("13", "3", 0.0),
    ("-3", "3", 0.0),
    ("3.5", "3", 0.0),
    ("the 3rd one", "3", 0.0),  # an ordinal is not a count
    ("3,4", "3", 0.0),
    ("no idea", "3", 0.0),
    ("<think>3", "3", 0.0),
    ("2024-01-03", "3", 0.0),
]


@pytest.mark.parametrize("response,reference,expected", NUMBER)
def test_number(response, reference, expected):
    assert make_verifier("number")(response, Reference(reference)) == expected


def test_number_tolerance():
    loose = make_verifier("number", abs_tol=0.5, rel_tol=0.0)
    assert loose("3.4", Reference("3")) == 1.0
    assert loose("3.6", Reference("3")) == 0.0
    relative = make_verifier("number", abs_tol=0.0, rel_tol=0.01)
    assert relative("1005", Reference("1000")) == 1.0
    assert relative("1011", Reference("1000")) == 0.0
    with pytest.raises(ValueError, match="not a single number"):
        make_verifier("number")("3", Reference("three or four"))


def test_parse_number():
    assert parse_number("x = 7") == 7.0
    assert parse_number("7 and 8") is None
    assert parse_number("v3 of the model") is None
    assert parse_number("−4") == -4.0  # Unicode minus


EXACT = [
    ("red", "red", 1.0),
    ("  red\n", "red", 1.0),
    ("<answer>red</answer>", "red", 1.0),
    ("Red", "red", 0.0),
    ("red.", "red", 0.0),
    ("dark red", "red", 0.0),
]


@pytest.mark.parametrize("response,reference,expected", EXACT)
def test_exact(response, reference, expected):
    assert make_verifier("exact")(response, Reference(reference)) == expected


NORMALIZED = [
    ("Red.", "red", 1.0),
    ("The red one", "red one", 1.0),  # articles dropped
    ("RED!!", "red", 1.0),
    ("three", "3", 1.0),  # number words
    ("an apple", "Apple", 1.0),
    ("ｒｅｄ", "red", 1.0),  # full-width letters (NFKC)
    ("moving_left", "moving left", 1.0),
    ("dark red", "red", 0.0),
    ("not red", "red", 0.0),
    ("left", "right", 0.0),
    ("reds", "red", 0.0),
    ("the answer is red", "red", 0.0),  # a sentence is not the short answer
    ("", "red", 0.0),
]


@pytest.mark.parametrize("response,reference,expected", NORMALIZED)
def test_normalized(response, reference, expected):
    assert make_verifier("normalized")(response, Reference(reference)) == expected


def test_normalize_answer():
    assert normalize_answer("The  Red, Square!") == "red square"
    assert normalize_answer("Twenty apples") == "20 apples"


FORMAT = [
    ("<think>count them</think><answer>3</answer>", 1.0),
    ("<think>\ncount them\n</think>\n\n<answer>3</answer>\n", 1.0),
    ("<answer>3</answer>", 0.0),  # no reasoning block
    ("<think>count</think>3", 0.0),  # no answer block
    ("<answer>3</answer><think>count</think>", 0.0),  # wrong order
    ("<think>count</think><answer>3</answer> trailing", 0.0),
    ("<think>a</think><answer>3</answer><answer>4</answer>", 0.0),  # two answers
    ("<think>a<think>b</think><answer>3</answer>", 0.0),  # nested
    ("<think>count</think><answer> </answer>", 0.0),  # empty answer
    ("<think>\n\n</think><answer>3</answer>", 0.0),  # empty reasoning
    ("<think>count</think><answer>3", 0.0),  # unclosed
]


@pytest.mark.parametrize("response,expected", FORMAT)
def test_format(response, expected):
    assert make_verifier("format")(response, Reference("3")) == expected


def test_format_no_think_mode():
    assert (
        make_verifier("format", require_thinking=False)(
            "<think>\n\n</think><answer>3</answer>", Reference("")
        )
        == 1
    )


def test_extract_answer():
    assert extract_answer("<think>x</think> B ") == "B"
    assert extract_answer("<think>x") is None
    assert extract_answer("<answer>  </answer>") is None
    assert extract_answer("plain") == "plain"


def test_combined_reward_is_a_weighted_mean_in_unit_interval():
    reward = build_reward([RewardSpec("choice", 0.8), RewardSpec("format", 0.2)])
    ref = Reference("C", OPTIONS)
    assert reward("<think>red</think><answer>C</answer>", ref) == pytest.approx(1.0)
    assert reward("C", ref) == pytest.approx(0.8)  # right, unformatted
    assert reward("<think>blue</think><answer>B</answer>", ref) == pytest.approx(0.2)  # formatted, wrong
    assert reward("B", ref) == 0.0
    assert reward.scores("C", ref) == {"choice": 1.0, "format": 0.0}
    tolerant = build_reward([RewardSpec("number", 1.0, {"abs_tol": 0.5})])
    assert tolerant("3.4", Reference("3")) == 1.0


def test_combined_reward_rejects_bad_weights_and_out_of_range_verifiers():
    with pytest.raises(ValueError, match="weights"):
        build_reward([RewardSpec("exact", 0.0)])
    with pytest.raises(ValueError, match="weights"):
        build_reward([RewardSpec("exact", -1.0), RewardSpec("format", 2.0)])
    with pytest.raises(KeyError, match="unknown verifier"):
        make_verifier("nope")
    broken = CombinedReward([("broken", lambda response, ref: 3.0, 1.0)])
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        broken("x", Reference("x"))


def test_registry_accepts_new_verifiers_once():
    @register_verifier("test-length")
    def length_verifier(limit: int = 5):
        return lambda response, ref: float(len(response) <= limit)

    try:
        assert make_verifier("test-length", limit=2)("ab", Reference("")) == 1.0
        with pytest.raises(ValueError, match="already registered"):
            register_verifier("test-length")(length_verifier)
    finally:
        del VERIFIERS["test-length"]


def test_score_groups_shape():
    reward = make_verifier("exact")
    rewards = score_groups(reward, [["a", "b", "a"], ["c", "c", "d"]], [Reference("a"), Reference("d")])
    torch.testing.assert_close(rewards, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
