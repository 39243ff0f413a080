"""Training core, tier 3: each recipe as users launch it on several processes, through `accelerate launch` with the
shipped 2-process config (gloo on the CPU): pretraining, SFT and GSPO run on 2 ranks, are killed with ``kill -9``
after a checkpoint, resume, and end exactly where an uninterrupted 2-process run ends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from keye.training.testing import make_tiny_data, make_tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 8, 2

# A reward that varies within a group of a random model's responses, so GSPO has advantages to learn from; it lives
# in its own module, as a user's would, and the ranks import it through rl.reward_modules.
PARITY = """
from keye.posttrain.rewards import register_verifier

@register_verifier("parity")
def parity():
    return lambda response, ref: float(len(response) % 2 == 0)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = make_tiny_model_folder(root / "model")
    data = make_tiny_data(root / "data", n=8)
    prompts = root / "data" / "rl.jsonl"  # text prompts with a verifiable answer
    lines = []
    for line in data["text"].read_text().splitlines():
        rec = json.loads(line)
        rec["meta"] = {"answer": rec["messages"][1]["content"]}
        lines.append(json.dumps(rec) + "\n")
    prompts.write_text("".join(lines))
    (root / "plugins").mkdir()
    (root / "plugins" / "parity_reward.py").write_text(PARITY)
    pretrain = root / "pretrain.yaml"
    pretrain.write_text(
        yaml.safe_dump(
            {
                "recipe": "pretrain",
                "name": "dist-pretrain",
                "seed": 5,
                "model": {"path": f"random:{model}"},
                "data": {
                    "sources": [{"path": str(data["text"]), "weight": 1, "kind": "text"}],
                    "max_length": 64,
                    "rows_per_batch": 1,
                },
                "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine", "weight_decay": 0.01},
            }
        )
    )
    common = [f"model.path=random:{model}", "mixed_precision='no'", "optim.lr=3e-3", "optim.warmup_steps=0"]
    return {
        "root": root,
        "pretrain": ("keye.pretrain.cli", "pretrain", pretrain, []),
        "sft": (
            "keye.posttrain.cli",
            "sft",
            ROOT / "configs" / "posttrain" / "sft-lora-tiny.yaml",
            [*common, f"data.sources=[{{path: {data['text']}, weight: 1}}]", "data.max_length=128"],
        ),
        "rl": (
            "keye.posttrain.cli",
            "rl",
            ROOT / "configs" / "posttrain" / "gspo-tiny.yaml",
            [
                *common,
                f"data.sources=[{{path: {prompts}, weight: 1}}]",
                "rl.reward_modules=[parity_reward]",
                "rl.rewards=[{name: parity, weight: 1.0}]",
                "rl.success=parity",
                "rl.group_size=4",
                "rl.prompts_per_step=2",
                "rl.max_new_tokens=5",
                "rl.hints=false",
                "rl.replay_per_prompt=0",  # the replay buffer is not checkpointed
                "rl.eval_manifest=null",
            ],
        ),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(setup, recipe: str, out: Path, *extra: str, **popen) -> subprocess.Popen:
    module, command, config, overrides = setup[recipe]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    cmd = [
        accelerate,
        "launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"),
        "--main_process_port",
        str(_free_port()),
        "-m",
        module,
        command,
        "--config",
        str(config),
        *overrides,
        f"output_dir={out}",
        f"max_steps={STEPS}",
        f"save_every={SAVE_EVERY}",
        "keep_last=2",
        *extra,
    ]
    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(setup["root"] / "plugins"), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, **popen)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["pretrain", "sft", "rl"])
def test_two_process_run_killed_and_resumed_equals_an_uninterrupted_one(setup, tmp_path, recipe):
    full, killed = tmp_path / "full", tmp_path / "killed"
    a = _launch(setup, recipe, full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    b = _launch(setup, recipe, killed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoints" / f"step-{SAVE_EVERY:06d}"
    deadline = time.time() + 240
    while not ckpt.exists() and b.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # kill -9 the launcher and both ranks, mid-run (torchrun's workers do not die with the launcher on their own)
    import psutil

    procs = [psutil.Process(b.pid), *psutil.Process(b.pid).children(recursive=True)]
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    b.wait()
    psutil.wait_procs(procs, timeout=30)
    assert ckpt.exists(), "the killed run never wrote its first checkpoint"
    assert not (killed / "final").exists(), "the run finished before it was killed"
    # Tiny steps are fast: the kill may land a few steps later. Resume from the first checkpoint, so that most of the
    # run happens after the resume whatever the timing.
    for later in (killed / "checkpoints").iterdir():
        if later != ckpt:
            shutil.rmtree(later)
    assert a.wait(timeout=600) == 0, a.stderr.read().decode()[-3000:]

    r = _launch(setup, recipe, killed, "--resume", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = r.communicate(timeout=600)[1].decode()
    assert r.returncode == 0, log[-3000:]
    assert f"(step {SAVE_EVERY})" in log  # "resumed from .../step-000002 (step 2)"

    state = json.loads((full / "checkpoints" / f"step-{STEPS:06d}" / "state.json").read_text())
    assert state["world"] == 2 and (full / "checkpoints" / f"step-{STEPS:06d}" / "rank1.pt").exists()
    expected, resumed = _metrics(full), _metrics(killed)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    keys = ["loss", "lr", "tokens"] + (["reward_mean", "groups_trained"] if recipe == "rl" else [])
    for m, n in zip(expected, resumed):
        for k in keys:
            assert n[k] == pytest.approx(m[k], rel=1e-6, abs=1e-7), (m["step"], k)
    if recipe == "rl":
        assert sum(m["groups_trained"] for m in expected) > 0  # GSPO had something to learn from
    from safetensors.torch import load_file

    x = load_file(str(full / "final" / "weights.safetensors"))
    y = load_file(str(killed / "final" / "weights.safetensors"))
    assert x.keys() == y.keys() and x
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=1e-5, atol=1e-6, msg=k)
