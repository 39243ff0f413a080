"""Post-training recipes, tier 2: every shipped YAML validates; 2-step runs of SFT (full and LoRA), GSPO and DPO/MPO on
a tiny random model with finite losses and changing weights; the CLI registers its subcommands."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from keye.errors import ConfigError
from keye.training import load_config
from keye.training.testing import make_tiny_data, make_tiny_model_folder
from keye.training.trainer import EngineModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "posttrain").glob("*.yaml")) + sorted(
    (ROOT / "configs" / "pretrain").glob("*.yaml")
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_validates(path):
    """Every shipped YAML, as it is, loads into the config class of the recipe it names (its ``recipe:`` key)."""
    from keye.training.config import recipe_config_class

    cls = recipe_config_class(path)
    cfg = load_config(path, cls=cls)
    assert type(cfg) is cls and cfg.name and cfg.output_dir
    assert cfg.labels.data if cfg.recipe == "labels" else cfg.data.sources
    if cfg.lora.r > 0:
        assert any(r.endswith(r"\.lora_") for r in cfg.freeze.trainable)


def test_a_config_runs_only_with_its_recipe(tmp_path):
    from keye.errors import ConfigError
    from keye.posttrain.sft import PostTrainConfig

    dpo = ROOT / "configs" / "posttrain" / "dpo-tiny.yaml"
    with pytest.raises(ConfigError, match=r"dpo-tiny.yaml: recipe: a 'dpo' config; run it with `keye dpo`"):
        load_config(dpo, cls=PostTrainConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: distill\nname: x\n")
    with pytest.raises(ConfigError, match="unknown recipe 'distill'"):
        load_config(bad, cls=PostTrainConfig)


def test_config_errors_name_the_key():
    from keye.errors import ConfigError
    from keye.posttrain.rl import RLConfig

    gspo = ROOT / "configs" / "posttrain" / "gspo-tiny.yaml"
    load_config(gspo, cls=RLConfig)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['nope'\]"):
        load_config(gspo, ["rl.nope=1"], cls=RLConfig)
    with pytest.raises(ConfigError, match="unknown verifier"):
        load_config(None, ["rl.rewards=[{name: nope}]"], cls=RLConfig)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from keye.posttrain.dpo import write_preference_pairs
    from keye.posttrain.rl import write_rl_prompts

    root = tmp_path_factory.mktemp("post")
    data = make_tiny_data(root / "data", n=4)
    manifest = data["media"]
    data["rl"] = write_rl_prompts(manifest, manifest.parent / "rl.jsonl", qtypes=["colour", "shape", "count"])
    data["pairs"] = write_preference_pairs(manifest, manifest.parent / "pairs.jsonl")
    return make_tiny_model_folder(root / "model"), data


def _tiny(path: Path, model: Path, out: Path, sources: list[Path], *extra: str) -> list[str]:
    src = ", ".join(f"{{path: {p}, weight: 1}}" for p in sources)
    return [
        f"model.path=random:{model}",
        f"output_dir={out}",
        f"data.sources=[{src}]",
        "data.max_length=512",
        "max_steps=2",
        "save_every=2",
        "mixed_precision='no'",
        "optim.lr=3e-3",
        "optim.warmup_steps=0",
        "optim.schedule=constant",
        *extra,
    ]


def _changed(model, before: dict) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


@pytest.mark.parametrize("name", ["sft-tiny", "sft-lora-tiny"])
def test_sft_two_steps(tiny, tmp_path, name):
    from keye.posttrain.sft import PostTrainConfig, PostTrainer

    model_dir, data = tiny
    path = ROOT / "configs" / "posttrain" / f"{name}.yaml"
    cfg = load_config(
        path, _tiny(path, model_dir, tmp_path, [data["media"], data["text"]]), cls=PostTrainConfig
    )
    trainer = PostTrainer(cfg).setup()
    model = trainer._unwrapped()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = next(iter(trainer.build_stream()))  # the batch of step 1

    def loss_on_first() -> float:
        with torch.no_grad():
            total, count = trainer._micro_loss(first)
        return total.item() / count

    start = loss_on_first()
    losses = [m["loss"] for m in trainer.train()]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert loss_on_first() < start  # two steps of training lowered the loss on the data they trained on
    changed = _changed(model, before)
    assert changed
    if cfg.lora.r:
        assert all(".lora_" in n for n in changed)
    assert (tmp_path / "checkpoints" / "step-000002" / "trainable.safetensors").exists()


def _register_parity():
    from keye.posttrain.rewards import VERIFIERS, register_verifier

    if "test_parity" not in VERIFIERS:
        # A random model never answers right; a reward that varies within a group gives GSPO non-zero advantages.
        register_verifier("test_parity")(lambda: lambda response, ref: float(len(response) % 2 == 0))


def test_gspo_two_steps(tiny, tmp_path):
    from keye.posttrain.rl import RLConfig, RLTrainer

    _register_parity()
    model_dir, data = tiny
    path = ROOT / "configs" / "posttrain" / "gspo-tiny.yaml"
    extra = [
        "rl.group_size=4",
        "rl.prompts_per_step=2",
        "rl.max_new_tokens=6",
        "rl.updates_per_batch=2",
        "rl.rewards=[{name: test_parity, weight: 1.0}]",
        "rl.success=test_parity",
        "rl.replay_per_prompt=1",
        f"rl.eval_manifest={data['rl']}",
        "rl.eval_n=1",
        "data.max_frames=2",
    ]
    cfg = load_config(path, _tiny(path, model_dir, tmp_path, [data["rl"]], *extra), cls=RLConfig)
    torch.manual_seed(0)
    trainer = RLTrainer(cfg).setup()
    model = trainer._unwrapped()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = trainer.train()
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss"]) and 0 <= m["reward_mean"] <= 1 for m in metrics)
    assert sum(m["groups_trained"] for m in metrics) > 0
    changed = _changed(model, before)
    assert changed and all(".lora_" in n for n in changed)
    assert (tmp_path / "reward.png").exists() and (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
    evals = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["when"] for e in evals] == ["before", "after"]
    assert (trainer.export() / "model" / "config.json").exists()


@pytest.mark.parametrize("loss", ["dpo", "mpo"])
def test_preference_two_steps(tiny, tmp_path, loss):
    from keye.posttrain.dpo import DPOConfig, DPOTrainer

    model_dir, data = tiny
    path = ROOT / "configs" / "posttrain" / f"{loss}-tiny.yaml"
    extra = ["dpo.pairs_per_step=2", "data.max_frames=2"]
    cfg = load_config(path, _tiny(path, model_dir, tmp_path, [data["pairs"]], *extra), cls=DPOConfig)
    from keye.posttrain.dpo import sequence_logps
    from keye.posttrain.preference import dpo_loss

    trainer = DPOTrainer(cfg).setup()
    model = trainer._unwrapped()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = trainer._batch()  # the pairs of step 1
    trainer.position = 0

    def preference_loss() -> float:  # DPO's loss on step 1's pairs: log 2 while the policy is the reference
        with torch.no_grad():
            lp, _ = sequence_logps(model, first)
            ref, _ = sequence_logps(trainer.reference, first)
        b = cfg.dpo.pairs_per_step
        return dpo_loss(lp[:b], lp[b:], ref[:b], ref[b:], beta=cfg.dpo.beta)[0].item()

    assert preference_loss() == pytest.approx(math.log(2), abs=1e-6)
    metrics = trainer.train()
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert preference_loss() < math.log(2) - 1e-4  # the policy now prefers the chosen answers of those pairs
    if loss == "dpo":
        # Step 1: policy == reference, so the DPO loss is exactly log 2.
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    else:
        assert metrics[-1]["delta"] != 0.0
    changed = _changed(model, before)
    assert changed and all(".lora_" in n for n in changed)
    assert not _changed(
        trainer.reference, {n: p.detach().clone() for n, p in trainer.reference.named_parameters()}
    )


def test_cli_registers_the_subcommands():
    from keye.posttrain.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["rl", "--config", "x.yaml", "rl.group_size=4", "--resume"])
    assert args.overrides == ["rl.group_size=4"] and args.resume and callable(args.func)
    args = parser.parse_args(["merge-lora", "run/final", "--out", "merged"])
    assert args.checkpoint == "run/final" and args.out == "merged"
    for cmd in ("sft", "dpo"):
        assert parser.parse_args([cmd, "--config", "c.yaml"]).command == cmd


def test_synthetic_rl_prompts_and_pairs(tiny):
    from keye.posttrain.hints import hint_levels
    from keye.posttrain.rl import PromptStream, reference_of
    from keye.training.config import DataConfig, SourceConfig

    _, data = tiny
    stream = PromptStream(DataConfig(sources=[SourceConfig(path=str(data["rl"]))]), 0)
    items = list(stream.all())
    assert items
    for _pid, messages, ref, hints in items:
        assert messages[-1]["role"] == "user" and ref.answer
        assert len(hint_levels(hints)) == 4  # NONE, concept, strategy, solution
        assert "Hint" not in json.dumps(messages)  # hints enter the prompt only when a group fails
    pairs = [json.loads(x) for x in data["pairs"].read_text().splitlines()]
    assert pairs and all(p["chosen"] != p["rejected"] and p["messages"][-1]["role"] == "user" for p in pairs)
    mc = next(p for p in pairs if p["meta"]["style"] == "mc")
    assert mc["chosen"] == mc["meta"]["answer_letter"] == reference_of(mc).answer


def test_posttrain_data_regime_and_rl_qtypes(tmp_path):
    from keye.posttrain.cli import prepare_data
    from keye.synthetic import load_samples

    paths = prepare_data(
        str(tmp_path),
        n=6,
        size=56,
        duration=2.0,
        fps=4,
        max_objects=1,
        text_prob=0.0,
        rl_qtypes=["count"],
        tool_sft_n=4,
    )
    for name in ("rl_prompts", "rl_heldout"):
        lines = [json.loads(x) for x in Path(paths[name]).read_text().splitlines()]
        assert lines and all(x["meta"]["qtype"] == "count" for x in lines)
    samples = load_samples(tmp_path / "mc" / "samples.jsonl")
    assert all(len(sc.objects) == 1 and sc.text is None for s in samples for sc in s.scenes)


# ---------------------------------------------------------------------------------------------------------------------
# Gradient accumulation: the update of grad_accum micro-batches is the update of the one large batch they make


def _record_step(trainer) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Run one optimizer step; return the micro-batches it drew and the gradients the optimizer stepped with."""
    drawn, grads = [], {}
    source = trainer.micro_batches

    def micro_batches():
        for batch in source():
            drawn.append(batch)
            yield batch

    trainer.micro_batches = micro_batches
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.update(
            {
                n: p.grad.detach().clone()
                for n, p in trainer._unwrapped().named_parameters()
                if p.grad is not None
            }
        )
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.train()
    return drawn, grads


