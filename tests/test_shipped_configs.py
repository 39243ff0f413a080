"""Every shipped keye-tiny YAML runs two optimizer steps as it is shipped: its model (keye-tiny or keye-tiny-base),
freezing, LoRA, precision, schedule and data paths, on data made by the commands its comments name (at a small ``n``),
from the folder a user runs it in. Overridden: ``max_steps=2``, ``save_every=2``, ``export`` (on only where a later
stage's ``init_from`` reads it), Stage 0's ``labels.held_out`` (the tiny data has fewer media than 100) and RL's
``rl.eval_n`` (2 held-out prompts before and after, not 100), ``rl.prompts_per_step`` (1) and ``rl.max_new_tokens``
(at most 32: a 2-step tool SFT export rarely stops on its own), which keep the RL runs to seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "configs" / "pretrain"
POSTTRAIN = ROOT / "configs" / "posttrain"
TINY = sorted(PRETRAIN.glob("*_tiny.yaml")) + sorted(POSTTRAIN.glob("*-tiny.yaml"))
EXPORTED = {
    "stage0_tiny",
    "stage0_motion_tiny",
    "stage2a_tiny",
    "stage2_tiny",
    "stage3_tiny",
    "stage4_tiny",
    "stage4_motion_tiny",
    "thyme-sft-tiny",
}  # read by later stages' init_from (thyme-sft-tiny: Thyme RL's model)
NEEDS = {  # the stages whose exports a config's init_from reads
    "stage0_motion_tiny": ["stage0_tiny"],
    "stage1_tiny": ["stage0_tiny", "stage0_motion_tiny"],
    "stage2a_tiny": ["stage0_tiny", "stage0_motion_tiny"],
    "stage2_tiny": ["stage0_tiny", "stage0_motion_tiny", "stage2a_tiny"],
    "stage3_tiny": ["stage0_tiny", "stage0_motion_tiny", "stage2a_tiny", "stage2_tiny"],
    "stage4_tiny": ["stage0_tiny", "stage0_motion_tiny"],
    "stage4_motion_tiny": ["stage0_tiny", "stage0_motion_tiny", "stage4_tiny"],
    "stage5_tiny": [
        "stage0_tiny",
        "stage0_motion_tiny",
        "stage2a_tiny",
        "stage2_tiny",
        "stage3_tiny",
        "stage4_tiny",
        "stage4_motion_tiny",
    ],
    "thyme-tiny": ["thyme-sft-tiny"],
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding what the YAMLs' comments tell a user to generate (``runs/...``), at a small n."""
    from keye.posttrain.cli import main as posttrain_main
    from keye.pretrain.tiny import prepare_data
    from keye.synthetic.manifest import main as synthetic_main

    root = tmp_path_factory.mktemp("shipped")
    prepare_data(root / "runs/keye-tiny/data", n_video=4, n_image=4, workers=1, n_stage0=4)
    common = ["--text-prob", "0", "--per-sample", "all"]
    out = str(root / "runs/posttrain/data")
    assert posttrain_main(["posttrain-data", "--out", out, "--n", "4", "--tool-sft-n", "4"]) == 0
    assert (
        posttrain_main(
            [
                "posttrain-data",
                "--out",
                str(root / "runs/posttrain/data-count"),
                "--n",
                "4",
                "--fps",
                "8",
                "--duration",
                "4",
                "--max-objects",
                "2",
                "--text-prob",
                "0",
                "--rl-qtypes",
                "count",
                "--tool-sft-n",
                "0",
            ]
        )
        == 0
    )
    for folder, seed, style, objects in (
        ("runs/posttrain/data-count/heldout300", "10300", "mc", "2"),
        ("runs/posttrain/count4/train", "20", "open", "4"),
    ):
        args = ["dataset", str(root / folder), "--n", "3", "--seed", seed, "--question-style", style]
        synthetic_main([*args, *common, "--max-objects", objects, "--qtypes", "count"])
    return root


_done: set[str] = set()


def _run(name: str) -> Path:
    """Run the shipped ``name``.yaml for two steps from the current folder; returns its output folder."""
    from keye.training.config import recipe_config_class

    path = PRETRAIN / f"{name}.yaml" if (PRETRAIN / f"{name}.yaml").exists() else POSTTRAIN / f"{name}.yaml"
    for before in NEEDS.get(name, []):
        if before not in _done:
            _run(before)
    cls = recipe_config_class(path, default="pretrain")
    overrides = ["max_steps=2", "save_every=2", f"export={str(name in EXPORTED).lower()}"]
    if cls.recipe == "labels":
        overrides.append("labels.held_out=1")
    if cls.recipe == "rl":
        overrides.append("rl.eval_n=2")  # held-out accuracy before and after on 2 prompts, not 100
        overrides += [
            "rl.prompts_per_step=1",
            f"rl.max_new_tokens={min(32, _load(path, cls).rl.max_new_tokens)}",
        ]
    if cls.recipe in ("pretrain", "labels"):
        from keye.pretrain.recipe import run
    else:
        import importlib

        run = importlib.import_module(f"keye.posttrain.{'rl' if cls.recipe == 'rl' else cls.recipe}").run
    run(path, overrides)
    _done.add(name)
    return Path(_load(path, cls, overrides).output_dir)


def _load(path: Path, cls, overrides: list[str] | None = None):
    from keye.training import load_config

    return load_config(path, overrides, cls=cls)


@pytest.mark.slow
@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_shipped_tiny_config_runs_two_steps_as_shipped(workdir, monkeypatch, path):
    monkeypatch.chdir(workdir)
    out = _run(path.stem)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert (out / "checkpoints" / "step-000002" / "state.json").exists()
    if path.stem in EXPORTED:
        assert (out / "final" / "weights.safetensors").exists()
