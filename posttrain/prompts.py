"""GSPO's prompts: chat manifest lines with a verifiable answer, mixed by weight, each rank drawing its own; the
held-out accuracy and reward plot a run reports; and the synthetic prompt files the tiny recipes train on.

Not for sampling, rewards or the loop (`keye.posttrain.rollout`, ``rewards``, ``rl``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from keye.errors import ConfigError
from keye.posttrain.rewards import Reference
from keye.posttrain.sft import resolve_media
from keye.training.data import ManifestSource, MixSchedule

__all__ = [
    "PromptStream",
    "evaluate_accuracy",
    "plot_rewards",
    "prompt_messages",
    "reference_of",
    "synthetic_hints",
    "write_rl_prompts",
]


def reference_of(record: dict) -> Reference:
    """The verifiable answer of a manifest line: ``meta.answer_letter`` for a multiple-choice line (``meta.style ==
    "mc"``, options from ``meta.options``), else ``meta.answer``, else the text of the last assistant turn."""
    meta = record.get("meta") or {}
    if meta.get("style") == "mc" and meta.get("answer_letter"):
        return Reference(str(meta["answer_letter"]), tuple(meta.get("options") or ()))
    if "answer" in meta:
        return Reference(str(meta["answer"]), tuple(meta.get("options") or ()))
    content = [m for m in record["messages"] if m["role"] == "assistant"][-1]["content"]
    text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
    return Reference(text.strip())


def prompt_messages(record: dict, root: Path) -> list[dict]:
    """The prompt: messages up to the last user turn, media paths resolved."""
    last_user = max(i for i, m in enumerate(record["messages"]) if m["role"] == "user")
    return resolve_media(record["messages"][: last_user + 1], root)


class PromptStream:
    """RL prompts: index -> ``(prompt_id, messages, Reference, hints)``, sources mixed by weight (the core's
    `MixSchedule`); ``allowed`` (a set of prompt ids) drops prompts the pass-rate filter removed."""

    def __init__(self, cfg, seed: int):
        self.sources = [ManifestSource(s.path, s.kind) for s in cfg.sources]
        self.schedule = MixSchedule([len(s) for s in self.sources], [s.weight for s in cfg.sources], seed)
        self.allowed: set[str] | None = None
        self.stats = None

    def entry(self, s: int, row: int) -> tuple[str, list[dict], Reference, dict]:
        source = self.sources[s]
        line, record = source[row]
        pid = str(record.get("id", f"{source.path}:{line}"))
        hints = (record.get("meta") or {}).get("hints") or {}
        return pid, prompt_messages(record, source.path.parent), reference_of(record), hints

    def all(self):
        for s, source in enumerate(self.sources):
            for row in range(len(source)):
                yield self.entry(s, row)

    def next(self, position: int, rank: int = 0, world: int = 1) -> tuple[int, tuple]:
        """The first allowed prompt at or after ``position``, and the position after it. Positions count one rank's
        draws: rank r of ``world`` takes prompts r, r + world, r + 2 * world, ... of the mix."""
        for _ in range(100_000):
            item = self.entry(*self.schedule(position * world + rank))
            position += 1
            if self.allowed is None or item[0] in self.allowed:
                return position, item
        raise ConfigError("rl.prefilter_samples", "no prompt left after pass-rate filtering")


@torch.no_grad()
def evaluate_accuracy(
    model,
    processor,
    manifest: str | Path,
    success,
    *,
    n: int,
    max_new_tokens: int,
    think,
    overrides: dict,
    respond: Callable[[list[list[dict]]], list[str]] | None = None,
) -> dict:
    """Greedy decoding on the first ``n`` lines of ``manifest``: ``{"accuracy", "n", "by_qtype": {qtype: accuracy}}``,
    a response counting as correct when ``success`` scores it >= 1. ``respond(prompts) -> texts`` answers all the
    prompts at once instead of one greedy ``generate`` call each (the tool loop does:
    `keye.posttrain.thyme.tool_traces`)."""
    from collections import Counter

    from keye.training.config import DataConfig, SourceConfig

    stream = PromptStream(DataConfig(sources=[SourceConfig(path=str(manifest))]), 0)
    source = stream.sources[0]
    was_training = model.training
    model.eval()
    hits, total = Counter(), Counter()
    rows = [stream.entry(0, row) for row in range(min(n, len(source)))]
    texts = respond([messages for _pid, messages, _ref, _ in rows]) if respond is not None else None
    for row, (_pid, messages, ref, _) in enumerate(rows):
        qtype = str((source[row][1].get("meta") or {}).get("qtype", "all"))
        if texts is not None:
            text = texts[row]
        else:
            enc = processor(messages, think=think, **overrides)
            inputs = {k: v.to(model.device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
            text = processor.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        hits[qtype] += float(success(text, ref)) >= 1.0
        total[qtype] += 1
    model.train(was_training)
    n_all = sum(total.values())
    return {
        "accuracy": sum(hits.values()) / max(n_all, 1),
        "n": n_all,
        "by_qtype": {q: hits[q] / total[q] for q in sorted(total)},
    }


def plot_rewards(metrics: list[dict], path: Path, title: str) -> None:
    """Mean reward and pass rate per step (and a moving average) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    reward = [m["reward_mean"] for m in metrics]
    k = max(1, len(reward) // 10)
    smooth = [
        sum(reward[max(0, i - k + 1) : i + 1]) / len(reward[max(0, i - k + 1) : i + 1])
        for i in range(len(reward))
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, reward, lw=0.8, alpha=0.4, label="reward")
    ax.plot(steps, smooth, lw=1.5, label=f"reward ({k}-step mean)")
    ax.plot(steps, [m["pass_rate"] for m in metrics], lw=0.8, alpha=0.6, label="pass rate")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.05, max(1.0, *reward) + 0.05)  # Thyme's reward goes up to 2
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def synthetic_hints(meta: dict) -> dict[str, str]:
    """Progressive hints for a synthetic question, weakest first, from its labels (a real dataset writes them offline
    with a stronger model)."""
    kind = meta.get("qtype", "content")
    hints = {
        "concept": f"The question is about {kind}.",
        "strategy": "Find the scene the question names, then check each option against it.",
        "solution": f"The answer is {meta['answer']}.",
    }
    if meta.get("style") == "mc" and meta.get("answer_letter"):
        hints["solution"] += f" Answer with option {meta['answer_letter']}."
    return hints


def write_rl_prompts(manifest: str | Path, out: str | Path, *, qtypes: list[str] | None = None) -> Path:
    """RL prompts from a synthetic chat manifest: the lines with a verifiable answer (not captions; only ``qtypes``
    if given), each with ``meta.hints`` (a line's own, else `synthetic_hints`). Media paths are rewritten relative to
    ``out``'s folder."""
    import os

    manifest, out = Path(manifest), Path(out)
    rel = Path(os.path.relpath(manifest.parent.resolve(), out.parent.resolve()))
    lines = []
    for text in manifest.read_text().splitlines():
        rec = json.loads(text)
        meta = rec.get("meta") or {}
        if meta.get("qtype") == "caption" or (qtypes and meta.get("qtype") not in qtypes):
            continue
        rec["messages"] = resolve_media(rec["messages"], rel)
        rec["meta"] = {**meta, "hints": meta.get("hints") or synthetic_hints(meta)}
        lines.append(rec)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return out