def _large_batch_gradients(model, batches: list[dict], loss_sum) -> dict[str, torch.Tensor]:
    """Gradients of (the loss summed over every unit of ``batches``) / (their number): one large batch's mean."""
    model.zero_grad(set_to_none=True)
    total, count = zip(*(loss_sum(model, b) for b in batches))
    (sum(total) / sum(count)).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_gradients(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys() and got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("accum", [1, 3])
def test_sft_accumulation_is_one_large_batch(tiny, tmp_path, accum):
    import copy

    from keye.posttrain.sft import PostTrainConfig, PostTrainer
    from keye.training.losses import lm_loss_sum

    model_dir, data = tiny
    path = ROOT / "configs" / "posttrain" / "sft-lora-tiny.yaml"
    extra = ["max_steps=1", f"grad_accum={accum}", "optim.max_grad_norm=1e9"]
    cfg = load_config(
        path, _tiny(path, model_dir, tmp_path, [data["media"], data["text"]], *extra), cls=PostTrainConfig
    )
    trainer = PostTrainer(cfg).setup()
    start = copy.deepcopy(trainer._unwrapped())
    batches, grads = _record_step(trainer)
    assert len(batches) == accum and sum(int((b["labels"] != -100).sum()) > 0 for b in batches) == accum
    _assert_same_gradients(grads, _large_batch_gradients(start.train(), batches, lm_loss_sum))


@pytest.mark.parametrize("loss", ["dpo", "mpo"])
def test_preference_accumulation_is_one_large_batch(tiny, tmp_path, loss):
    """Two micro-batches of 2 pairs give the gradient of the 4 pairs' mean loss (before: the last micro-batch's
    loss alone, divided by grad_accum)."""
    import copy

    from keye.posttrain.dpo import DPOConfig, DPOTrainer

    model_dir, data = tiny
    path = ROOT / "configs" / "posttrain" / f"{loss}-tiny.yaml"
    extra = [
        "dpo.pairs_per_step=2",
        "data.max_frames=2",
        "max_steps=1",
        "grad_accum=2",
        "optim.max_grad_norm=1e9",
    ]
    cfg = load_config(path, _tiny(path, model_dir, tmp_path, [data["pairs"]], *extra), cls=DPOConfig)
    trainer = DPOTrainer(cfg).setup()
    start = copy.deepcopy(trainer._unwrapped()).train()
    batches, grads = _record_step(trainer)
    assert len(batches) == 2

    def pair_loss_sum(model, batch):  # the recipe's loss with `model` as the policy
        policy = trainer.model
        trainer.model = EngineModule(model)
        try:
            return trainer._micro_loss(batch)
        finally:
            trainer.model = policy

    trainer.shift.value = 0.0  # MPO's shift as it was during the step (updated after it)
    _assert_same_gradients(grads, _large_batch_gradients(start, batches, pair_loss_sum))


@pytest.mark.parametrize("kl", [0.0, 0.1])
def test_gspo_accumulation_is_one_large_batch(tiny, tmp_path, kl):
    """Four prompts in two micro-batches give the gradient of the mean GSPO loss over all their groups (and of the
    KL term to the reference, when on)."""
    import copy

    from keye.posttrain.rl import RLConfig, RLTrainer

    _register_parity()
    model_dir, data = tiny
    path = ROOT / "configs" / "posttrain" / "gspo-tiny.yaml"
    extra = [
        "rl.group_size=4",
        "rl.prompts_per_step=4",
        "rl.max_new_tokens=6",
        "rl.rewards=[{name: test_parity, weight: 1.0}]",
        "rl.success=test_parity",
        f"rl.kl_coef={kl}",
        "rl.eval_manifest=null",
        "rl.replay_per_prompt=0",
        "data.max_frames=2",
        "max_steps=1",
        "grad_accum=2",
        "optim.max_grad_norm=1e9",
    ]
    cfg = load_config(path, _tiny(path, model_dir, tmp_path, [data["rl"]], *extra), cls=RLConfig)
    torch.manual_seed(0)
    trainer = RLTrainer(cfg).setup()
    start = copy.deepcopy(trainer._unwrapped()).train()
    batches, grads = _record_step(trainer)
    assert [len(b["groups"]) for b in batches] == [2, 2]
    assert (
        sum(len(b["kept"]) for b in batches) >= 2
    )  # groups to learn from (else the test would compare nothing)

    def group_loss_sum(model, batch):  # the recipe's loss with `model` as the policy
        policy = trainer.model
        trainer.model = EngineModule(model)
        try:
            loss, count = trainer._micro_loss(batch)
            return (loss if loss is not None else 0.0), count
        finally:
            trainer.model = policy

    _assert_same_gradients(grads, _large_batch_gradients(start, batches, group_loss_sum))


def test_gspo_grad_accum_must_divide_the_prompts(tiny):
    from keye.posttrain.rl import RLConfig

    path = ROOT / "configs" / "posttrain" / "gspo-tiny.yaml"
    with pytest.raises(ConfigError, match="grad_accum"):
        load_config(path, ["rl.prompts_per_step=3", "grad_accum=2"], cls=RLConfig)


def test_each_rank_draws_its_own_pairs(tiny, tmp_path):
    """DPO under N processes: rank r takes pairs r, r + N, r + 2N, ... of the mix (not every rank the same ones)."""
    import types

    from keye.posttrain.dpo import DPOConfig, DPOTrainer

    model_dir, data = tiny
    path = ROOT / "configs" / "posttrain" / "dpo-tiny.yaml"
    extra = ["dpo.pairs_per_step=2", "data.max_frames=2"]
    trainer = DPOTrainer(
        load_config(path, _tiny(path, model_dir, tmp_path, [data["pairs"]], *extra), cls=DPOConfig)
    ).setup()
    asked = []
    pair = trainer.stream.pair
    trainer.stream.pair = lambda i: asked.append(i) or pair(i)
    for rank in (0, 1):
        trainer.acc, trainer.position = types.SimpleNamespace(num_processes=2, process_index=rank), 0
        trainer._batch()
        trainer._batch()
    assert asked == [0, 2, 4, 6, 1, 3, 5, 7]


def test_each_rank_draws_its_own_prompts(tiny):
    """GSPO under N processes: rank r samples prompts r, r + N, ... of the mix (not every rank the same ones)."""
    from keye.posttrain.rl import RLConfig, RLTrainer

    _register_parity()
    model_dir, data = tiny
    path = ROOT / "configs" / "posttrain" / "gspo-tiny.yaml"
    cfg = load_config(path, [f"data.sources=[{{path: {data['rl']}, weight: 1}}]"], cls=RLConfig)
    stream = RLTrainer(cfg).make_stream(None, cfg.data, None, cfg.seed)
    ids = {rank: [] for rank in (0, 1)}
    for rank in (0, 1):
        position = 0
        for _ in range(3):
            position, (pid, *_) = stream.next(position, rank, 2)
            ids[rank].append(pid)
    single, position = [], 0
    for _ in range(6):
        position, (pid, *_) = stream.next(position)
        single.append(pid)
    assert ids[0] == single[0::2] and ids[1] == single[1::2]  # the two ranks split one process's draws
