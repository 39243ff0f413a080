"""The Thyme loop: code rounds run in the sandbox, outputs and images return, the round limit holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keye.chat import Reply
from keye.tools.loop import FINAL_ANSWER_PROMPT, run_tool_loop


class ScriptedSession:
    """A stand-in for ChatSession that replies from a script and records what it was sent."""

    def __init__(self, replies):
        self.replies, self.sent = list(replies), []

    def send(self, content, **_):
        self.sent.append(content)
        text = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return Reply(text=text, num_tokens=1, prompt_tokens=1)


CROP = "<think>zoom in</think><code>\n```python\nfrom PIL import Image\nim = Image.open(image_path)\nprint(im.size)\nim.crop((0, 0, 20, 10)).save('crop.png')\n```\n</code>"


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(path)
    return path


def test_code_round_then_answer(image, tmp_path):
    session = ScriptedSession([CROP, "<think>it is 60x40</think><answer>60x40</answer>"])
    trace = run_tool_loop(session, "How big is it?", [image], out_dir=tmp_path / "out")
    assert trace.answer == "60x40" and trace.stopped == "answer" and len(trace.rounds) == 2
    result = trace.rounds[0].result
    assert result.ok and result.stdout.strip() == "(60, 40)"
    assert len(result.images) == 1 and Image.open(result.images[0]).size == (20, 10)
    # the sandbox's reply went back as a user turn with the new image inside <sandbox_output>
    reply = session.sent[1]
    assert (
        reply[0]["text"].startswith("<sandbox_output>(60, 40)") and reply[-1]["text"] == "</sandbox_output>"
    )
    assert reply[1] == {"type": "image", "image": result.images[0]}
    assert trace.to_dict()["rounds"][0]["result"]["stdout"].strip() == "(60, 40)"


def test_round_limit_then_final_answer_demanded(image, tmp_path):
    session = ScriptedSession([CROP])  # never answers on its own
    trace = run_tool_loop(session, "?", [image], max_rounds=2, out_dir=tmp_path / "out")
    ran = [r for r in trace.rounds if r.result is not None]
    assert len(ran) == 2  # code ran exactly max_rounds times
    assert trace.stopped == "max_rounds" and trace.answer is None
    assert session.sent[-1] == [{"type": "text", "text": FINAL_ANSWER_PROMPT}]
    assert len(trace.rounds) == 4  # 2 code rounds, 1 refused, 1 demanded answer


def test_repairs_are_applied_and_reported(image, tmp_path):
    sloppy = "<code>\n```python\nim = Image.open(img_path)\nprint(np.array(im).shape)\n```\n</code>"
    trace = run_tool_loop(
        ScriptedSession([sloppy, "<answer>ok</answer>"]), "?", [image], out_dir=tmp_path / "o"
    )
    result = trace.rounds[0].result
    assert result.ok, result.error
    assert result.stdout.strip() == "(40, 60, 3)"
    assert result.repairs  # missing imports and the wrong path variable were fixed


def test_trace_as_sft_conversation_trains_model_turns_only(image, tmp_path, keye_tiny):
    _, processor = keye_tiny
    answer = "<think>it is 60x40</think><answer>60x40</answer>"
    trace = run_tool_loop(
        ScriptedSession([CROP, answer]), "How big is it?", [image], out_dir=tmp_path / "out"
    )
    msgs = trace.to_messages([image])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    inputs = processor(msgs, add_generation_prompt=False, return_labels=True)
    trained = inputs["input_ids"][0][inputs["labels"][0] != -100]
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    expected = (
        tok(CROP, add_special_tokens=False)["input_ids"]
        + [end]
        + tok(answer, add_special_tokens=False)["input_ids"]
    )
    assert trained.tolist() == expected + [end]  # exactly the two model turns, nothing of the sandbox's
    text = processor.decode(trained, skip_special_tokens=False)
    assert "sandbox_output" not in text and "(60, 40)" not in text
    assert (
        int((inputs["input_ids"] == processor.token_ids["image_pad"]).sum()) > 0
    )  # the crop is an image input


def test_generated_tool_sft_conversations_run_in_the_sandbox_and_train_model_turns_only(
    bwrap, tmp_path, keye_tiny
):
    """`write_tool_sft`: every code turn really ran (a recovering sample fails first, then succeeds), the answer is
    the task's, and the SFT labels cover the model's turns only: the sandbox's text and images are inputs."""
    import json

    from keye.posttrain.sft import resolve_media
    from keye.posttrain.tooltask import write_tool_sft
    from keye.tools.loop import TOOL_SYSTEM_PROMPT

    _, processor = keye_tiny
    manifest = write_tool_sft(tmp_path / "sft", n=6, seed=1, recover_share=0.5)
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert [x["meta"]["qtype"] for x in lines] == ["spot", "measure", "zoom"] * 2
    assert [x["recover"] for x in lines] == [True, False, False, True, False, True]
    for line in lines:
        messages = resolve_media(line["messages"], manifest.parent)
        assert messages[0] == {"role": "system", "content": TOOL_SYSTEM_PROMPT}
        outputs = ["".join(p["text"] for p in m["content"] if p["type"] == "text") for m in messages[3::2]]
        assert all(o.startswith("<sandbox_output>") for o in outputs)
        assert [o.startswith("<sandbox_output>Error:") for o in outputs] == [True] * line["recover"] + [False]
        assert messages[-1]["content"].endswith(f"<answer>{line['meta']['answer']}</answer>")
        inputs = processor(messages, add_generation_prompt=False, return_labels=True)
        trained = processor.decode(
            inputs["input_ids"][0][inputs["labels"][0] != -100], skip_special_tokens=False
        )
        assert "<code>" in trained and f"<answer>{line['meta']['answer']}</answer>" in trained
        assert "sandbox_output" not in trained and "Error:" not in trained
        images = int((inputs["input_ids"] == processor.token_ids["image_pad"]).sum())
        if line["meta"]["qtype"] in ("zoom", "spot"):  # the enlarged corner comes back as an image input
            crops = [p for m in messages[3::2] for p in m["content"] if p["type"] == "image"]
            assert len(crops) == 1 and Path(crops[0]["image"]).is_file()
            assert images > int(
                processor([messages[1]])["input_ids"].eq(processor.token_ids["image_pad"]).sum()
            )
        else:
            assert outputs[-1] == f"<sandbox_output>{line['meta']['answer']}</sandbox_output>"
