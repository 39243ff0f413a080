"""SFT recipe, tier 1-2: the assistant-only loss mask, thinking / non-thinking data, part-wise LoRA that trains only
adapters, and `keye merge-lora` giving the adapter model's outputs exactly."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import true_runs
from keye.processing import IGNORE_INDEX
from keye.training.testing import make_tiny_data, make_tiny_model_folder, tiny_train_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    return make_tiny_model_folder(root / "model"), make_tiny_data(root / "data", n=4)


def test_loss_covers_exactly_the_assistant_tokens_of_a_two_turn_chat(tiny):
    from keye.processing import KeyeProcessor
    from keye.training.data import encode_sample

    model_dir, data = tiny
    processor = KeyeProcessor.from_pretrained(model_dir)
    media = data["media"].parent
    image = next(p.name for p in (media / "media").iterdir() if p.suffix == ".png")
    record = {
        "messages": [
            {"role": "system", "content": "You are keye."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": f"media/{image}"},
                    {"type": "text", "text": "Colour? /think"},
                ],
            },
            {"role": "assistant", "content": "<think>\nIt looks red.\n</think>\n\nred"},
            {"role": "user", "content": "And the shape? /no_think"},
            {"role": "assistant", "content": "<think>\n\n</think>\n\na star"},
        ]
    }
    s = encode_sample(processor, record, media)
    ids, labels = s["input_ids"], s["labels"]
    trained = labels != IGNORE_INDEX
    assert torch.equal(labels[trained], ids[trained])  # a trained label is the token itself
    spans = true_runs(labels != IGNORE_INDEX)
    texts = [processor.tokenizer.decode(ids[a:b]) for a, b in spans]
    assert texts == [
        "<think>\nIt looks red.\n</think>\n\nred<|im_end|>",
        "<think>\n\n</think>\n\na star<|im_end|>",
    ]
    # Token by token: each trained span starts right after "<|im_start|>assistant\n" and ends at <|im_end|>.
    header = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for a, b in spans:
        assert ids[a - len(header) : a].tolist() == header
        assert ids[b - 1] == im_end and not trained[b]  # the newline after <|im_end|> is not trained
    # Everything else (system, both user turns with the image, headers) is masked.
    assert int(trained.sum()) == sum(b - a for a, b in spans)
    image_id = processor.token_ids["image_pad"]
    assert (ids == image_id).any() and not trained[ids == image_id].any()


def test_thinking_and_non_thinking_forms():
    from keye.posttrain.sft import thinking_record

    rec = {
        "id": "x",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "Q1"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"},
        ],
    }
    think = thinking_record(rec, ["r1", "r2"])
    assert think["messages"][0]["content"][-1] == {"type": "text", "text": " /think"}
    text = [{"type": "text", "text": "<think>\nr1\n</think>\n\n"}, {"type": "text", "text": "A1"}]
    assert think["messages"][1]["content"] == text
    assert think["messages"][2]["content"] == "Q2 /think"
    assert think["messages"][3]["content"][0]["text"] == "<think>\nr2\n</think>\n\n"
    plain = thinking_record(rec, None)
    assert plain["messages"][2]["content"] == "Q2 /no_think"
    assert [p["text"] for p in plain["messages"][3]["content"]] == ["<think>\n\n</think>\n\n", "A2"]
    assert rec["messages"][2]["content"] == "Q2"  # the input is not modified
    with pytest.raises(ValueError, match="2 assistant turns"):
        thinking_record(rec, ["only one"])


def test_write_thinking_mix_keeps_media_reachable(tiny, tmp_path):
    from keye.posttrain.sft import write_thinking_mix

    _, data = tiny
    paths = write_thinking_mix(data["media"], tmp_path / "mix")
    for path in paths.values():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            for part in rec["messages"][0]["content"]:
                if part["type"] in ("image", "video"):
                    assert (path.parent / part[part["type"]]).exists()
    first = json.loads(paths["think"].read_text().splitlines()[1])
    assert first["messages"][-1]["content"][0]["text"].startswith("<think>\nThe question asks")


def test_lora_target_regex_reaches_each_part():
    from keye.posttrain.sft import LoraPartsConfig, lora_target_regex
    from keye.training.config import LoraConfig

    rx = re.compile(
        lora_target_regex(LoraConfig(r=4), LoraPartsConfig(vision=["fc1"], projector=["linear_1"]))
    )
    assert rx.fullmatch("language_model.layers.0.self_attn.q_proj")
    assert not rx.fullmatch("language_model.layers.0.self_attn.k_proj")
    assert rx.fullmatch("vision.encoder.layers.1.mlp.fc1")
    assert not rx.fullmatch("vision.encoder.layers.1.self_attn.q_proj")  # q_proj is the LLM's target only
    assert rx.fullmatch("projector.linear_1") and not rx.fullmatch("projector.linear_2")
    assert lora_target_regex(LoraConfig(r=4), LoraPartsConfig(llm=False)) is None


def test_lora_trains_only_adapters_and_merge_lora_gives_the_same_outputs(tiny, tmp_path):
    from keye import load_pretrained
    from keye.posttrain.sft import LoraPartsConfig, PostTrainConfig, PostTrainer, merge_lora_checkpoint
    from keye.training.config import FreezeConfig, LoraConfig

    model_dir, data = tiny
    base = tiny_train_config(
        model_dir, data, tmp_path / "run", "max_steps=2", "save_every=2", "mixed_precision='no'"
    )
    cfg = PostTrainConfig(
        **{
            **{k: v for k, v in vars(base).items() if k != "recipe"},  # SFT config from a core one
            "lora": LoraConfig(r=4, alpha=8.0),
            "freeze": FreezeConfig(trainable=[r".*\.lora_"]),
        },
        lora_parts=LoraPartsConfig(vision=["fc1"], projector=["linear_1"]),
    )
    trainer = PostTrainer(cfg).setup()
    model = trainer._unwrapped()
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("vision.") and ".lora_" in n for n in names)
    assert any(n.startswith("projector.linear_1.lora_") for n in names)
    assert any(n.startswith("language_model.") and ".lora_" in n for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = trainer.train()
    assert len(metrics) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed), sorted(changed)[:5]
    assert any(".lora_B" in n for n in changed)  # B starts at 0: a changed B means the adapter now acts

    batch = next(iter(trainer.stream))
    inputs = {
        k: batch[k]
        for k in (
            "input_ids",
            "position_ids",
            "pixel_values",
            "image_grid_thw",
            "pixel_values_videos",
            "video_grid_thw",
        )
        if batch.get(k) is not None
    }
    model.eval()
    with torch.no_grad():
        want = model(**inputs, use_cache=False).logits
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    merged_dir = merge_lora_checkpoint(ckpt, tmp_path / "merged")
    merged, _ = load_pretrained(merged_dir, device="cpu", dtype=torch.float32)
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(**inputs, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # The export's delta file merges to the same model.
    final = trainer.export()
    from_delta, _ = load_pretrained(
        merge_lora_checkpoint(final, tmp_path / "merged2"), device="cpu", dtype=torch.float32
    )
    with torch.no_grad():
        torch.testing.assert_close(from_delta(**inputs, use_cache=False).logits, want, atol=1e-5, rtol=1e-4)


def test_no_think_target_tokenizes_like_the_inference_prefill(tiny):
    """The empty think block is pre-filled at inference; SFT must train on the same tokens, then the answer."""
    from keye.posttrain.sft import thinking_record
    from keye.processing import KeyeProcessor

    model_dir, _ = tiny
    processor = KeyeProcessor.from_pretrained(model_dir)
    rec = thinking_record(
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}]}, None
    )
    train = processor(rec["messages"], add_generation_prompt=False)["input_ids"][0].tolist()
    prompt = processor(rec["messages"][:1], think=False)["input_ids"][
        0
    ].tolist()  # ends with the pre-filled block
    answer = processor.tokenizer("B<|im_end|>", add_special_tokens=False)["input_ids"]
    # The prompt's " /no_think" is already in the user turn, so think=False appends it once more: compare the tails.
    block = processor.tokenizer("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
    assert prompt[-len(block) :] == block
    assert train[-len(block) - len(answer) - 1 : -1] == block + answer  # then the trailing newline
