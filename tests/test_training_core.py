"""Training core, tier 1: configs, data stream, packing, freezing, deltas, merging (tiny random model, seconds)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from keye.errors import ConfigError
from keye.training import load_config
from keye.training.testing import make_tiny_data, make_tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    return make_tiny_model_folder(root / "model"), make_tiny_data(root / "data")


# ---------------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_validates(path):
    from keye.training.config import recipe_config_class

    cfg = load_config(path, cls=recipe_config_class(path))
    assert (cfg.labels.data if cfg.recipe == "labels" else cfg.data.sources) and cfg.freeze.trainable
    assert cfg.max_steps >= 1
    for pattern in [*cfg.freeze.trainable, *cfg.freeze.frozen, *cfg.optim.lr_scale]:
        re.compile(pattern)


def test_shipped_stages_follow_the_recipe():
    stages = {p.stem: load_config(p) for p in YAMLS if "recipe: pretrain" in p.read_text()}
    assert {"stage0", "stage1", "stage2", "stage3"} <= set(stages)
    assert stages["stage0"].objective == "contrastive"
    assert stages["stage1"].freeze.token_rows == "special"
    assert (
        stages["stage3"].model.rope_theta == 8e6
        and stages["stage3"].data.max_length > stages["stage2"].data.max_length
    )
    for p in (ROOT / "configs" / "deepspeed").glob("*.json"):
        assert json.loads(p.read_text())["zero_optimization"]["stage"] in (2, 3)


def test_unknown_keys_and_bad_types_are_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 3\noptim:\n  lr: 1e-4\n  learning_rate: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*learning_rate"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["train.lr=1e-4"])
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(None, ["max_steps=many"])
    cfg = load_config(None, ["optim.lr=3e-4", "data.sources=[{path: a.jsonl, weight: 2}]", "lora.r=4"])
    assert cfg.optim.lr == 3e-4 and cfg.data.sources[0].weight == 2.0 and cfg.lora.r == 4


# ---------------------------------------------------------------------------------------------------------- data


def test_mix_schedule_is_deterministic_and_follows_the_weights():
    from keye.training.data import MixSchedule

    sched = MixSchedule([10, 50], [1, 3], seed=0)
    draws = [sched(i) for i in range(8000)]
    share = sum(s == 1 for s, _ in draws) / len(draws)
    assert abs(share - 0.75) < 0.02
    first = [r for s, r in draws if s == 0][:10]
    assert sorted(first) == list(range(10))  # an epoch visits every row once
    assert draws[5000:5010] == [MixSchedule([10, 50], [1, 3], seed=0)(i) for i in range(5000, 5010)]


def test_malformed_lines_and_unreadable_media_are_skipped_with_line_numbers(tiny, tmp_path, caplog):
    from keye.training.data import TrainStream

    model_dir, data = tiny
    good = data["text"].read_text().splitlines()
    media_line = next(line for line in (data["media"]).read_text().splitlines() if '"video"' in line)
    missing = json.loads(media_line)
    missing["messages"][0]["content"][0]["video"] = str(tmp_path / "nope.mp4")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "\n".join([good[0], "{not json", json.dumps({"id": 1}), json.dumps(missing), good[1]]) + "\n"
    )
    cfg = load_config(
        None, [f"data.sources=[{{path: {manifest}}}]", "data.max_length=64", "data.rows_per_batch=1"]
    )
    from keye.processing import KeyeProcessor

    with caplog.at_level(logging.WARNING):
        stream = TrainStream(cfg.data, KeyeProcessor.from_pretrained(model_dir), seed=0)
        batches = [b for _, b in zip(range(3), iter(stream))]
    assert len(stream.sources[0]) == 3 and stream.sources[0].skipped["malformed"] == 2
    assert stream.stats.skipped_media >= 1
    assert "m.jsonl:2: skipped malformed line" in caplog.text
    assert "m.jsonl:3: skipped malformed line" in caplog.text
    assert "m.jsonl:4: skipped sample" in caplog.text and "nope.mp4" in caplog.text
    assert all(b["num_samples"] >= 1 for b in batches)


def _samples(model_dir, data, n):
    from keye.processing import KeyeProcessor
    from keye.training.data import encode_sample

    processor = KeyeProcessor.from_pretrained(model_dir)
    lines = [json.loads(x) for x in data["media"].read_text().splitlines()[:n]]
    lines += [json.loads(x) for x in data["text"].read_text().splitlines()[:2]]
    samples = [encode_sample(processor, rec, data["media"].parent) for rec in lines]
    return samples, processor.tokenizer.pad_token_id


def test_packed_loss_equals_the_sum_of_separate_losses(tiny):
    from keye.modeling import KeyeForConditionalGeneration
    from keye.training.data import collate_padded, pack_samples
    from keye.training.losses import lm_loss_sum

    model_dir, data = tiny
    samples, pad = _samples(model_dir, data, 5)
    from keye.configuration import KeyeConfig

    torch.manual_seed(0)
    model = KeyeForConditionalGeneration(KeyeConfig.from_pretrained(model_dir)).eval()
    separate = [lm_loss_sum(model, pack_samples([[s]], pad)) for s in samples]
    total = sum(float(loss.detach()) for loss, _ in separate)
    count = sum(n for _, n in separate)
    packed = pack_samples([samples[:4], samples[4:]], pad)  # two rows, right-padded
    assert packed["position_ids"].shape[0] == 4 and packed["attention_mask"] is None
    loss, n = lm_loss_sum(model, packed)
    assert n == count
    assert float(loss.detach()) == pytest.approx(total, rel=1e-5)
    # The step loss is normalised once, over every trained token: packed mean == padded mean == token-weighted mean.
    padded_loss, padded_n = lm_loss_sum(model, collate_padded(samples, pad))
    assert padded_n == count and float(padded_loss.detach()) / padded_n == pytest.approx(
        total / count, rel=1e-5
    )
    # Without per-sample positions the samples would see each other: the check above is not vacuous.
    leaky = dict(packed, position_ids=packed["position_ids"][1:])
    assert float(lm_loss_sum(model, leaky)[0].detach()) != pytest.approx(total, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------- deltas, merge


def test_composed_deltas_equal_sequential_application(tiny, tmp_path):
    from keye.configuration import KeyeConfig
    from keye.deltas import apply_delta, compose_deltas
    from keye.modeling import KeyeForConditionalGeneration

    model_dir, _ = tiny
    torch.manual_seed(0)
    a = KeyeForConditionalGeneration(KeyeConfig.from_pretrained(model_dir))
    b = KeyeForConditionalGeneration(KeyeConfig.from_pretrained(model_dir))
    b.load_state_dict(a.state_dict())
    q = "language_model.layers.0.self_attn.q_proj.weight"
    e = "language_model.embed_tokens.weight"

    def lora(r):
        return {f"{q}.lora_A": torch.randn(r, 64), f"{q}.lora_B": torch.randn(64, r)}

    d1 = {
        **lora(2),
        "projector.linear_2.bias": torch.randn(64),
        f"{e}.rows": torch.tensor([3, 5]),
        f"{e}.row_values": torch.randn(2, 64),
    }
    d2 = {**lora(3), f"{e}.rows": torch.tensor([5, 9]), f"{e}.row_values": torch.randn(2, 64)}
    apply_delta(a, d1)
    apply_delta(a, d2)
    apply_delta(b, compose_deltas([d1, d2]))
    for (n, p), (_, p2) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, p2, rtol=1e-5, atol=1e-5, msg=n)
    # keye-tiny's asset: the stages' final deltas composed, stored in fp16 (row ids stay integers)
    from safetensors.torch import load_file, save_file

    from keye.pretrain.tiny import build_asset

    for name, d in (("s1", d1), ("s2", d2)):
        (tmp_path / name / "final").mkdir(parents=True)
        save_file(d, str(tmp_path / name / "final" / "weights.safetensors"))
    asset = load_file(str(build_asset([tmp_path / "s1", tmp_path / "s2"], tmp_path / "asset.safetensors")))
    assert asset[f"{e}.rows"].dtype == torch.long and asset[f"{q}.lora_A"].dtype == torch.float16
    c = KeyeForConditionalGeneration(KeyeConfig.from_pretrained(model_dir))
    c.load_state_dict(b.state_dict())
    apply_delta(c, compose_deltas([d1, d2]))  # twice, as `b` got it once on top of the same start
    apply_delta(b, asset)
    for (n, p), (_, p2) in zip(c.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, p2, rtol=2e-3, atol=2e-2, msg=n)
    with pytest.raises(ConfigError, match="not in the model"):
        apply_delta(a, {"vision.nope": torch.zeros(1)})


def test_merge_is_the_weighted_average(tmp_path):
    from safetensors.torch import load_file, save_file

    from keye.pretrain.cli import main

    torch.manual_seed(0)
    x = {"w": torch.randn(4, 3), "b": torch.randn(3), "rows": torch.tensor([1, 2])}
    y = {"w": torch.randn(4, 3), "b": torch.randn(3), "rows": torch.tensor([1, 2])}
    for name, t in (("x", x), ("y", y)):
        (tmp_path / name).mkdir()
        save_file(t, str(tmp_path / name / "trainable.safetensors"))
    assert (
        main(
            [
                "merge",
                str(tmp_path / "x"),
                str(tmp_path / "y"),
                "--weights",
                "3",
                "1",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    m = load_file(str(tmp_path / "m" / "weights.safetensors"))
    torch.testing.assert_close(m["w"], 0.75 * x["w"] + 0.25 * y["w"])
    torch.testing.assert_close(m["b"], 0.75 * x["b"] + 0.25 * y["b"])
    assert torch.equal(m["rows"], x["rows"])
    save_file({"w": torch.randn(4, 3)}, str(tmp_path / "z.safetensors"))
    assert (
        main(["merge", str(tmp_path / "x"), str(tmp_path / "z.safetensors"), "--out", str(tmp_path / "n")])
        == 2
    )


def test_batched_videos_keep_their_own_reference_frames(tiny):
    """The projector's temporal branch reads frame indices: batching offsets them, so each video's tokens are the
    same as when it is encoded alone."""
    from keye.configuration import KeyeConfig
    from keye.modeling import KeyeForConditionalGeneration
    from keye.training.data import collate_padded, pack_samples

    model_dir, data = tiny
    samples, pad = _samples(model_dir, data, 16)
    videos = []  # different videos (the manifest asks several questions about each)
    for s in samples:
        if "video_reference_index" in s and not any(
            v["pixel_values_videos"].shape == s["pixel_values_videos"].shape
            and torch.equal(v["pixel_values_videos"], s["pixel_values_videos"])
            for v in videos
        ):
            videos.append(s)
    assert len(videos) >= 2
    other = next(s for s in samples if "video_reference_index" not in s)
    samples = [videos[0], other, videos[1]]  # an image or text sample between them
    config = KeyeConfig.from_pretrained(model_dir)
    config.projector_config.temporal_hidden_size = 16
    torch.manual_seed(0)
    model = KeyeForConditionalGeneration(config).eval()
    torch.nn.init.normal_(model.projector.temporal.linear_2.weight, std=0.1)

    def encode(batch):
        return model.encode_vision(
            batch["pixel_values_videos"], batch["video_grid_thw"], batch["video_reference_index"]
        )

    with torch.no_grad():
        alone = torch.cat([encode(s) for s in videos])
        for batch in (pack_samples([samples[:2], samples[2:]], pad), collate_padded(samples, pad)):
            torch.testing.assert_close(encode(batch), alone)


def test_added_token_rows_start_from_their_pieces(keye_tiny):
    """keye-tiny's <think> and </think> rows are both the mean embedding: with tied embeddings their logits are equal
    at every position. ``model.init_token_rows`` starts them from their sub-word pieces, apart."""
    from keye.training.config import ModelConfig
    from keye.training.model import load_model

    _, processor = keye_tiny
    tok = processor.tokenizer
    think, end = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    before, _ = load_model(ModelConfig(path="keye-tiny"))
    emb = before.get_input_embeddings().weight
    assert torch.equal(emb[think], emb[end])  # the problem
    model, _ = load_model(ModelConfig(path="keye-tiny", init_token_rows=["<think>", "</think>"]))
    emb = model.get_input_embeddings().weight
    pieces = {t: tok.encode(t[0], add_special_tokens=False) + tok.encode(t[1:], add_special_tokens=False)
              for t in ("<think>", "</think>")}  # fmt: skip
    assert [tok.decode([i]) for i in pieces["</think>"]] == ["<", "/", "think", ">"]
    assert torch.allclose(emb[think], emb[pieces["<think>"]].mean(0))
    assert torch.allclose(emb[end], emb[pieces["</think>"]].mean(0))
    assert not torch.allclose(emb[think], emb[end], atol=1e-3)
    h = torch.randn(3, emb.shape[1])
    logits = model.lm_head(h)  # tied: the output rows moved with the input rows
    assert not torch.allclose(logits[:, think], logits[:, end])
    other = [n for n in range(emb.shape[0]) if n not in (think, end)]
    assert torch.equal(emb[other], before.get_input_embeddings().weight[other])
    with pytest.raises(ConfigError, match="init_token_rows.*'think'"):
        load_model(ModelConfig(path="keye-tiny", init_token_rows=["think"]))


def test_a_run_changes_the_card_its_export_carries(keye_tiny):
    """``model.card``: the fields a run changes (a tool-use SFT claims tools); the rest is the base model's card."""
    from keye.configuration import KEYE_TINY_CARD
    from keye.training.config import ModelConfig
    from keye.training.model import load_model

    model, _ = load_model(ModelConfig(path="keye-tiny", card={"tools": True, "notes": "learned the tools"}))
    card = model.config.card
    assert card.tools and card.notes == "learned the tools"
    assert card.answers == KEYE_TINY_CARD.answers and card.thinking == KEYE_TINY_CARD.thinking
    with pytest.raises(ConfigError, match="model.card.*'tool'"):
        load_model(ModelConfig(path="keye-tiny", card={"tool": True}))
