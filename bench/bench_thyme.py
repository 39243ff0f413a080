"""One Thyme RL step, the group's responses decoded one at a time vs together, side by side.

``configs/posttrain/thyme-tiny.yaml`` as shipped (LoRA, 2 prompts x 4 responses, up to 2 code rounds of 256
tokens a turn, hints escalating while a group fails), on the task ``keye posttrain-data`` writes, one step each, with
``rl.tools.batch=1`` (every response generated alone: what the recipe did before `keye.chat.ConversationPool`) and
as shipped (both prompts' groups decoded in one batch, sandbox runs overlapping). Both draw the same tokens (each
row has its own seeded generator; `tests/test_thyme_rl.py` checks it), so they run the same hint levels and rounds; the figure is the
trainer's own step time (rollouts, rewards, loss and update; held-out evaluation off).

Measured here (2 cores): from the shipped v2's tool SFT, each response alone 175.2 s (sampling 155.8 s), batched
100.6 s (sampling 82.0 s), ratio 0.57; from the first v2 file's SFT 167.5 and 110.6 s, 0.66 (goal <= 0.25: not met).
Batched sampling takes 0.5 of sampling alone: a decoding step of 8 rows costs ~1.4x a step of one on 2 cores, and
the batch needs as many steps as its longest conversation (first measurement: two code turns at the 256-token cap
and an answer, ~1,000 of the rows' ~2,700 tokens); the loss (forward and backward over the 8 rows, 19-46 s) is the
same both ways. ``sample_s`` and ``groups_sampled`` come from the trainer's metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "posttrain" / "thyme-tiny.yaml"
# the config's model (the tool-use SFT), as `keye sft --config configs/posttrain/thyme-sft-tiny.yaml` writes it from
# the checkout; without it, keye-tiny (which writes no code)
SFT_MODEL = ROOT / "runs" / "posttrain" / "thyme-sft-tiny" / "final" / "model"

__all__ = ["main", "measure"]


def _step(tmp: Path, prompts: Path, name: str, *overrides: str) -> dict:
    out = tmp / name
    cmd = [sys.executable, "-m", "keye.cli", "rl", "--config", str(CONFIG), f"output_dir={out}",
           f"data.sources=[{{path: {prompts}, weight: 1}}]", "max_steps=1", "save_every=1", "rl.eval_manifest=null",
           *overrides]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=tmp, stdout=subprocess.DEVNULL)
    (m,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return m


def measure(model: Path | str | None = None) -> dict:
    from keye.posttrain.rl import write_rl_prompts
    from keye.posttrain.tooltask import write_tool_task

    with tempfile.TemporaryDirectory(prefix="keye-bench-thyme-") as d:
        tmp = Path(d)
        prompts = write_rl_prompts(write_tool_task(tmp / "task", n=16, seed=0, size=112), tmp / "thyme.jsonl")
        model = model or (SFT_MODEL if SFT_MODEL.exists() else "keye-tiny")
        alone = _step(tmp, prompts, "alone", f"model.path={model}", "rl.tools.batch=1")
        batched = _step(tmp, prompts, "batched", f"model.path={model}")
    keys = ("time_s", "sample_s", "groups_sampled", "response_len", "reward_mean", "code_rounds")
    return {
        "model": str(model),
        "alone": {k: alone.get(k) for k in keys},
        "batched": {k: batched.get(k) for k in keys},
        "ratio": batched["time_s"] / alone["time_s"],
    }


def main() -> None:
    r = measure()
    print(f"Thyme RL step ({CONFIG.name} as shipped, model {r['model']}, 2 prompts x 4 responses):")
    print(f"  each response alone : {r['alone']['time_s']:7.1f} s   {r['alone']}")
    print(f"  group in one batch  : {r['batched']['time_s']:7.1f} s   {r['batched']}")
    print(f"  ratio batched/alone : {r['ratio']:.3f}   (goal <= 0.25)")


if __name__ == "__main__":
    main()
