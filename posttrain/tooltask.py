"""A synthetic image task on which code helps, and tool-use SFT conversations that solve it.

`write_tool_task` writes the task, its question types in turn: ``spot`` (the colour of a small shape in one corner of
a large image, a third of a vision token at keye-tiny's input resolution: crop and enlarge), ``measure`` (the width in
pixels of a coloured rectangle: count columns with numpy) and ``zoom`` (a word or digit of the generator's on-screen
text printed too small to read in one corner of a large image: crop that corner at full resolution and read it);
answers are one word or a number (the ``normalized`` verifier scores both), with per-question hints (concept,
strategy, the tool call, the solution) for ``keye rl``'s hint escalation.

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

__all__ = ["TOOL_QTYPES", "tool_example", "write_tool_sft", "write_tool_task"]


_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
}
_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def _corner_box(corner: str, size: int, part: int) -> tuple[int, int, int, int]:
    """The ``corner`` square of side ``size // part`` of a ``size`` x ``size`` image."""
    q = size // part
    x0, y0 = (0 if "left" in corner else size - q), (0 if "top" in corner else size - q)
    return x0, y0, x0 + q, y0 + q


def _crop_code(corner: str, part: int, enlarge: str) -> str:
    """Code that crops the ``corner`` square of side ``w // part`` and enlarges it to ``enlarge`` (an expression of
    its side ``q``): the corner's name is the only thing taken from the question, so one program serves every corner
    and image size."""
    return (
        f"corner = '{corner}'\n"
        f"im = Image.open(image_path); w, h = im.size; q = w // {part}\n"
        "x = 0 if 'left' in corner else w - q\n"
        "y = 0 if 'top' in corner else h - q\n"
        f"im.crop((x, y, x + q, y + q)).resize({enlarge}).save('corner.png')"
    )


