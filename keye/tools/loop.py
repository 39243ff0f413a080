"""The Thyme tool loop: the model writes Python, the sandbox runs it, the output returns to the conversation.

    user: images + question
    model: <think>...</think><code>```python ...```</code>      -> sandbox (keye.tools.sandbox.run_snippet)
    user:  <sandbox_output>stdout, errors, new images</sandbox_output>
    model: ... (at most ``max_rounds`` code rounds) ... <answer>...</answer>

The trace (each round's model text, code after repairs, sandbox result and images) is part of the result. The loop
drives anything with ChatSession's ``send(content) -> Reply``; keye's `ChatSession` in practice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from keye.tools.protocol import CODE_CLOSE, ParsedTurn, format_sandbox_output, parse_turn
from keye.tools.sandbox import SandboxConfig, SandboxResult, run_snippet

TOOL_SYSTEM_PROMPT = (
    "You are a visual assistant that can run Python code on the images. Think step by step inside "
    "<think>...</think>. To inspect or transform an image (crop, zoom, rotate, enhance contrast) or to compute, "
    "write one code block as <code>\n```python\n...\n```\n</code>: the first image's path is in the variable "
    "`image_path` and all of them in `image_paths`; print what you need and save new images as PNG files in the "
    "working directory. The result comes back as <sandbox_output>...</sandbox_output>. When you know the answer, "
    "reply with <answer>...</answer>."
)
FINAL_ANSWER_PROMPT = "Give your final answer now, as <answer>...</answer>."


@dataclass
class ToolRound:
    text: str  # what the model wrote
    parsed: ParsedTurn
    result: SandboxResult | None = None  # None when the turn ran no code


@dataclass
class ToolTrace:
    question: str
    rounds: list[ToolRound] = field(default_factory=list)
    answer: str | None = None
    stopped: str = ""  # "answer" | "max_rounds" | "no_action"

    def to_messages(self, images: list[str | Path]) -> list[dict]:
        """The trace as a tool-use SFT conversation (the manifest's ``messages``): model turns are ``assistant``,
        sandbox outputs ``user`` turns with their images, so the loss falls on the model's own turns only."""
        msgs = [{"role": "user", "content": [*({"type": "image", "image": str(p)} for p in images),
                                             {"type": "text", "text": self.question}]}]  # fmt: skip
        for rnd in self.rounds:
            msgs.append({"role": "assistant", "content": rnd.text})
            if rnd.result is not None:
                msgs.append({"role": "user", "content": _sandbox_reply(rnd.result)})
            elif rnd is not self.rounds[-1]:
                msgs.append({"role": "user", "content": FINAL_ANSWER_PROMPT})
        return msgs

    def to_dict(self) -> dict:
        return {
            "question": self.question,
            "answer": self.answer,
            "stopped": self.stopped,
            "rounds": [
                {
                    "text": r.text,
                    "code": r.result.code if r.result else r.parsed.code,
                    "issues": r.parsed.issues,
                    "result": r.result.to_dict() if r.result else None,
                }
                for r in self.rounds
            ],
        }


def _sandbox_reply(result: SandboxResult) -> list[dict]:
    """The environment's turn: ``<sandbox_output>`` text with the new images as image inputs inside it."""
    body = format_sandbox_output(result, image_token="")
    head, tail = body[: -len("</sandbox_output>")], "</sandbox_output>"
    return [{"type": "text", "text": head}, *({"type": "image", "image": p} for p in result.images),
            {"type": "text", "text": tail}]  # fmt: skip


def run_tool_loop(
    session,
    question: str,
    images: list[str | Path],
    *,
    max_rounds: int = 4,
    sandbox: SandboxConfig | None = None,
    out_dir: str | Path | None = None,
    max_new_tokens: int = 512,
    on_round: Callable[[ToolRound], None] | None = None,
) -> ToolTrace:
    """Run the loop until the model answers, or for ``max_rounds`` code rounds and then one demand for an answer.

    ``session`` is a `keye.chat.ChatSession` or `keye.chat.PooledSession` (ideally created with
    ``system=TOOL_SYSTEM_PROMPT``); each turn ends at ``</code>`` (``stop_at``), where the sandbox takes over.
    ``on_round`` is called after each round (the demo streams the trace with it).
    """
    trace = ToolTrace(question=question)
    all_images = [str(p) for p in images]
    content = [*({"type": "image", "image": p} for p in all_images), {"type": "text", "text": question}]
    code_rounds = 0
    while True:
        reply = session.send(content, max_new_tokens=max_new_tokens, stop_at=CODE_CLOSE)
        rnd = ToolRound(text=reply.text, parsed=parse_turn(reply.text))
        trace.rounds.append(rnd)
        done = rnd.parsed.kind == "answer" or bool(trace.stopped)  # answered, or this was the demanded answer
        if done:
            trace.answer = rnd.parsed.answer
            trace.stopped = trace.stopped or "answer"
        elif rnd.parsed.kind == "code" and code_rounds < max_rounds:
            code_rounds += 1
            rnd.result = run_snippet(rnd.parsed.code, all_images, config=sandbox, out_dir=out_dir)
            all_images += rnd.result.images
            content = _sandbox_reply(rnd.result)
        else:  # out of code rounds, or neither code nor answer: demand an answer, once
            trace.stopped = "max_rounds" if rnd.parsed.kind == "code" else "no_action"
            content = [{"type": "text", "text": FINAL_ANSWER_PROMPT}]
        if on_round:
            on_round(rnd)
        if done:
            return trace
