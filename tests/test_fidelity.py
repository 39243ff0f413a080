"""Fidelity: a checkpoint in the official Keye-VL-1.5 layout, converted with `keye convert --from-keye`, gives what
the official pipeline gives.

The expected values (``tests/fixtures/fidelity/expected.{json,npz}``) were computed by
``bench/baselines/make_fidelity_fixtures.py`` with vLLM's Keye-VL-1.5 model code, keye-vl-utils 1.5.2 and
transformers' Qwen3 (no keye code), on a tiny random checkpoint that ``bench/baselines/official_tiny.py`` rebuilds
here bit for bit (its sha256 is checked). Everything below goes through the public path: the CLI's conversion,
`load_pretrained`, the processor, the model's forward and `generate`.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_keye

sys.path.insert(0, str(ROOT / "bench" / "baselines"))
import official_tiny as ot  # noqa: E402

EXPECTED = json.loads((ot.FIXTURE / "expected.json").read_text())
ARRAYS = np.load(ot.FIXTURE / "expected.npz")
PROMPTS = list(EXPECTED["prompts"])
SWITCHES = {"/think": True, "/no_think": False}
TOL = 1e-4  # fp32 logits, end to end


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("fidelity")
    sha = ot.build_checkpoint(tmp / "official")
    assert sha == EXPECTED["weights_sha256"], (
        "the rebuilt checkpoint differs from the one the fixture was made on"
    )
    r = run_keye("convert", "--from-keye", str(tmp / "official"), "--out", str(tmp / "keye"))
    assert r.returncode == 0, r.stderr
    media = tmp / "media"
    shutil.copytree(ot.MEDIA, media)
    ot.write_large_image(media / "large.png")
    return tmp / "keye", media


@pytest.fixture(scope="module")
def loaded(converted):
    from keye import load_pretrained

    return load_pretrained(converted[0])


def keye_messages(messages: list[dict], media: Path) -> tuple[list[dict], bool | None]:
    """The fixture's messages with media paths resolved; a trailing /think or /no_think becomes ``think=``."""
    out, think = [], None
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = [
                {**p, p["type"]: str(media / p[p["type"]])} if p["type"] in ("image", "video") else dict(p)
                for p in content
            ]
        out.append({**m, "content": content})
    last = out[-1]["content"]
    text = last if isinstance(last, str) else last[-1]["text"]
    for switch, value in SWITCHES.items():
        if text.endswith(switch):
            think, text = value, text[: -len(switch)]
            if isinstance(last, str):
                out[-1]["content"] = text
            else:
                last[-1]["text"] = text
    return out, think


def model_inputs(batch) -> dict:
    from keye.processing import VISION_INPUTS

    keys = ("input_ids", "attention_mask", "position_ids", *VISION_INPUTS)
    return {k: batch[k] for k in keys if k in batch}


@pytest.mark.parametrize("name", PROMPTS)
def test_converted_model_matches_the_official_pipeline(loaded, converted, name):
    model, processor = loaded
    exp = EXPECTED["prompts"][name]
    messages, think = keye_messages(exp["messages"], converted[1])
    batch = processor(messages, think=think)

    assert batch["input_ids"][0].tolist() == exp["input_ids"]
    assert batch["position_ids"][:, 0].tolist() == exp["position_ids"]
    if "image_grid_thw" in exp:
        assert batch["image_grid_thw"].tolist() == exp["image_grid_thw"]
    if "video_grid_thw" in exp:
        assert batch["video_grid_thw"].tolist() == exp["video_grid_thw"]
        video = batch.videos[0]
        assert [int(k == "fast") for k in video.kinds] == exp["frame_types"][0]
        assert np.allclose(video.times, exp["timestamps"][0], atol=1e-3)

    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits[0].float()  # (T, vocab)
    cols = torch.from_numpy(ARRAYS[f"{name}.columns"])
    last = torch.from_numpy(ARRAYS[f"{name}.logits_last"])
    assert (logits[-1] - last).abs().max() < TOL
    assert (logits[:, cols] - torch.from_numpy(ARRAYS[f"{name}.logits_columns"])).abs().max() < TOL

    with torch.no_grad():
        out = model.generate(
            **model_inputs(batch), max_new_tokens=EXPECTED["new_tokens"], do_sample=False, eos_token_id=None
        )
    assert out[0, batch["input_ids"].shape[1] :].tolist() == exp["greedy"]


@pytest.mark.parametrize("name", ["image", "video"])
def test_bf16_within_the_official_bf16_error(converted, name):
    """In bf16 (vision RoPE in fp32, as the official code), keye's last logits stay as close to the fp32 reference as
    the official implementation's own bf16 run does."""
    from keye import load_pretrained

    model, processor = load_pretrained(converted[0], dtype=torch.bfloat16)
    exp = EXPECTED["prompts"][name]
    messages, think = keye_messages(exp["messages"], converted[1])
    batch = processor(messages, think=think)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model_inputs(batch).items()}
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float()
    ref = torch.from_numpy(ARRAYS[f"{name}.logits_last"])
    official = exp["bf16_max_abs_error"]
    ours = float((logits - ref).abs().max())
    assert ours <= 1.5 * official, (ours, official)