def _zoom_sample(rng: np.random.Generator, size: int):
    """A large image (8 x ``size``, a light background of the generator's) of big shapes and, in one corner, a word or
    digit of the generator's on-screen text (`WORDS`, `DIGITS`) laid out as the generator lays out a ``size`` frame's
    text: an eighth of its size at keye-tiny's input resolution, too small to read; the ``size`` x ``size`` corner
    cropped at full resolution (the `spot` program) shows it as the generator's clips do. Measured, asked as the
    benchmark asks: the first keye-tiny v2 file read such crops 35 times in 40 (25% when the word sat anywhere in the
    crop on another background); the shipped file reads 16 of the 32 held-out zoom crops, which bounds what its tool
    use can get on zoom."""
    from PIL import Image, ImageDraw

    from keye.synthetic.world import BACKGROUNDS, DIGITS, WORDS, _font, _stroke, _text_layout

    big = 8 * size
    light = [rgb for rgb, tone in BACKGROUNDS.values() if tone == "light"]
    image = Image.new("RGB", (big, big), light[rng.integers(len(light))])
    draw = ImageDraw.Draw(image)
    names = list(_COLOURS)
    for _ in range(3):  # the shapes stay out of the corner regions
        w, h = (int(v) for v in rng.integers(big // 6, big // 3, 2))
        x0, y0 = (int(rng.integers(size, big - size - v)) for v in (w, h))
        draw.ellipse((x0, y0, x0 + w, y0 + h), fill=_COLOURS[names[rng.integers(len(names))]])
    text = str(rng.choice(DIGITS)) if rng.random() < 0.5 else str(rng.choice(WORDS))
    corner = _CORNERS[rng.integers(4)]
    x0, y0, x1, y1 = _corner_box(corner, big, 8)
    # laid out as the generator lays out a ``size`` frame's text: centred in a band at the top or bottom
    band_h = round(0.3 * size)
    band = (x0, y0, x1, y0 + band_h) if rng.random() < 0.5 else (x0, y1 - band_h, x1, y1)
    fs, box = _text_layout(text, band, rng)
    left, top, _, _ = draw.textbbox((0, 0), text, font=_font(fs), anchor="mm", stroke_width=_stroke(fs))
    ink = (25, 25, 25)
    draw.text((box[0] - left, box[1] - top), text, fill=ink, font=_font(fs), anchor="mm", stroke_width=_stroke(fs),
              stroke_fill=ink)  # fmt: skip
    question = f"A small word or digit is printed in the {corner} corner of the image. What is it? Answer with one word."
    hints = {
        "concept": "The text is too small to read at this size; "
        "a crop of that corner at full resolution makes it legible.",
        "strategy": f"Crop the {corner} corner of the image at full resolution and read the text in the crop.",
        "tool": _crop_code(corner, 8, f"({size}, {size})"),
        "solution": f"The answer is {text}.",
    }
    return image, question, text, hints


def _spot_sample(rng: np.random.Generator, size: int):
    return _spot(rng, size)[:4]


def _spot(rng: np.random.Generator, size: int):
    """A large image (4 x ``size``) of big shapes and, in one corner, a small shape of another colour: about a third
    of a vision token at keye-tiny's input resolution (images are capped at 224 pixels), as large as keye-tiny's
    training objects once that corner is cropped and enlarged to ``size``."""
    from PIL import Image

    from keye.synthetic.render import _sprite
    from keye.synthetic.world import BACKGROUNDS, SHAPES, colours_for_background

    big = 4 * size
    q = big // 8  # the corner region's side
    background = str(rng.choice(list(BACKGROUNDS)))
    image = Image.new("RGB", (big, big), BACKGROUNDS[background][0])
    colours = [str(c) for c in rng.permutation(colours_for_background(background))]
    target, others = colours[0], colours[1:4]
    for colour in others:  # the distractors stay out of the corner regions
        side = int(rng.integers(big // 5, big // 3))
        x, y = (int(v) for v in rng.integers(q, big - q - side, 2))
        sprite = _sprite(str(rng.choice(SHAPES)), colour, side)
        image.paste(sprite, (x, y), sprite)
    shape = str(rng.choice(SHAPES))
    side = int(q * rng.uniform(0.35, 0.45))
    corner = _CORNERS[rng.integers(4)]
    box = _corner_box(corner, big, 8)
    x, y = (int(box[i] + rng.integers(2, q - side - 4)) for i in (0, 1))
    sprite = _sprite(shape, target, side)
    image.paste(sprite, (x, y), sprite)
    question = f"What colour is the small shape in the {corner} corner of the image? Answer with one word."
    hints = {
        "concept": "The shape is too small to see at this size; an enlarged crop of that corner shows it clearly.",
        "strategy": f"Crop the {corner} corner of the image, enlarge it, and look at the shape in the enlarged image.",
        "tool": _crop_code(corner, 8, f"({size}, {size})"),
        "solution": f"The answer is {target}.",
    }
    return image, question, target, hints, others


def tool_example(path: str | Path, *, seed: int, size: int = 112):
    """One ``spot`` image written to ``path`` (PNG) and its question as a `keye.synthetic.QA` whose four options are
    the answer and the colours of the large shapes (the demo's tool-task example)."""
    from keye.synthetic.world import QA

    image, question, answer, _hints, others = _spot(np.random.default_rng([seed, 7]), size)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    values = [answer, *others[:3]]
    np.random.default_rng(seed).shuffle(values)
    options = [f"{letter}. {v}" for letter, v in zip("ABCD", values)]
    return QA("spot", question, answer, options, "ABCD"[values.index(answer)])


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
    question = f"How many pixels wide is the {target} rectangle (RGB {', '.join(map(str, rgb))})? Answer with a number."
    hints = {
        "concept": "The width in pixels is the number of image columns the rectangle covers.",
        "strategy": f"Find the pixels whose colour is exactly {rgb} and count the columns they occupy.",
        "tool": f"a = np.array(Image.open(image_path).convert('RGB')); print((a == {rgb}).all(-1).any(0).sum())",
        "solution": f"The answer is {w}.",
    }
    return image, question, str(w), hints


_SAMPLERS = {"spot": _spot_sample, "measure": _measure_sample, "zoom": _zoom_sample}
TOOL_QTYPES: tuple[str, ...] = tuple(_SAMPLERS)


def _samples(n: int, seed: int, size: int, qtypes: tuple[str, ...] = TOOL_QTYPES):
    """``(qtype, image, question, answer, hints)`` of the task's ``n`` samples, the ``qtypes`` in turn."""
    unknown = set(qtypes) - set(_SAMPLERS)
    if unknown or not qtypes:
        raise ValueError(f"tool task: unknown question types {sorted(unknown)}; choose from {TOOL_QTYPES}")
    rng = np.random.default_rng(seed)
    for i in range(n):
        qtype = qtypes[i % len(qtypes)]
        yield (qtype, *_SAMPLERS[qtype](rng, size))


def _line(
    id_: str, messages: list[dict], qtype: str, answer: str, hints: dict, seed: int, index: int
) -> dict:
    meta = {"qtype": qtype, "answer": answer, "options": [], "style": "open", "hints": hints,
            "source": "synthetic-thyme", "seed": seed, "index": index}  # fmt: skip
    return {"id": id_, "messages": messages, "meta": meta}


def write_tool_task(
    folder: str | Path, *, n: int = 16, seed: int = 0, size: int = 112, qtypes: tuple[str, ...] = TOOL_QTYPES
) -> Path:
    """The task: ``n`` images under ``folder/media`` and ``folder/manifest.jsonl`` (see the module docstring).

    Lines are chat-manifest lines with ``meta.answer`` (a word or a number: use the ``normalized`` verifier) and
    task-specific ``meta.hints``; `keye.posttrain.rl.write_rl_prompts` turns the manifest into RL prompts.
    """
    folder = Path(folder)
    (folder / "media").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (qtype, image, question, answer, hints) in enumerate(_samples(n, seed, size, qtypes)):
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
    if qtype in ("zoom", "spot"):
        imports = "from PIL import Image\n"
        broken = hints["tool"].replace(".resize((", ".resize((0 * ")  # a zero-sized enlargement: ValueError
        fix = "The enlargement needs a positive size, larger than the crop."
        seen = f"the text {answer}" if qtype == "zoom" else f"a {answer} shape"
        reading = f"The enlarged corner shows {seen}."
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
    qtypes: tuple[str, ...] = TOOL_QTYPES,
) -> Path:
    """Tool-use SFT conversations for ``n`` task samples: ``folder/manifest.jsonl``, images under ``folder/media``
    (the sandbox's output images beside them; paths relative to ``folder``, as SFT manifests hold them).

    Every code turn runs in the sandbox (bubblewrap), so the conversation holds its real output; a sample whose run
    does not give the expected result raises. ``recover_share`` of them first write a snippet that fails."""
    folder = Path(folder).resolve()  # the sandbox reports absolute paths; the manifest holds them relative
    (folder / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    lines = []
    for i, (qtype, image, question, answer, hints) in enumerate(_samples(n, seed, size, qtypes)):
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
