"""The Thyme tool task: the answer is out of reach at keye-tiny's input resolution and within reach after the
hint's code has run (run here on the image as the sandbox would run it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from keye.posttrain.tooltask import TOOL_QTYPES, write_tool_task
from keye.synthetic.world import COLOURS


def _run_hint(code: str, image_path: str, cwd) -> Image.Image:
    import os

    here = os.getcwd()
    os.chdir(cwd)
    try:
        exec(code, {"Image": Image, "np": np, "image_path": image_path})  # the hint, as the sandbox runs it
    finally:
        os.chdir(here)
    return Image.open(cwd / "corner.png").convert("RGB")


def _extent(a: np.ndarray, rgb) -> int:
    """The larger side of the box around the pixels within 40 of ``rgb`` (anti-aliased edges count less)."""
    ys, xs = np.nonzero(np.abs(a.astype(int) - rgb).max(-1) < 40)
    return 0 if len(xs) == 0 else max(np.ptp(xs), np.ptp(ys)) + 1


def test_spot_needs_the_crop_and_the_crop_shows_the_answer(tmp_path, keye_tiny):
    _, processor = keye_tiny
    manifest = write_tool_task(tmp_path, n=12, seed=5, qtypes=("spot",))
    for line in map(json.loads, manifest.read_text().splitlines()):
        path = tmp_path / line["messages"][0]["content"][0]["image"]
        image = Image.open(path).convert("RGB")
        rgb = COLOURS[line["meta"]["answer"]]
        inputs = processor([{"role": "user", "content": [{"type": "image", "image": str(path)}]}])
        side = int(inputs["image_grid_thw"][0][1]) * 14  # what keye-tiny sees of it
        seen = np.asarray(image.resize((side, side), Image.Resampling.BILINEAR))
        assert (
            _extent(seen, rgb) <= 14 < _extent(np.asarray(image), rgb)
        )  # under half a 28-pixel vision token
        crop = np.asarray(_run_hint(line["meta"]["hints"]["tool"], str(path), tmp_path))
        assert crop.shape[:2] == (112, 112) and 30 <= _extent(crop, rgb) <= 56  # keye-tiny's training objects
        others = {tuple(v) for v in crop.reshape(-1, 3)} & {c for n, c in COLOURS.items() if c != rgb}
        assert not others  # nothing else in the corner


def test_every_question_type_in_turn_and_unknown_ones_are_errors(tmp_path):
    manifest = write_tool_task(tmp_path, n=7, seed=0)
    qtypes = [json.loads(x)["meta"]["qtype"] for x in manifest.read_text().splitlines()]
    assert qtypes == [*TOOL_QTYPES, *TOOL_QTYPES, TOOL_QTYPES[0]]
    with pytest.raises(ValueError, match="unknown question types.*'read'"):
        write_tool_task(tmp_path / "x", n=1, qtypes=("read",))


def test_zoom_text_is_too_small_to_read_and_the_crop_shows_it_at_the_generator_size(tmp_path, keye_tiny):
    from keye.synthetic.world import DIGITS, WORDS

    _, processor = keye_tiny
    manifest = write_tool_task(tmp_path, n=8, seed=3, qtypes=("zoom",))
    ink = (25, 25, 25)
    for line in map(json.loads, manifest.read_text().splitlines()):
        assert line["meta"]["answer"] in (*DIGITS, *WORDS)
        path = tmp_path / line["messages"][0]["content"][0]["image"]
        image = Image.open(path).convert("RGB")
        inputs = processor([{"role": "user", "content": [{"type": "image", "image": str(path)}]}])
        side = int(inputs["image_grid_thw"][0][1]) * 14  # what keye-tiny sees of it
        seen = np.asarray(image.resize((side, side), Image.Resampling.BILINEAR))
        assert _extent(seen, ink) <= 28  # the whole word within one vision token
        # the hint's crop, at full resolution: the generator's own text in a 112-px frame (font 25 px: 0.75 x a
        # 34-px band; a word up to 0.8 of the frame wide)
        crop = np.asarray(_run_hint(line["meta"]["hints"]["tool"], str(path), tmp_path))
        assert crop.shape[:2] == (112, 112) and 18 <= _extent(crop, ink) <= 92