def test_large_images_take_the_official_two_step_grid(converted):
    """keye-vl-utils' fetch_image (<= 16,056,320 px) then the processor's resize (<= 1,003,520 px): the grid keye
    gives a converted model over a scan of sizes, against the two smart_resize steps computed independently."""
    from keye import load_pretrained

    _, processor = load_pretrained(converted[0])

    def rounded(h, w, max_pixels, factor=28, min_pixels=3136):  # keye-vl-utils' smart_resize, transcribed
        hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
        if hb * wb > max_pixels:
            beta = math.sqrt(h * w / max_pixels)
            hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
        elif hb * wb < min_pixels:
            beta = math.sqrt(min_pixels / (h * w))
            hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
        return max(hb, factor), max(wb, factor)

    from PIL import Image

    differs = 0
    for h in range(700, 5200, 431):
        for w in range(900, 4400, 517):
            h1, w1 = rounded(h, w, 16_056_320)
            want = rounded(h1, w1, 1_003_520)
            _, grid = processor.preprocess_image(Image.new("RGB", (w, h)))
            assert [grid[1] * 14, grid[2] * 14] == list(want), (h, w)
            differs += want != rounded(h, w, 1_003_520)
    assert differs > 0  # the scan holds sizes where one resize would give another grid


def test_negative_controls_are_caught(loaded, converted):
    """A wrong time rule or a column-major 2x2 merge is far outside the tolerance the parity tests use."""
    from keye.processing import KeyeProcessor

    model, processor = loaded
    exp = EXPECTED["prompts"]["video"]
    messages, _ = keye_messages(exp["messages"], converted[1])
    wrong_time = KeyeProcessor(processor.tokenizer, processor.settings, tokens_per_second=2.0)
    batch = wrong_time(messages)
    assert batch["position_ids"][:, 0].tolist() != exp["position_ids"]
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits[0, -1]
    assert (logits - torch.from_numpy(ARRAYS["video.logits_last"])).abs().max() > 100 * TOL

    exp = EXPECTED["prompts"]["image"]
    messages, _ = keye_messages(exp["messages"], converted[1])
    batch = processor(messages)
    t, h, w = batch["image_grid_thw"][0].tolist()
    pixels = batch["pixel_values"].view(h // 2, 2, w // 2, 2, -1)
    batch["pixel_values"] = pixels.permute(2, 1, 0, 3, 4).reshape(
        h * w, -1
    )  # blocks transposed: column-major
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits[0, -1]
    assert (logits - torch.from_numpy(ARRAYS["image.logits_last"])).abs().max() > 100 * TOL


def test_to_keye_writes_the_official_layout(converted, tmp_path):
    """keye -> official again: every official tensor name and shape (the pooling head aside, which keye never holds),
    equal values, the config keys the official loader reads, and the processor files."""
    from safetensors.torch import load_file

    r = run_keye("convert", "--to-keye", str(converted[0]), "--out", str(tmp_path / "official"))
    assert r.returncode == 0, r.stderr
    original = converted[0].parent / "official"
    ours, theirs = (
        load_file(str(tmp_path / "official" / "model.safetensors")),
        load_file(str(original / "model.safetensors")),
    )
    head = {k for k in theirs if k.startswith("visual.vision_model.head.")}
    assert set(ours) == set(theirs) - head
    for k, v in ours.items():
        assert v.shape == theirs[k].shape and torch.equal(v.to(theirs[k].dtype), theirs[k]), k

    cfg = json.loads((tmp_path / "official" / "config.json").read_text())
    ref = json.loads((original / "config.json").read_text())
    for key in (
        *ot.TEXT,
        "vocab_size",
        "image_token_id",
        "video_token_id",
        "vision_token_id",
        "tie_word_embeddings",
    ):
        if key == "mrope_section":
            assert cfg["rope_scaling"]["mrope_section"] == ref["rope_scaling"]["mrope_section"]
        else:
            assert cfg[key] == ref[key], key
    for key in (*ot.VISION, "hidden_act", "num_channels"):
        assert cfg["vision_config"][key] == ref["vision_config"][key], key
    pre = json.loads((tmp_path / "official" / "preprocessor_config.json").read_text())
    ref_pre = json.loads((original / "preprocessor_config.json").read_text())
    for key in (
        "min_pixels",
        "max_pixels",
        "patch_size",
        "merge_size",
        "image_mean",
        "image_std",
        "resample",
    ):
        assert pre[key] == ref_pre[key], key
    template = json.loads((tmp_path / "official" / "chat_template.json").read_text())["chat_template"]
    assert "You are a helpful assistant." in template


def test_from_keye_names_a_missing_config_key(converted, tmp_path):
    original = converted[0].parent / "official"
    for drop, where in (("num_key_value_heads", None), ("rope_theta", None), ("patch_size", "vision_config")):
        folder = tmp_path / drop
        shutil.copytree(original, folder)
        cfg = json.loads((folder / "config.json").read_text())
        (cfg[where] if where else cfg).pop(drop)
        (folder / "config.json").write_text(json.dumps(cfg))
        r = run_keye("convert", "--from-keye", str(folder), "--out", str(tmp_path / f"out-{drop}"))
        assert r.returncode == 2, (drop, r.stdout)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert drop in r.stderr and str(folder / "config.json") in r.stderr, r.stderr


def test_video_frame_sizes_follow_keye_vl_utils_at_every_budget(loaded, converted):
    """A converted model plans video frames as keye-vl-utils 1.5.2 does (its budget search and smart_resize), at
    budgets from the minimum for the clip's 8 frames up to the default."""
    _, processor = loaded
    clip = converted[1] / "clip.mp4"
    for case in EXPECTED["video_budgets"]:
        video = processor.load_video(clip, token_budget=case["token_budget"])
        assert [int(k == "fast") for k in video.kinds] == case["frame_types"]
        sizes = {k: [f.height, f.width] for f, k in zip(video.plan.frames, video.kinds)}
        assert sizes["slow"] == case["slow_hw"], case
        assert sizes["fast"] == case["fast_hw"], case
