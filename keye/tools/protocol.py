"""The Thyme turn format: parse what the model wrote, format what the sandbox answers.

A model turn is ``<think>...</think>`` followed either by a code request

    <code>
    ```python
    ...
    ```
    </code>

or by a final ``<answer>...</answer>``. Thyme's own traces also put the code block inside an unclosed
``<think>`` (generation stops at ``</code>``), so the code block is searched for anywhere in the turn. The
environment answers with ``<sandbox_output>text<image>...</sandbox_output>``.

Rules for imperfect output (each deviation is listed in `ParsedTurn.issues`, which a format reward can use):

- whichever of ``<code>`` and ``<answer>`` opens first decides the turn: text after the first ``</code>`` was not
  seen by the environment, and an answer given before a code block is final;
- only the FIRST code block runs and only the FIRST answer counts (generation should have stopped there);
- an unclosed ``<code>`` or ``<answer>`` runs to the end of the turn; an unclosed fence runs to ``</code>``;
- ``<code>`` without a fence runs its whole content; a bare ```python fence without ``<code>`` tags is run only
  when the turn has no ``<answer>`` at all;
- ``<think>`` may be missing or unclosed; its text ends at ``</think>``, ``<code>`` or ``<answer>``.

This module is pure string handling: it neither runs code nor imports the sandbox.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["CODE_CLOSE", "CODE_OPEN", "PROTOCOL_TAGS", "ParsedTurn", "format_sandbox_output", "parse_turn"]

PROTOCOL_TAGS = ("think", "code", "answer", "sandbox_output")
# A model turn ends with the token that completes CODE_CLOSE (the environment runs the code there), in chat, the
# demo and RL alike: `keye.tools.loop.run_tool_loop` sends every turn with ``stop_at=CODE_CLOSE``.
CODE_OPEN, CODE_CLOSE = "<code>", "</code>"
_FENCE = re.compile(r"(`{3,}|~{3,})[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n")


@dataclass
class ParsedTurn:
    """One model turn. `kind` is "code", "answer" or "none" (neither: the loop should ask for one)."""

    think: str | None = None
    code: str | None = None
    answer: str | None = None
    issues: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "code" if self.code is not None else "answer" if self.answer is not None else "none"

    @property
    def format_ok(self) -> bool:
        """Well-formed: a closed or code-interrupted <think>, then exactly one well-formed request or answer."""
        return self.think is not None and self.kind != "none" and not self.issues


def _find(text: str, tag: str, start: int = 0) -> int:
    return text.find(tag, start)


def _extract_fenced(body: str, issues: list[str]) -> str | None:
    """The first fenced block in `body` (None if there is no fence)."""
    m = _FENCE.search(body)
    if m is None:
        return None
    fence = m.group(1)
    start = m.end()
    close = re.compile(r"^[ \t]*" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}[ \t]*$", re.M)
    end_m = close.search(body, start)
    if end_m is None:
        inline = body.find(fence, start)  # closing fence glued to the last line: "print(x)```"
        if inline == -1:
            issues.append("unclosed ``` fence")
            return body[start:]
        return body[start:inline]
    return body[start : end_m.start()]


def parse_turn(text: str) -> ParsedTurn:
    """Parse one model turn; never raises. See the module docstring for the rules."""
    turn = ParsedTurn()
    issues = turn.issues
    code_at = _find(text, "<code>")
    answer_at = _find(text, "<answer>")

    think_at = _find(text, "<think>")
    if think_at == -1:
        issues.append("missing <think>")
    else:
        start = think_at + len("<think>")
        ends = [i for i in (_find(text, "</think>", start), code_at, answer_at) if i >= start]
        end = min(ends) if ends else len(text)
        turn.think = text[start:end].strip()
        closed = _find(text, "</think>", start)
        if closed == -1 and code_at == -1:  # an open <think> is normal only when interrupted by a code block
            issues.append("unclosed <think>")

    code_first = code_at != -1 and (answer_at == -1 or code_at < answer_at)
    if code_first:
        start = code_at + len("<code>")
        end = _find(text, "</code>", start)
        if end == -1:
            issues.append("unclosed <code>")
            end = len(text)
        body = text[start:end]
        code = _extract_fenced(body, issues)
        if code is None:
            issues.append("no ``` fence inside <code>")
            code = body
        turn.code = code.strip("\n")
        if _find(text, "<code>", end) != -1:
            issues.append("more than one <code> block; only the first runs")
        if not turn.code.strip():
            issues.append("empty <code> block")
            turn.code = None
        return turn

    if answer_at != -1:
        start = answer_at + len("<answer>")
        end = _find(text, "</answer>", start)
        if end == -1:
            issues.append("unclosed <answer>")
            end = len(text)
        turn.answer = text[start:end].strip()
        if _find(text, "<answer>", end) != -1:
            issues.append("more than one <answer>; only the first counts")
        return turn

    # Neither tag: accept a bare python fence as a code request (but say so).
    search_from = _find(text, "</think>")
    body = text[search_from:] if search_from != -1 else text
    m = _FENCE.search(body)
    if m is not None and m.group(2).lower() in ("python", "py", "python3"):
        code = _extract_fenced(body, issues)
        if code is not None and code.strip():
            issues.append("code fence without <code> tags")
            turn.code = code.strip("\n")
            return turn
    issues.append("neither <code> nor <answer>")
    return turn


class _ResultLike(Protocol):
    ok: bool
    stdout: str
    images: list[str]
    error: str | None
    killed_by: str | None
    stdout_truncated: bool


def _neutralize(text: str, image_token: str) -> str:
    """Defang protocol tags and image tokens printed by the snippet.

    Printed text must not open or close a tag of the conversation, and must not add an image placeholder: the
    processor would then count more placeholders than images.
    """
    for tag in PROTOCOL_TAGS:
        text = text.replace(f"<{tag}>", f"&lt;{tag}&gt;").replace(f"</{tag}>", f"&lt;/{tag}&gt;")
    if image_token:
        text = text.replace(image_token, image_token.replace("<", "&lt;").replace(">", "&gt;"))
    return text


def format_sandbox_output(result: _ResultLike, *, image_token: str = "<image>", max_chars: int = 4000) -> str:
    """The environment's reply: ``<sandbox_output>`` + stdout + error + one `image_token` per new image.

    `result` is a `keye.tools.sandbox.SandboxResult`. With ``image_token=""`` no placeholders are written (the
    caller attaches the images itself). Stdout longer than `max_chars` is cut in the middle
    (start and end are what a model needs). The images themselves are the next turn's image inputs, in the
    order of `result.images`, one per `image_token`.
    """
    parts: list[str] = []
    text = result.stdout.strip()
    if len(text) > max_chars:
        half = max_chars // 2
        text = f"{text[:half]}\n... [{len(text) - 2 * half} characters cut] ...\n{text[-half:]}"
    elif result.stdout_truncated:
        text += "\n... [output truncated]"
    if text:
        parts.append(_neutralize(text, image_token))
    if not result.ok and result.error:
        parts.append(_neutralize(f"Error: {result.error}", image_token))
    if not parts and not result.images:
        parts.append("(no output)")
    body = "\n".join(parts)
    if result.images and image_token:  # an empty token: the caller places the images itself
        body = (body + "\n" if body else "") + image_token * len(result.images)
    return f"<sandbox_output>{body}</sandbox_output>"
