"""What the demo shows, as Gradio chat messages and one-line summaries: the thinking split from the answer, tool
rounds (code, output, images), errors, a video's plan, speed. Plain dicts and strings (no Gradio), so they are
tested without a browser.
"""

from __future__ import annotations

from pathlib import Path

from keye.errors import KeyeInputError
from keye.processing import VideoInput

__all__ = [
    "error_message",
    "same_question",
    "reply_messages",
    "speed_summary",
    "split_thinking",
    "tool_answer",
    "tool_round_messages",
    "tools_status",
    "truth_panel",
    "video_summary",
]


def split_thinking(text: str) -> tuple[str | None, str, bool]:
    """Model text -> ``(reasoning, answer, reasoning_still_open)``.

    ``<think>...</think>`` at the start is the reasoning; a ``</think>`` without an opening tag (the template
    pre-filled ``<think>``) closes reasoning that began at the start. No tags: no reasoning."""
    stripped = text.lstrip()
    if stripped.startswith("<think>"):
        body = stripped[len("<think>") :]
        end = body.find("</think>")
        if end == -1:
            return body.strip(), "", True
        return body[:end].strip(), body[end + len("</think>") :].strip(), False
    end = text.find("</think>")
    if end != -1:
        return text[:end].strip(), text[end + len("</think>") :].strip(), False
    return None, text.strip(), False


def reply_messages(text: str, *, streaming: bool) -> list[dict]:
    """Chatbot messages for one reply: the reasoning (collapsed once closed) and the answer."""
    reasoning, answer, still_open = split_thinking(text)
    messages = []
    if reasoning:
        status = "pending" if streaming and still_open else "done"
        messages.append(
            {"role": "assistant", "content": reasoning, "metadata": {"title": "Thinking", "status": status}}
        )
    if answer:
        messages.append({"role": "assistant", "content": answer})
    elif not streaming and not messages:
        messages.append({"role": "assistant", "content": "*(empty reply)*"})
    return messages


def tool_round_messages(index: int, rnd) -> list[dict]:
    """Chatbot messages for one Thyme round (`keye.tools.loop.ToolRound`): the model's reasoning, the code that
    ran (after repairs), the sandbox's output and the images it saved, nested under one collapsed thought."""
    parent = f"tool-{index}"
    parsed, result = rnd.parsed, rnd.result
    messages = []
    if parsed.think:
        messages.append(
            {"role": "assistant", "content": parsed.think.strip(),
             "metadata": {"title": f"Round {index}: thinking", "status": "done"}}
        )  # fmt: skip
    if result is None:
        if parsed.kind == "none":  # neither code nor answer: show what the model wrote
            messages.append(
                {"role": "assistant", "content": rnd.text.strip() or "(nothing)",
                 "metadata": {"title": f"Round {index}: no code and no answer", "status": "done"}}
            )  # fmt: skip
        return messages
    status = "ok" if result.ok else f"failed: {result.error or result.killed_by}"
    messages.append(
        {"role": "assistant", "content": f"```python\n{result.code.rstrip()}\n```",
         "metadata": {"title": f"Round {index}: code ({status}, {result.elapsed_s:.2f} s)", "id": parent,
                      "status": "done"}}
    )  # fmt: skip
    output = result.stdout.rstrip()
    if not result.ok and result.stderr.strip():
        output += ("\n" if output else "") + result.stderr.rstrip()
    notes = [f"repair: {r}" for r in result.repairs] + [f"warning: {w}" for w in result.warnings]
    body = f"```text\n{output or '(no output)'}\n```" + "".join(f"\n- {n}" for n in notes)
    messages.append(
        {"role": "assistant", "content": body,
         "metadata": {"title": "Sandbox output", "parent_id": parent, "status": "done"}}
    )  # fmt: skip
    for img in result.images:
        messages.append(
            {"role": "assistant", "content": {"path": str(img)},
             "metadata": {"title": f"Image {Path(img).name}", "parent_id": parent, "status": "done"}}
        )  # fmt: skip
    return messages


def error_message(err: KeyeInputError | str) -> dict:
    """A readable chat message for bad input: the file's name (not the server's temp path) and the reason."""
    if isinstance(err, KeyeInputError):
        text = f"**{Path(err.source).name}**: {err.message}"
    else:
        text = err
    return {"role": "assistant", "content": f"⚠ {text}"}


def video_summary(video: VideoInput, name: str) -> str:
    """The token count of a planned video, as shown under the film strip."""
    plan = video.plan.to_dict()
    kinds = [f["kind"] for f in plan["frames"]]
    after = plan["tokens_after_compression"]
    return (
        f"**{name}**: {plan['duration']:.1f} s, {len(kinds)} frames ({kinds.count('slow')} slow, "
        f"{kinds.count('fast')} fast) → **{plan['total_tokens']} vision tokens** "
        f"({plan['slow_tokens_per_frame']} per slow frame, {plan['fast_tokens_per_frame']} per fast) "
        f"of a {plan['budget']} budget; compression {plan['compress']}: {after} tokens"
    )


def speed_summary(reply, stopped: bool) -> str:
    """The line under the chat after an answer: `keye.chat.Reply.stats` (time to first token, tokens/s, new,
    prompt and vision tokens), and whether Stop ended it."""
    return reply.stats() + (" · stopped" if stopped else "")


# How a Thyme loop that produced no `<answer>` ended (`keye.tools.loop.ToolTrace.stopped`), in a user's words.
_NO_ANSWER = {
    "max_rounds": "The model was still writing code when the rounds ran out, so it gave no final answer; its last "
    "turn is shown above.",
    "no_action": "The model wrote neither code nor a final answer in the tool format; its reply is shown as it is.",
}


def tool_answer(trace) -> list[dict]:
    """Chat messages closing a Thyme loop: its answer, or what the model said last and why there is no answer."""
    if trace.answer is not None:
        return [{"role": "assistant", "content": trace.answer}]
    last = trace.rounds[-1].text.strip() if trace.rounds else ""
    note = _NO_ANSWER.get(trace.stopped, "The model gave no final answer.")
    messages = [{"role": "assistant", "content": last}] if last and trace.stopped == "no_action" else []
    return [*messages, {"role": "assistant", "content": f"ℹ {note}"}]


def tools_status() -> tuple[bool, str]:
    """Whether the Tools toggle can be on here, and the line shown under it.

    It needs keye's Thyme loop (`keye.tools.loop.run_tool_loop`) and a sandbox that really isolates the snippet
    (bubblewrap); the demo never runs model-written code without isolation."""
    from keye.tools.sandbox import isolation_report

    report = isolation_report()
    if report["backend"] != "bwrap":
        return False, f"Not available: the sandbox cannot isolate code here ({report['reason']})."
    return True, f"Images only; each question runs its own loop. Sandbox: {report['summary']}."


def same_question(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def truth_panel(sample, graded: dict[str, tuple[str, bool]], model_name: str) -> str:
    """The generated example's ground truth: what the clip shows and each preset question's expected answer, with
    the model's answer and a right/wrong mark once asked."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = [f"| Question | Expected | {model_name} |", "|---|---|---|"]
    for qa in sample.questions:
        said = graded.get(qa.question)
        mark = "" if said is None else f"{cell(said[0]) or '(nothing)'} {'✓' if said[1] else '✗'}"
        rows.append(f"| {cell(qa.question)} | **{cell(qa.answer)}** | {mark} |")
    right = sum(ok for _, ok in graded.values())
    score = f" · {right} of {len(graded)} right so far" if graded else ""
    return f"**Generated example**: *{sample.caption}*{score}\n\n" + "\n".join(rows)
