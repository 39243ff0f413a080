"""The Gradio demo's handlers, in process: media checks and plans, streaming turns, Stop, the tool loop, display.

The same handlers behind a running server and a real browser: tests/test_demo_browser.py.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault(
    "GRADIO_ANALYTICS_ENABLED", "False"
)  # the demo never phones home (set before the import)
pytest.importorskip("gradio")

import gradio as gr  # noqa: E402

from keye.configuration import ModelCard  # noqa: E402
from keye.demo.app import DemoApp, DemoState  # noqa: E402
from keye.demo.cli import add_parser  # noqa: E402
from keye.demo.limits import Limits  # noqa: E402
from keye.demo.messages import (  # noqa: E402
    reply_messages,
    split_thinking,
    tool_round_messages,
    tools_status,
)

PLAN = (2.0, 16, 1024, "none")  # fps, max frames, token budget (keye-tiny's defaults), compression


@pytest.fixture(scope="module")
def demo(keye_tiny, tmp_path_factory):
    model, processor = keye_tiny
    return DemoApp(
        model, processor, model_name="keye-tiny", limits=Limits(), work_dir=tmp_path_factory.mktemp("demo")
    )


@pytest.fixture(scope="module")
def corrupt_video(media_dir, sample_video):
    path = media_dir / "corrupt.mp4"
    path.write_bytes(sample_video.read_bytes()[:3000])  # a truncated container
    return path


def drain(gen):
    """Run `DemoApp.respond` to the end; return its last output and how many outputs it gave."""
    outputs = list(gen)
    return outputs[-1][:4], len(outputs)  # chatbot, prompt box, state, speed line


# ------------------------------------------------------------------------------------------------ display
@pytest.mark.parametrize(
    "text, expected",
    [
        ("The square is red.", (None, "The square is red.", False)),
        ("<think>It moves left.</think>\n\nLeft.", ("It moves left.", "Left.", False)),
        ("<think>Still think", ("Still think", "", True)),
        ("pre-filled reasoning</think> Answer", ("pre-filled reasoning", "Answer", False)),
        ("<think>\n\n</think>\n\nDirect.", ("", "Direct.", False)),
    ],
)
def test_split_thinking(text, expected):
    assert split_thinking(text) == expected


def test_reasoning_is_a_collapsed_thought_once_closed():
    streaming = reply_messages("<think>counting frames", streaming=True)
    assert streaming == [
        {
            "role": "assistant",
            "content": "counting frames",
            "metadata": {"title": "Thinking", "status": "pending"},
        }
    ]
    done = reply_messages("<think>counting frames</think>Three.", streaming=False)
    assert [m["content"] for m in done] == ["counting frames", "Three."]
    assert done[0]["metadata"]["status"] == "done"  # Gradio renders a "done" thought collapsed
    assert reply_messages("<think></think>", streaming=False)[0]["content"] == "*(empty reply)*"
    assert reply_messages("", streaming=True) == []  # nothing yet: Gradio shows its pending dots
    gr.Chatbot().postprocess(done)  # the format Gradio's Chatbot accepts


def test_tool_round_messages_show_code_output_and_images(tmp_path):
    from keye.tools.protocol import parse_turn
    from keye.tools.sandbox import SandboxResult

    crop = tmp_path / "crop.png"
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(crop)
    text = "<think>zoom in</think><code>\n```python\nprint(1)\n```\n</code>"
    result = SandboxResult(
        ok=True, stdout="(60, 40)\n", stderr="", images=[str(crop)], error=None, elapsed_s=0.2,
        killed_by=None, repairs=["added import"], code="print(1)",
    )  # fmt: skip
    rnd = argparse.Namespace(text=text, parsed=parse_turn(text), result=result)
    messages = tool_round_messages(1, rnd)
    titles = [m["metadata"]["title"] for m in messages]
    assert titles == ["Round 1: thinking", "Round 1: code (ok, 0.20 s)", "Sandbox output", "Image crop.png"]
    assert "```python\nprint(1)\n```" in messages[1]["content"]
    assert "(60, 40)" in messages[2]["content"] and "repair: added import" in messages[2]["content"]
    assert messages[3]["content"] == {"path": str(crop)}
    assert all(m["metadata"].get("parent_id") == "tool-1" for m in messages[2:])
    out = gr.Chatbot().postprocess(messages)
    assert out.root[3].content[0].file.path == str(crop)


def test_cli_parser_flags():
    from keye.demo.cli import demo_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    cfg = demo_config(parser.parse_args(["demo"]))
    assert (cfg.model, cfg.host, cfg.port, cfg.share) == ("keye-tiny", "127.0.0.1", 7860, False)
    cfg = demo_config(
        parser.parse_args(
            ["demo", "--model", "m", "--port", "0", "--share", "--max-upload-mb", "5", "--max-duration", "30"]
        )
    )
    assert (cfg.model, cfg.port, cfg.share, cfg.limits.max_upload_mb, cfg.limits.max_duration_s) == (
        "m",
        0,
        True,
        5.0,
        30.0,
    )


# ------------------------------------------------------------------------------------------------ media
def test_a_bad_file_replaces_a_waiting_one(demo, sample_video, corrupt_video):
    _, st, _, strip, *_ = demo.on_media(str(sample_video), None, *PLAN)
    assert st.pending is not None and strip is not None
    box, st, history, strip, summary, player, *_ = demo.on_media(str(corrupt_video), st, *PLAN)
    assert st.pending is None and box is None and strip is None and summary is None and player is None
    assert "corrupt.mp4" in history[-1]["content"]


def test_video_upload_plans_frames_and_counts_tokens(demo, sample_video, keye_tiny):
    _, processor = keye_tiny
    box, st, history, strip, summary, player, *_ = demo.on_media(str(sample_video), None, *PLAN)
    assert player["value"] == str(sample_video) and player["visible"]  # the clip plays in the page
    strip = strip["value"]
    plan = st.pending.video.plan.to_dict()
    assert plan == processor.load_video(str(sample_video)).plan.to_dict()  # the processor's own plan
    assert f"**{plan['total_tokens']} vision tokens**" in summary
    assert f"{len(plan['frames'])} frames" in summary
    assert isinstance(strip, Image.Image) and history == []
    # A smaller budget re-plans the waiting video: fewer tokens.
    st, strip, summary = demo.on_settings(st, 2.0, 16, 64, "none")
    assert st.pending.video.plan.total_tokens <= 64 < plan["total_tokens"]
    assert f"**{st.pending.video.plan.total_tokens} vision tokens**" in summary
    # One too small for a single frame keeps the previous plan and says why.
    st, _, summary = demo.on_settings(st, 2.0, 16, 1, "none")
    assert summary.startswith("⚠") and "token_budget 1 cannot hold one frame" in summary
    assert st.pending.video.plan.total_tokens <= 64


@pytest.mark.parametrize(
    "name, content, limits, reason",
    [
        ("corrupt.mp4", None, Limits(), "cannot open as a video"),
        ("notes.txt", b"hello", Limits(), "unsupported file type"),
        ("broken.png", b"\x89PNG\r\n\x1a\nnot really", Limits(), "corrupt or truncated image"),
        ("big.mp4", "sample", Limits(max_upload_mb=0.001), "over this demo's limit of 0.001 MB"),
        ("long.mp4", "sample", Limits(max_duration_s=1), "this demo accepts videos up to 1 s"),
    ],
)
def test_bad_files_become_a_readable_chat_message(
    keye_tiny, tmp_path, corrupt_video, sample_video, name, content, limits, reason
):
    model, processor = keye_tiny
    app = DemoApp(model, processor, model_name="keye-tiny", limits=limits, work_dir=tmp_path)
    path = tmp_path / name
    if content is None:
        path.write_bytes(corrupt_video.read_bytes())
    elif content == "sample":
        path.write_bytes(sample_video.read_bytes())
    else:
        path.write_bytes(content)
    box, st, history, strip, summary, player, *_ = app.on_media(str(path), DemoState(), *PLAN)
    assert box is None and st.pending is None  # the file is dropped
    assert (
        strip == summary == player == gr.skip()
    )  # nothing was waiting: the strip of the conversation's video stays
    (message,) = history
    assert message["role"] == "assistant"
    assert message["content"].startswith(f"⚠ **{name}**: ") and reason in message["content"]
    assert str(tmp_path) not in message["content"] and "Traceback" not in message["content"]


# ------------------------------------------------------------------------------------------------ chat
def test_two_turns_stream_and_encode_the_video_once(demo, sample_video, keye_tiny, monkeypatch):
    model, _ = keye_tiny
    calls = []
    original = model.vision.forward
    monkeypatch.setattr(model.vision, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    _, st, *_ = demo.on_media(str(sample_video), None, *PLAN)
    started = time.perf_counter()
    outputs = list(demo.respond("What happens in this video?", st, "auto", False, "none", 12))
    assert len(outputs) >= 3  # the user turn, then the answer growing piece by piece
    assert outputs[0][4] is None  # the file box empties: the file is in the conversation now
    assert outputs[0][5].startswith("**sample.mp4**") and "In the conversation" in outputs[0][5]
    history, prompt_box, st, stats = outputs[-1][:4]
    reply = st.session.last_reply
    assert prompt_box == "" and history[0] == {
        "role": "user",
        "content": "*[sample.mp4]*\n\nWhat happens in this video?",
    }
    assert history[1]["role"] == "assistant" and history[1]["content"] == st.session.last_reply.text
    assert f"{reply.num_tokens} new tokens" in stats and "first token after" in stats
    assert f"prompt {reply.prompt_tokens} tokens ({reply.vision_tokens} vision)" in stats
    assert reply.vision_tokens == st.sent[0].video.plan.total_tokens  # the count is what the model got
    assert 0 < reply.ttft_s <= reply.seconds < time.perf_counter() - started  # measured within this turn
    assert st.pending is None and [m.name for m in st.sent] == ["sample.mp4"]
    first_prompt = st.session.last_reply.prompt_tokens

    (history, _, st, stats), _ = drain(demo.respond("And then?", st, "off", False, "none", 8))
    assert len(calls) == 1  # the follow-up reused the cached video
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[2]["content"] == "And then?"
    assert st.session.last_reply.prompt_tokens > first_prompt
    assert st.session.think is None  # keye-tiny's card: not trained to think, so "off" is never sent either


def test_dyntok_counts_and_sends_fewer_tokens(demo, sample_video):
    _, plain, *_ = demo.on_media(str(sample_video), None, *PLAN)
    _, st, _, _, summary, *_ = demo.on_media(str(sample_video), None, 2.0, 16, 1024, "dyntok")
    plan = st.pending.video.plan
    assert plan.compress == "dyntok" and plan.tokens_after_compression < plan.total_tokens
    assert f"compression dyntok: {plan.tokens_after_compression} tokens" in summary
    drain(demo.respond("What happens in this video?", plain, "auto", False, "none", 1))
    drain(demo.respond("What happens in this video?", st, "auto", False, "dyntok", 1))
    saved = plain.session.last_reply.prompt_tokens - st.session.last_reply.prompt_tokens
    assert saved == plan.total_tokens - plan.tokens_after_compression  # the count shown is what the model got


def test_stop_ends_the_answer_and_the_conversation_goes_on(demo):
    prompt = "Explain how a car engine works."  # keye-tiny answers it at length (26 tokens)
    full = DemoState()
    drain(demo.respond(prompt, full, "on", False, "none", 60))  # greedy: the same answer every time
    assert full.session.last_reply.num_tokens >= 20  # long enough for an early stop to show
    st = DemoState()
    gen = demo.respond(prompt, st, "on", False, "none", 60)
    next(gen)  # the user turn is shown
    next(gen)  # the first piece of the answer
    demo.on_stop(st)
    (history, _, st, stats), _ = drain(gen)
    # generation ended within a token or two of the click (a Stop that did nothing would run to the full answer)
    assert st.session.last_reply.num_tokens <= 3 and "stopped" in stats
    assert full.session.last_reply.text.startswith(st.session.last_reply.text)
    (history, _, st, stats), _ = drain(demo.respond("Thanks.", st, "auto", False, "none", 4))
    # the text-only note (once per conversation), the stopped answer, the next turn
    assert [m["role"] for m in history] == ["user", "assistant", "assistant", "user", "assistant"]
    assert "stopped" not in stats  # the next turn starts with the flag cleared


def test_clear_forgets_everything(demo, sample_video):
    _, st, *_ = demo.on_media(str(sample_video), None, *PLAN)
    drain(demo.respond("Hi", st, "auto", False, "none", 2))
    new_state, history, strip, tokens, stats, box, prompt, player, truth, presets = demo.on_clear(st)
    assert st.stop.is_set() and new_state.session is None and new_state.pending is None
    assert (history, strip, tokens, stats, box, prompt, truth) == ([], None, "", "", None, "", "")
    assert player["value"] is None and not player["visible"] and not presets["visible"]


def test_tool_mode_shows_each_round(demo, tmp_path, monkeypatch):
    """Tools on: keye's Thyme loop runs the model's code in the sandbox; the chat shows code, output, images."""
    ok, why = tools_status()
    if not ok:
        pytest.skip(why)
    import keye.demo.app as app_module
    from keye.chat import Reply

    turns = iter(
        [
            "<think>zoom in</think><code>\n```python\nfrom PIL import Image\nim = Image.open(image_path)\n"
            "print(im.size)\nim.crop((0, 0, 20, 10)).save('crop.png')\n```\n</code>",
            "<think>it is 60x40</think><answer>60x40</answer>",
        ]
    )

    class Scripted:  # stands in for the model's ChatSession: the loop, the sandbox and the display are real
        def __init__(self, *args, **kwargs):
            self.kwargs = kwargs

        def send(self, content, **kwargs):
            assert "stopping_criteria" in kwargs  # Stop reaches the model's generate
            return Reply(text=next(turns), num_tokens=7, prompt_tokens=1)

    monkeypatch.setattr(app_module, "ChatSession", Scripted)
    monkeypatch.setattr(demo, "card", ModelCard())  # a model whose card claims tools
    image = tmp_path / "in.png"
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(image)
    _, st, *_ = demo.on_media(str(image), None, *PLAN)
    (history, _, st, stats), n = drain(demo.respond("How big is it?", st, "auto", True, "none", 64))
    titles = [m.get("metadata", {}).get("title") for m in history]
    assert titles[:5] == [
        None,
        "Round 1: thinking",
        next(t for t in titles if t and t.startswith("Round 1: code (ok")),
        "Sandbox output",
        "Image crop.png",
    ]
    assert "(60, 40)" in history[3]["content"]
    assert Image.open(history[4]["content"]["path"]).size == (20, 10)
    assert titles[5] == "Round 2: thinking" and history[-1] == {"role": "assistant", "content": "60x40"}
    assert "14 new tokens" in stats and n >= 4  # user turn, round 1, round 2, final


# ------------------------------------------------------------------------------------------------ what the page promises
def test_toggles_follow_the_model_card(demo, monkeypatch):
    toggles = demo.toggles()
    assert toggles["think"] == (
        False,
        "keye-tiny was not trained to reason step by step: it answers directly.",
    )
    assert toggles["tools"] == (False, "keye-tiny has not learned to write code for the tools yet.")
    monkeypatch.setattr(demo, "card", ModelCard())  # a card that makes no claim: everything stays available
    toggles = demo.toggles()
    assert toggles["think"] == (True, None) and toggles["tools"] == tools_status()


def test_a_question_without_media_says_so(demo):
    (history, _, st, _), _ = drain(demo.respond("What is in the video?", None, "auto", False, "none", 4))
    assert [m["role"] for m in history] == ["user", "assistant", "assistant"]
    assert history[1]["content"].startswith("ℹ No video or image in this conversation, so keye-tiny answers")
    assert st.session.last_reply.vision_tokens == 0


def test_example_keeps_its_questions_answers_and_marks(demo):
    box, st, history, strip, tokens, player, truth, presets, question = demo.on_example(None, *PLAN)
    sample = st.example
    assert box == player["value"] and player["visible"] and question == sample.questions[0].question
    assert presets["choices"] == [qa.question for qa in sample.questions] and presets["visible"]
    for qa in sample.questions:  # every preset question with its expected answer, nothing graded yet
        assert f"| {qa.question} | **{qa.answer}** |  |" in truth
    outputs = list(demo.respond(question, st, "auto", False, "none", 8))
    history, _, st, stats, box, tokens, truth = outputs[-1]
    answer, verdict = history[-2]["content"], history[-1]["content"]
    ok = sample.questions[0].is_correct(answer)
    assert (
        verdict
        == f"{'✓ **Right**' if ok else '✗ **Wrong**'}: the expected answer is **{sample.questions[0].answer}**."
    )
    assert f"| {question} | **{sample.questions[0].answer}** | {answer} {'✓' if ok else '✗'} |" in truth
    assert sample.caption in truth  # the truth is still on the page after Send
    assert all(out[-1] == gr.skip() for out in outputs[:-1])  # and nothing replaced it meanwhile
    # A question of one's own is answered but not graded; the panel stays as it was.
    (history, _, st, _), _ = drain(demo.respond("Describe it.", st, "auto", False, "none", 4))
    assert not history[-1]["content"].startswith(("✓", "✗")) and len(st.graded) == 1


def test_an_image_used_by_tools_is_sent_again_when_tools_are_off(demo, tmp_path, monkeypatch):
    """The panel says the image is in the conversation; after a tool turn (its own session) the next chat turn must
    carry it, not a prompt without it."""
    image = tmp_path / "tall.png"
    Image.fromarray(np.full((120, 60, 3), 90, np.uint8)).save(image)
    _, st, _, strip, _, player, *_ = demo.on_media(str(image), None, *PLAN)
    assert strip["label"].startswith("The image") and not player["visible"]  # not "sampled frames", no player
    monkeypatch.setattr(demo, "card", ModelCard())  # tools available (keye-tiny writes no code: one round)
    if not demo.toggles()["tools"][0]:
        pytest.skip(demo.toggles()["tools"][1])
    (history, _, st, _), _ = drain(demo.respond("How tall is it?", st, "auto", True, "none", 16))
    assert [m.name for m in st.sent] == ["tall.png"] and st.session is None  # the chat has not seen it yet
    monkeypatch.undo()
    (history, _, st, stats), _ = drain(demo.respond("What colour is it?", st, "auto", False, "none", 4))
    reply = st.session.last_reply
    assert history[-2]["content"] == "*[tall.png]*\n\nWhat colour is it?"
    assert reply.vision_tokens > 0 and f"({reply.vision_tokens} vision)" in stats
    (history, _, st, _), _ = drain(demo.respond("And its shape?", st, "auto", False, "none", 4))
    assert history[-2]["content"] == "And its shape?"  # now the chat's cache holds it: not sent a third time


def test_tool_task_example_puts_up_its_image_question_and_answer(demo, monkeypatch):
    """The tool-task button: a generated image of the tool task, its question in the prompt box, the expected answer
    in the truth panel, Tools switched on only for a model whose card claims them; the tool loop's answer is graded."""
    import keye.demo.app as app_module
    from keye.chat import Reply

    box, st, history, strip, tokens, player, truth, presets, question, tools = demo.on_tool_example(
        None, *PLAN
    )
    (qa,) = st.example.questions
    assert Path(box).suffix == ".png" and Image.open(box).size == (448, 448) and not player["visible"]
    assert question == qa.question and "corner" in question and tools == gr.skip()  # keye-tiny: no tools
    assert f"| {qa.question} | **{qa.answer}** |  |" in truth and presets["choices"] == [qa.question]
    ok, why = tools_status()
    if not ok:
        pytest.skip(why)
    monkeypatch.setattr(demo, "card", ModelCard())  # a model whose card claims tools
    *_, tools = demo.on_tool_example(None, *PLAN)
    assert tools == gr.update(value=True)
    turns = iter([f"<think>I see it.</think><answer>{qa.answer}</answer>"])

    class Scripted:  # the model's session; the loop and the grading are real
        def __init__(self, *args, **kwargs):
            pass

        def send(self, content, **kwargs):
            return Reply(text=next(turns), num_tokens=5, prompt_tokens=1)

    monkeypatch.setattr(app_module, "ChatSession", Scripted)
    (history, *_), _ = drain(demo.respond(question, st, "auto", True, "none", 64))
    assert history[-1]["content"] == f"✓ **Right**: the expected answer is **{qa.answer}**."
