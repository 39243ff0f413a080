"""KeyeProcessor: chat layout, pad counts, labels, think switches, context errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from keye.errors import ContextLengthError


@pytest.fixture(scope="module")
def image_path(media_dir):
    path = media_dir / "img.png"
    Image.fromarray((np.random.default_rng(0).random((90, 130, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_pad_counts_equal_model_tokens(keye_tiny, image_path, sample_video):
    model, processor = keye_tiny
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": str(sample_video)},
                {"type": "image", "image": str(image_path)},
                {"type": "text", "text": "Compare them."},
            ],
        }
    ]
    inputs = processor(msgs)
    ids = inputs["input_ids"]
    with torch.no_grad():
        img_tokens = model.encode_vision(inputs["pixel_values"], inputs["image_grid_thw"])
        vid_tokens = model.encode_vision(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    assert int((ids == model.config.image_token_id).sum()) == img_tokens.shape[0]
    assert int((ids == model.config.video_token_id).sum()) == vid_tokens.shape[0]
    # one grid row per sampled frame, in order; frames marked and timestamped in the prompt
    video = inputs.videos[0]
    assert inputs["video_grid_thw"].shape[0] == len(video.frames) >= 1
    text = processor.decode(ids[0], skip_special_tokens=False)
    assert text.count("<|frame|>") == len(video.frames)
    assert text.count("<|fast_start|>") == text.count("<|fast_end|>") == video.kinds.count("fast")
    assert f"<|frame|>{video.times[0]:.1f}" in text
    assert inputs["position_ids"].shape == (3, 1, ids.shape[1])
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == ids.shape


def test_reference_frames_count_over_the_videos_of_a_batch(keye_tiny, sample_video):
    from keye.encoders.slowfast import reference_frames

    _, processor = keye_tiny
    two = [{"type": "video", "video": str(sample_video)}, {"type": "video", "video": str(sample_video)}]
    inputs = processor([{"role": "user", "content": [*two, {"type": "text", "text": "Same?"}]}])
    refs = reference_frames(inputs.videos[0].kinds)
    assert inputs["video_reference_index"].tolist() == refs + [len(refs) + r for r in refs]
    assert inputs["video_reference_index"].shape[0] == inputs["video_grid_thw"].shape[0]


def test_labels_cover_assistant_turns_only(keye_tiny):
    _, processor = keye_tiny
    msgs = [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "one two three"},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "one two three"},
    ]
    inputs = processor(msgs, add_generation_prompt=False, return_labels=True)
    ids, labels = inputs["input_ids"][0], inputs["labels"][0]
    trained = ids[labels != -100]
    answer = processor.tokenizer("one two three<|im_end|>", add_special_tokens=False)["input_ids"]
    assert trained.tolist() == answer * 2
    assert torch.equal(labels[labels != -100], trained)


def test_python_render_matches_jinja_template(keye_tiny):
    _, processor = keye_tiny
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    for think in (None, False):
        jinja = processor.tokenizer.apply_chat_template(
            msgs if think is None else msgs[:-1] + [{"role": "user", "content": "Bye /no_think"}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=think is not False,
        )
        ours = "".join(
            p if isinstance(p, str) else "<|vision_start|><|image_pad|><|vision_end|>"
            for _, p in processor.render(msgs, True, think)
        )
        assert ours == jinja


def test_think_switches(keye_tiny):
    _, processor = keye_tiny
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    think = processor.decode(processor(msgs, think=True)["input_ids"][0], skip_special_tokens=False)
    no_think = processor.decode(processor(msgs, think=False)["input_ids"][0], skip_special_tokens=False)
    assert think.endswith("Why is the sky blue? /think<|im_end|>\n<|im_start|>assistant\n")
    assert no_think.endswith("/no_think<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_over_long_prompt_is_a_clear_error(keye_tiny, sample_video):
    _, processor = keye_tiny
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": str(sample_video)},
                {"type": "text", "text": "word " * 9000},
            ],
        }
    ]
    with pytest.raises(ContextLengthError, match="sample.mp4.*more than the context of 8192"):
        processor(msgs)
    # an already loaded video is named by its file, never by its repr (megabytes of pixel arrays)
    msgs[0]["content"][0]["video"] = processor.load_video(str(sample_video))
    with pytest.raises(ContextLengthError) as err:
        processor(msgs)
    assert str(err.value).startswith(f"{sample_video}: prompt needs") and len(str(err.value)) < 300


def test_short_clip_gives_a_frame(keye_tiny, media_dir):
    from keye.encoders.video import write_video

    _, processor = keye_tiny
    path = write_video(media_dir / "short.mp4", [np.full((64, 64, 3), 90, np.uint8)] * 3, fps=10)  # 0.3 s
    video = processor.load_video(str(path))
    assert len(video.frames) >= 1


def test_settings_nest_the_slowfast_config_and_read_old_files():
    """`ProcessorSettings.video` is the Slow-Fast config itself (no copied fields); keye_processor.json files written
    flat by keye <= 0.1 load into it."""
    import json
    from dataclasses import asdict

    from keye.encoders.slowfast import SlowFastConfig
    from keye.settings import TINY_SETTINGS, ProcessorSettings

    tiny = ProcessorSettings.from_dict(TINY_SETTINGS)
    assert isinstance(tiny.video, SlowFastConfig) and tiny.video.max_frames == 16
    assert tiny.video_config(fps=1.0, token_budget=None) == SlowFastConfig(
        **{**asdict(tiny.video), "fps": 1.0}
    )
    assert tiny.video_config(slowfast=False).enabled is False  # keye 0.1's name of the switch still works
    assert (
        ProcessorSettings.from_dict(json.loads(json.dumps(asdict(tiny)))) == tiny
    )  # the saved file round-trips
    old = {
        "fps": 1.0,
        "max_frames": 8,
        "slowfast": False,
        "video_resample": "bicubic",
        "video_budget_rule": "reference",
    }
    legacy = ProcessorSettings.from_dict({**old, "max_length": 4096, "tokens_per_second": 2.0})
    assert legacy.max_length == 4096
    assert legacy.video == SlowFastConfig(
        fps=1.0, max_frames=8, enabled=False, resample="bicubic", budget_rule="reference"
    )
    with pytest.raises(ValueError, match=r"\['video.nope'\]"):
        ProcessorSettings.from_dict({"video": {"nope": 1}})
