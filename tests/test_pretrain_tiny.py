"""keye-tiny (pretrain/tiny.py): the multiple-choice targets are what the harness scores; the shipped model sees."""

from __future__ import annotations

import json
import re

import pytest

from keye.extract import extract_choice
from keye.pretrain.tiny import MC_CUE, prepare_data


def _turns(line: dict):
    msgs = line["messages"]
    for user, assistant in zip(msgs[::2], msgs[1::2]):
        content = user["content"]
        text = (
            content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")
        )
        yield text, assistant["content"][0]["text"]


def test_multiple_choice_targets_name_the_answer_then_the_letter_the_harness_reads(tmp_path):
    root = prepare_data(tmp_path / "data", n_video=2, n_image=1, workers=1, n_stage0=2)
    stage0 = [json.loads(x) for x in (root / "stage0" / "image" / "samples.jsonl").read_text().splitlines()]
    # Stage 0's images come from a seed of their own
    assert [s["id"] for s in stage0] == ["syn-image-1002-000000", "syn-image-1002-000001"]
    samples = [json.loads(x) for x in (root / "video" / "samples.jsonl").read_text().splitlines()]
    samples += [json.loads(x) for x in (root / "image" / "samples.jsonl").read_text().splitlines()]
    truth = {q["question"]: q for s in samples for q in s["questions"]}
    n_mc = n_open = 0
    for name in ("mc_video", "mc_image", "text_mc", "multi_video", "multi_image", "open_video", "open_image"):
        for line in map(json.loads, (root / f"{name}.jsonl").read_text().splitlines()):
            for user, answer in _turns(line):
                if MC_CUE in user:
                    options = re.findall(r"^[A-D]\. .*$", user, flags=re.M)
                    qa = next(truth[q] for q in user.splitlines() if q in truth)
                    assert answer == f"{qa['answer']}, so the answer is {qa['answer_letter']}."
                    assert extract_choice(answer, options) == qa["answer_letter"]
                    n_mc += 1
                else:
                    assert answer == truth[user]["answer"]
                    n_open += 1
    assert n_mc > 10 and n_open > 10


@pytest.mark.slow
def test_shipped_keye_tiny_sees_videos_of_a_seed_never_trained_on(tmp_path):
    """keye-tiny as shipped names the colour, shape and count in short open answers about held-out videos far above
    the untrained model, whose answers never name a colour or a shape."""
    from keye import load_pretrained
    from keye.pretrain.tiny import evaluate_open, load_with_asset

    kw = dict(seed=7, n=45, media_dir=tmp_path, qtypes=("colour", "shape", "count"))
    trained = evaluate_open(*load_pretrained("keye-tiny"), **kw)
    untrained = evaluate_open(*load_with_asset(None), **kw)
    assert trained["overall"]["n"] == untrained["overall"]["n"] >= 25
    assert untrained["colour"]["acc"] == untrained["shape"]["acc"] == 0.0
    assert trained["overall"]["acc"] >= 50.0, trained  # measured 70% (21 of 30); chance is at most 1 in 4
