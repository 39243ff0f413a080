"""Progressive hints: escalation order, recorded levels, the hint only ever in the prompt."""

from __future__ import annotations

import copy

import pytest

from keye.posttrain.hints import HintLevel, hint_levels, hinted_prompt, sample_with_hints

HINTS = {
    "concept": "Objects keep their colour across scenes.",
    "strategy": "Find the third scene first.",
    "tool": "Count the cuts: scene k starts after cut k-1.",
    "first_step": "The third scene starts at the second cut.",
    "solution": "In the third scene the star is red, so the answer is C.",
}
PROMPT = [
    {"role": "system", "content": "Answer briefly."},
    {
        "role": "user",
        "content": [
            {"type": "video", "video": "clip.mp4"},
            {"type": "text", "text": "What colour is the star?"},
        ],
    },
]
SAMPLE = {"messages": PROMPT, "answer": "C", "hints": HINTS}


def test_levels_in_order():
    assert [level.key for level in HintLevel][1:] == ["concept", "strategy", "tool", "first_step", "solution"]
    assert hint_levels(HINTS) == list(HintLevel)
    assert hint_levels(HINTS, max_level=HintLevel.STRATEGY) == [
        HintLevel.NONE,
        HintLevel.CONCEPT,
        HintLevel.STRATEGY,
    ]
    assert hint_levels({"strategy": "x", "solution": " "}) == [HintLevel.NONE, HintLevel.STRATEGY]
    with pytest.raises(ValueError, match="unknown hint fields"):
        hint_levels({"formula": "x"})


def test_hinted_prompt_changes_only_the_last_user_turn_and_leaves_the_sample_alone():
    before = copy.deepcopy(SAMPLE)
    out = hinted_prompt(SAMPLE["messages"], SAMPLE["hints"], HintLevel.TOOL)
    assert SAMPLE == before  # neither the prompt nor the answer (the target) is touched
    assert out[0] == PROMPT[0]
    assert out[1]["content"][:2] == PROMPT[1]["content"]
    assert out[1]["content"][2] == {
        "type": "text",
        "text": f"\n\nHint (useful tool or formula): {HINTS['tool']}",
    }
    assert all(m["role"] != "assistant" for m in out)
    assert hinted_prompt(PROMPT, HINTS, HintLevel.NONE) == PROMPT


def test_hinted_prompt_string_content_and_cumulative():
    prompt = [{"role": "user", "content": "How many?"}]
    single = hinted_prompt(prompt, HINTS, HintLevel.STRATEGY)[0]["content"]
    assert single == f"How many?\n\nHint (strategy): {HINTS['strategy']}"
    both = hinted_prompt(prompt, HINTS, HintLevel.STRATEGY, cumulative=True)[0]["content"]
    assert (
        both == f"How many?\n\nHint (key concept): {HINTS['concept']}\n\nHint (strategy): {HINTS['strategy']}"
    )


def test_hint_never_goes_into_an_assistant_turn():
    with pytest.raises(ValueError, match="end with the user turn"):
        hinted_prompt([*PROMPT, {"role": "assistant", "content": "C"}], HINTS, HintLevel.CONCEPT)
    with pytest.raises(ValueError, match="no 'tool' hint"):
        hinted_prompt(PROMPT, {"concept": "x"}, HintLevel.TOOL)


class FakeSampler:
    """Succeeds (one response of the group right) once the prompt holds a hint at ``solve_at`` or above."""

    def __init__(self, solve_at: HintLevel | None):
        self.solve_at = solve_at
        self.prompts: list[list[dict]] = []

    def sample(self, messages):
        self.prompts.append(messages)
        text = "".join(p["text"] for p in messages[-1]["content"] if p["type"] == "text")
        labels = [lv for lv in HintLevel if lv is not HintLevel.NONE and f"Hint ({lv.label})" in text]
        level = labels[-1] if labels else HintLevel.NONE
        solved = self.solve_at is not None and level >= self.solve_at
        return ["right" if solved and i == 0 else "wrong" for i in range(4)]

    @staticmethod
    def score(group):
        return [float(r == "right") for r in group]


def test_no_escalation_when_the_group_already_succeeds():
    sampler = FakeSampler(solve_at=HintLevel.NONE)
    result = sample_with_hints(PROMPT, HINTS, sampler.sample, sampler.score)
    assert (result.level, result.tried, result.solved) == (HintLevel.NONE, [HintLevel.NONE], True)
    assert result.messages == PROMPT and len(sampler.prompts) == 1


def test_escalates_level_by_level_until_a_response_succeeds():
    sampler = FakeSampler(solve_at=HintLevel.TOOL)
    result = sample_with_hints(PROMPT, HINTS, sampler.sample, sampler.score)
    assert result.tried == [HintLevel.NONE, HintLevel.CONCEPT, HintLevel.STRATEGY, HintLevel.TOOL]
    assert result.level == HintLevel.TOOL and result.solved
    assert result.rewards == [1.0, 0.0, 0.0, 0.0]
    assert result.messages == sampler.prompts[-1] == hinted_prompt(PROMPT, HINTS, HintLevel.TOOL)


def test_stops_at_the_max_level_and_skips_missing_hints():
    sampler = FakeSampler(solve_at=None)
    result = sample_with_hints(PROMPT, HINTS, sampler.sample, sampler.score, max_level=HintLevel.FIRST_STEP)
    assert result.tried == [
        HintLevel.NONE,
        HintLevel.CONCEPT,
        HintLevel.STRATEGY,
        HintLevel.TOOL,
        HintLevel.FIRST_STEP,
    ]
    assert not result.solved and result.level == HintLevel.FIRST_STEP and result.rewards == [0.0] * 4
    sampler = FakeSampler(solve_at=None)
    sparse = {"concept": "c", "solution": "s"}
    result = sample_with_hints(PROMPT, sparse, sampler.sample, sampler.score)
    assert result.tried == [HintLevel.NONE, HintLevel.CONCEPT, HintLevel.SOLUTION]


def test_partial_rewards_below_threshold_count_as_failure():
    calls = []

    def sample(messages):
        calls.append(messages)
        return len(calls)

    def score(group):  # 0.2 (say, a format bonus) until the third try
        return [1.0, 0.2] if group == 3 else [0.2, 0.2]

    result = sample_with_hints(PROMPT, HINTS, sample, score)
    assert result.tried == [HintLevel.NONE, HintLevel.CONCEPT, HintLevel.STRATEGY]
    result = sample_with_hints(PROMPT, HINTS, sample, score, success_threshold=0.1)
    assert result.tried == [HintLevel.NONE]
