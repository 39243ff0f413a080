"""Pretraining recipe, tier 2: a few steps of every keye-tiny stage YAML on a tiny random model: the loss falls and
exactly the parameters the stage's ``freeze`` section names change."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from keye.training import Trainer, load_config
from keye.training.testing import make_tiny_data, make_tiny_model_folder, tiny_train_config

ROOT = Path(__file__).resolve().parents[1]
# the tiny stages of the LM/contrastive recipe (Stage 0's label phases: tests/test_pretrain_labels.py)
STAGES = [
    p
    for p in sorted((ROOT / "configs" / "pretrain").glob("stage*_tiny.yaml"))
    if "recipe: pretrain" in p.read_text()
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    return make_tiny_model_folder(root / "model"), make_tiny_data(root / "data", n=8)


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.stem)
def test_stage_trains_exactly_its_parameters_and_the_loss_falls(tiny, tmp_path, path):
    from keye.training.model import special_token_ids

    model_dir, data = tiny
    cfg = load_config(path)
    steps = 6
    base = tiny_train_config(
        model_dir, data, tmp_path, "data.rows_per_batch=1", "data.num_workers=0", "data.cache_videos=true"
    )
    # The stage's own objective, freezing, LoRA and RoPE change; a tiny model, tiny data and a few fast steps.
    cfg.model.path, cfg.model.init_from = base.model.path, []
    cfg.data, cfg.output_dir, cfg.max_steps, cfg.save_every, cfg.mixed_precision = (
        base.data,
        str(tmp_path),
        steps,
        steps,
        "no",
    )
    cfg.data.packing = cfg.objective == "lm"
    cfg.data.max_length = 256
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule = 3e-3, 0, "constant"
    trainer = Trainer(cfg).setup()
    model = trainer._unwrapped()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = trainer.train()

    losses = [m["loss"] for m in metrics]
    assert len(losses) == steps and min(losses[-2:]) < losses[0], losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    pattern = [re.compile(p) for p in cfg.freeze.trainable]
    expected = {n for n in before if any(r.match(n) for r in pattern)}
    assert changed == expected, sorted(changed ^ expected)[:6]
    embed = "language_model.embed_tokens.weight"
    if embed in changed and cfg.freeze.token_rows == "special":
        rows = (model.get_parameter(embed) != before[embed]).any(1).nonzero().flatten().tolist()
        assert set(rows) <= set(special_token_ids(model.config)) and rows
    final = trainer.export()
    assert (final / "weights.safetensors").exists() and (final / "model" / "config.json").exists()
    assert (tmp_path / "loss.png").exists() and (tmp_path / "metrics.jsonl").read_text().count("\n") == steps


def test_context_extension_raises_the_rope_base(tiny, tmp_path):
    from keye.training.model import load_model

    model_dir, _ = tiny
    cfg = load_config(None, [f"model.path=random:{model_dir}", "model.rope_theta=8e4"])
    model, _ = load_model(cfg.model)
    assert model.config.text_config.rope_theta == 8e4
    inv = model.language_model.rotary_emb.inv_freq
    dim = model.config.text.head_dim
    torch.testing.assert_close(inv, 1.0 / 8e4 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
