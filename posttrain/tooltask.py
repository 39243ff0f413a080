"""A synthetic image task on which code helps, and tool-use SFT conversations that solve it.

`write_tool_task` writes the task: half the images hold a two-digit number printed too small to read in one corner
(``qtype: zoom``: crop and enlarge), half ask the width in pixels of a coloured rectangle (``qtype: measure``: count
columns with numpy); numeric answers, and per-question hints (concept, strategy, the tool call, the solution) for
``keye rl``'s hint escalation.

`write_tool_sft` turns the same kind of samples into tool-use SFT conversations: for each, the Thyme loop
(`keye.tools.loop.run_tool_loop`, the real sandbox) runs a scripted model that thinks, writes the code of the hint,
reads the sandbox's output (text or the new image) and answers; a share of them first writes a snippet that fails
and recovers from the error. The conversation is the tool system prompt and `ToolTrace.to_messages`, so the SFT loss
falls on the model's turns only and the sandbox's output (text and images) is input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from keye.chat import Reply
from keye.tools.loop import TOOL_SYSTEM_PROMPT, run_tool_loop
from keye.tools.sandbox import SandboxConfig

__all__ = ["write_tool_sft", "write_tool_task"]


_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
}
_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def _zoom_sample(rng: np.random.Generator, size: int):
    """A few large shapes and, in one corner, a two-digit number printed too small to read without zooming."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(image)
    names = list(_COLOURS)
    for _ in range(3):
        x0, y0 = (int(v) for v in rng.integers(size // 6, size // 2, 2))
        w, h = (int(v) for v in rng.integers(size // 6, size // 3, 2))
        draw.ellipse((x0, y0, x0 + w, y0 + h), fill=_COLOURS[names[rng.integers(len(names))]])
    number = int(rng.integers(10, 100))
    font = ImageFont.load_default(size=max(6, size // 16))
    left, top, right, bottom = draw.textbbox((0, 0), str(number), font=font)
    w, h = right - left + 2, bottom - top + 2
    corner = _CORNERS[rng.integers(4)]
    x = 1 if "left" in corner else size - w - 1
    y = 1 if "top" in corner else size - h - 1
    draw.rectangle((x, y, x + w, y + h), fill=(255, 255, 255))
    draw.text((x + 1 - left, y + 1 - top), str(number), fill=(0, 0, 0), font=font)
    q = size // 3
    box = (0 if "left" in corner else size - q, 0 if "top" in corner else size - q)
    box = (*box, box[0] + q, box[1] + q)
    question = (
        f"A small number is printed in the {corner} corner of the image. What is it? Answer with the number."
    )
    hints = {
        "concept": "The number is too small to read at this size; an enlarged crop of that corner makes it legible.",
        "strategy": f"Crop the {corner} corner of the image, enlarge it, and read the number from the enlarged image.",
        "tool": f"Image.open(image_path).crop({box}).resize(({4 * q}, {4 * q})).save('corner.png')",
        "solution": f"The answer is {number}.",
    }
    return image, question, str(number), hints


def _measure_sample(rng: np.random.Generator, size: int):
    """Coloured rectangles; the question asks the width in pixels of one of them (drawn last, so fully visible)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    names = [str(c) for c in rng.permutation(list(_COLOURS))[:3]]
    widths = [int(rng.integers(size // 8, size * 3 // 4)) for _ in names]
    for name, w in zip(names, widths):
        h = int(rng.integers(size // 8, size // 3))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        draw.rectangle((x0, y0, x0 + w - 1, y0 + h - 1), fill=_COLOURS[name])
    target, rgb, w = names[-1], _COLOURS[names[-1]], widths[-1]
    question = f"How many pixels wide is the {target} rectangle? Answer with a number."
    hints = {
        "concept": "The width in pixels is the number of image columns the rectangle covers.",
        "strategy": f"Find the pixels whose colour is exactly {rgb} and count the columns they occupy.",
        "tool": f"a = np.array(Image.open(image_path).convert('RGB')); print((a == {rgb}).all(-1).any(0).sum())",
        "solution": f"The answer is {w}.",
    }
    return image, question, str(w), hints


def _samples(n: int, seed: int, size: int):
    """``(qtype, image, question, answer, hints)`` of the task's ``n`` samples: zoom and measure in turn."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        qtype = ("zoom", "measure")[i % 2]
        yield (qtype, *(_zoom_sample if qtype == "zoom" else _measure_sample)(rng, size))


def _line(
    id_: str, messages: list[dict], qtype: str, answer: str, hints: dict, seed: int, index: int
) -> dict:
    meta = {"qtype": qtype, "answer": answer, "options": [], "style": "open", "hints": hints,
            "source": "synthetic-thyme", "seed": seed, "index": index}  # fmt: skip
    return {"id": id_, "messages": messages, "meta": meta}


def write_tool_task(folder: str | Path, *, n: int = 16, seed: int = 0, size: int = 112) -> Path:
    """The task: ``n`` images under ``folder/media`` and ``folder/manifest.jsonl`` (see the module docstring).

    Lines are chat-manifest lines with ``meta.answer`` (a number: use the ``number`` verifier) and task-specific
    ``meta.hints``; `keye.posttrain.rl.write_rl_prompts` turns the manifest into RL prompts.
    """
    folder = Path(folder)
    (folder / "media").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (qtype, image, question, answer, hints) in enumerate(_samples(n, seed, size)):
        media = f"media/thyme-{seed}-{i:05d}.png"
        image.save(folder / media)  # PNG: lossless, so the colours the hints name are exact
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "image": media}, {"type": "text", "text": question}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        lines.append(_line(f"thyme-{seed}-{i:05d}-{qtype}", messages, qtype, answer, hints, seed, i))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest


# ----------------------------------------------------------------------------------------------------------------------
# Tool-use SFT conversations
# ----------------------------------------------------------------------------------------------------------------------


class _Script:
    """Plays the model in `run_tool_loop`: its turns, in order."""

    def __init__(self, turns: list[str]):
        self.turns = list(turns)

    def send(self, content, **kwargs) -> Reply:
        return Reply(text=self.turns.pop(0), num_tokens=0, prompt_tokens=0)


def _code_turn(think: str, code: str) -> str:
    return f"<think>{think}</think><code>\n```python\n{code}\n```\n</code>"


def _script(qtype: str, answer: str, hints: dict, recover: bool) -> list[str]:
    """The model's turns for one sample: (a failing snippet,) the hint's code, the answer read from its output."""
    if qtype == "zoom":
        imports = "from PIL import Image\n"
        broken = hints["tool"].replace(".resize((", ".resize((0 * ")  # a zero-sized enlargement: ValueError
        fix = "The enlargement needs a positive size: four times the crop."
        reading = f"The enlarged corner shows the number {answer}."
    else:
        imports = "import numpy as np\nfrom PIL import Image\n"
        broken = hints["tool"].replace(".any(0)", ".any(2)")  # an axis the mask does not have: AxisError
        fix = "The mask has two axes; the columns are axis 0 of its any()."
        reading = f"The code counted {answer} columns of that colour."
    turns = [_code_turn(f"{hints['concept']} {hints['strategy']}", imports + hints["tool"])]
    if recover:
        turns = [_code_turn(f"{hints['concept']} {hints['strategy']}", imports + broken),
                 _code_turn(fix, imports + hints["tool"])]  # fmt: skip
    return [*turns, f"<think>{reading}</think><answer>{answer}</answer>"]


def write_tool_sft(
    folder: str | Path,
    *,
    n: int = 16,
    seed: int = 0,
    size: int = 112,
    recover_share: float = 0.25,
    sandbox: SandboxConfig | None = None,
) -> Path:
    """Tool-use SFT conversations for ``n`` task samples: ``folder/manifest.jsonl``, images under ``folder/media``
    (the sandbox's output images beside them; paths relative to ``folder``, as SFT manifests hold them).

    Every code turn runs in the sandbox (bubblewrap), so the conversation holds its real output; a sample whose run
    does not give the expected result raises. ``recover_share`` of them first write a snippet that fails."""
    folder = Path(folder).resolve()  # the sandbox reports absolute paths; the manifest holds them relative
    (folder / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    lines = []
    for i, (qtype, image, question, answer, hints) in enumerate(_samples(n, seed, size)):
        id_ = f"thyme-sft-{seed}-{i:05d}"
        media = f"media/{id_}.png"
        image.save(folder / media)
        recover = bool(rng.random() < recover_share)
        trace = run_tool_loop(
            _Script(_script(qtype, answer, hints, recover)),
            question,
            [folder / media],
            sandbox=sandbox,
            out_dir=folder / "media" / id_,
        )
        runs = [r.result for r in trace.rounds if r.result is not None]
        if trace.answer != answer or not runs[-1].ok or [r.ok for r in runs[:-1]] != [False] * recover:
            raise RuntimeError(f"{id_}: the scripted solution did not run as planned: {trace.to_dict()}")
        if qtype == "measure" and runs[-1].stdout.strip() != answer:
            raise RuntimeError(f"{id_}: the code printed {runs[-1].stdout.strip()!r}, not {answer}")
        messages = [
            {**m, "content": [{**p, "image": str(Path(p["image"]).relative_to(folder))} if p["type"] == "image"
                              else p for p in m["content"]]} if isinstance(m["content"], list) else m
            for m in trace.to_messages([folder / media])
        ]  # fmt: skip
        messages.insert(0, {"role": "system", "content": TOOL_SYSTEM_PROMPT})  # as chat --tools and RL run it
        lines.append(_line(f"{id_}-{qtype}", messages, qtype, answer, hints, seed, i) | {"recover": recover})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest
