"""GRPO-ATS: code sampled greedily, text at temperature 1, temperatures recorded; Thyme's reward formula."""

from __future__ import annotations

import pytest
import torch

from keye.posttrain.ats import CodeTemperatureProcessor, tempered_logprobs, thyme_reward


@pytest.fixture(scope="module")
def tokenizer(keye_tiny):
    return keye_tiny[1].tokenizer


def _ids(tokenizer, text):
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def test_switches_temperature_inside_code(tokenizer):
    prompt = _ids(tokenizer, "<|im_start|>assistant\n")
    in_code = torch.cat([prompt, _ids(tokenizer, "<think>look</think><code>\n```python\nx = 1")], 1)
    after = torch.cat([prompt, _ids(tokenizer, "<code>\n```python\nx = 1\n```\n</code> so")], 1)
    proc = CodeTemperatureProcessor(tokenizer, prompt_length=prompt.shape[1], text_temperature=1.0)
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    greedy = proc(in_code, scores.clone())
    assert torch.isinf(greedy[0, [0, 2, 3]]).all() and greedy[0, 1] == 3.0  # only the argmax survives
    text = proc(after, scores.clone())
    assert torch.equal(text, scores)  # temperature 1: unchanged
    assert proc.temperatures().tolist() == [[0.0, 1.0]]


def test_generate_records_one_temperature_per_token(keye_tiny):
    model, processor = keye_tiny
    inputs = processor([{"role": "user", "content": "Write code."}])
    proc = CodeTemperatureProcessor(processor.tokenizer, prompt_length=inputs["input_ids"].shape[1])
    torch.manual_seed(0)
    out = model.generate(
        **inputs,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=5,
        min_new_tokens=5,
        logits_processor=[proc],
    )
    assert proc.temperatures().shape == (1, out.shape[1] - inputs["input_ids"].shape[1])


def test_tempered_logprobs_and_reward():
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0]]])
    tokens = torch.tensor([[1, 0]])
    lp = tempered_logprobs(logits, tokens, torch.tensor([[1.0, 0.5]]))
    expected = torch.tensor(
        [
            [
                torch.log_softmax(torch.tensor([0.0, 1.0]), 0)[1],
                torch.log_softmax(torch.tensor([4.0, 0.0]), 0)[0],
            ]
        ]
    )
    torch.testing.assert_close(lp, expected)
    assert thyme_reward(1.0, 1.0, 1.0) == 2.0
    assert thyme_reward(1.0, 0.0, 0.0) == 1.0
    assert thyme_reward(0.0, 1.0, 1.0) == 0.5
