"""Answer extraction on a table of real-looking model outputs, including ones that must not match."""

import pytest

from keye.extract import extract_choice, option_letters, strip_thinking

OPTIONS = ["A. red", "B. blue", "C. dark red", "D. green"]

CASES = [
    # Committed answers.
    ("B", "B"),
    ("b", "B"),
    ("(C)", "C"),
    ("D.", "D"),
    ("The answer is (B).", "B"),
    ("The best answer is: C", "C"),
    ("The correct answer is D because the ball is green.", "D"),
    ("Answer: b", "B"),
    ("Best Option: (C)", "C"),
    ("C) dark red", "C"),  # after the MLVU prompt's "Best Option: (" the model continues "C) ..."
    ("B. blue", "B"),
    ("(A) red", "A"),
    ("**C**", "C"),
    ("**Answer:** D", "D"),
    ("<answer>D</answer>", "D"),
    ('"B"', "B"),
    ("<think>The ball looks blue... or maybe green? A or B?</think>\nD", "D"),
    ("<think>\n\n</think>\n\nA", "A"),
    ("C\nBecause the ball is dark red.", "C"),
    ("Option B is correct.", "B"),
    ("Based on the video, I would choose C.", "C"),
    ("It is A.", "A"),
    # An option's text without its letter.
    ("green", "D"),
    ("Dark red.", "C"),
    ("The ball is blue.", "B"),
    ("The ball is dark red.", "C"),  # "red" is inside "dark red": the longer option wins
    # Must not match.
    ("", None),
    ("   ", None),
    ("I think A or B", None),
    ("B/C", None),
    ("(A) or (B)", None),
    ("Apple", None),  # "A" inside an ordinary word
    ("A dog runs across the field.", None),  # the article "A"
    ("CD player", None),
    ("The answer is A. No wait, the answer is B.", None),
    ("<think>I am still thinking about whether it is B", None),  # unclosed <think>: no answer yet
    ("blue or green", None),
    ("The video shows a sunset over the sea.", None),
    ("E", None),  # not an option letter for four options
]


@pytest.mark.parametrize("response, expected", CASES)
def test_extract_choice_table(response, expected):
    assert extract_choice(response, OPTIONS) == expected


def test_options_without_letters_and_more_letters():
    options = ["red", "blue", "green", "yellow", "purple"]
    assert extract_choice("E", options) == "E"
    assert extract_choice("purple", options) == "E"
    assert extract_choice("F", options) is None


def test_strip_thinking_and_letters():
    assert strip_thinking("<think>x</think>B") == "B"
    assert strip_thinking("</think>B") == "B"  # the template opened <think> in the prompt
    assert strip_thinking("<think>x") is None
    assert option_letters(4) == "ABCD"
    with pytest.raises(ValueError):
        option_letters(0)
