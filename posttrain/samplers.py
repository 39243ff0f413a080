"""How GSPO draws and scores a group of responses: plain text (`PlainSampler`) or Thyme tool conversations whose code
runs in the sandbox (`ToolSampler`). `make_sampler` chooses once, from ``rl.tools.enabled``; the trainer then only
calls the strategy.

Not for the sampling itself (`keye.posttrain.rollout.sample_group`, `keye.posttrain.thyme.sample_tool_group`) or the
loss (`keye.posttrain.rl`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from keye.chat import ConversationPool
from keye.posttrain.ats import final_text, thyme_score
from keye.posttrain.rewards import Reference
from keye.posttrain.rollout import GroupRollout, sample_group
from keye.posttrain.thyme import ToolGroupRollout, sample_tool_group, tool_metrics, tool_traces

if TYPE_CHECKING:
    from keye.posttrain.rl import GSPOConfig

__all__ = ["PlainSampler", "ToolSampler", "make_sampler"]

T = TypeVar("T")
# A prompt's sampling (e.g. its hint escalation), given ``sample(messages, g) -> group``
PromptJob = Callable[[Callable[[list[dict], int], GroupRollout]], T]


class PlainSampler:
    """G plain responses per prompt at ``rl.temperature`` / ``top_p`` / ``top_k``, each scored by the reward."""

    def __init__(self, rl: GSPOConfig, overrides: dict, autocast: Callable):
        self.rl, self.overrides, self.autocast = rl, overrides, autocast

    def group(self, model, processor, messages: list[dict], g: int) -> GroupRollout:
        rl = self.rl
        return sample_group(
            model,
            processor,
            messages,
            g,
            max_new_tokens=rl.max_new_tokens,
            temperature=rl.temperature,
            top_p=rl.top_p,
            top_k=rl.top_k,
            think=rl.think,
            **self.overrides,
        )

    def each_prompt(self, model, processor, jobs: list[PromptJob]) -> list:
        """Run each prompt's job with a ``sample(messages, g)`` of its own: here one prompt after another."""
        return [job(lambda messages, g: self.group(model, processor, messages, g)) for job in jobs]

    def rewards(self, rollout: GroupRollout, reward, ref: Reference) -> list[float]:
        return [float(reward(t, ref)) for t in rollout.texts]

    def respond(self, model, processor) -> Callable[[list[list[dict]]], list[str]] | None:
        """How the held-out prompts are answered, all at once (None: one greedy ``generate`` each,
        `evaluate_accuracy`'s own)."""
        return None

    def step_metrics(self, groups: list[GroupRollout], out: Path, step: int, main: bool) -> dict:
        return {}


class ToolSampler(PlainSampler):
    """G tool conversations per prompt (text at ``rl.temperature``, code at ``rl.tools.code_temperature``), scored by
    Thyme's reward (kept in ``rollout.scores``); the step's first group goes to ``tool_traces.jsonl``."""

    def each_prompt(self, model, processor, jobs: list[PromptJob]) -> list:
        """The prompts at once in one `ConversationPool`: every conversation in flight, whichever prompt and hint
        level it belongs to, decodes in one batch (of at most ``rl.tools.batch``; 0: all of them). Each prompt's
        groups draw their rows' seeds from a generator of its own (seeded here in prompt order), so the tokens do
        not depend on which prompt's turns come first."""
        batch = self.rl.tools.batch or len(jobs) * self.rl.group_size
        pool = ConversationPool(model, processor, max_batch=batch)
        seeds = torch.randint(0, 2**62, (len(jobs),)).tolist()

        def bind(job: PromptJob, seed: int) -> Callable:
            generator = torch.Generator().manual_seed(seed)
            return lambda: job(lambda messages, g: self.group(model, processor, messages, g, pool, generator))

        return pool.run([bind(job, seed) for job, seed in zip(jobs, seeds)])

    def group(
        self,
        model,
        processor,
        messages: list[dict],
        g: int,
        pool: ConversationPool | None = None,
        generator: torch.Generator | None = None,
    ) -> ToolGroupRollout:
        """One group (``old_logps`` left to the loss: the first update is on-policy)."""
        rl, tools = self.rl, self.rl.tools
        # The sandbox's images are processed as they come back: the folder can go with the group.
        with tempfile.TemporaryDirectory(prefix="keye-thyme-") as tmp:
            return sample_tool_group(
                model,
                processor,
                messages,
                g,
                max_rounds=tools.max_rounds,
                max_new_tokens=rl.max_new_tokens,
                sandbox=tools.sandbox(),
                out_dir=tmp,
                system=tools.system_prompt,
                temperature=rl.temperature,
                code_temperature=tools.code_temperature,
                think=rl.think,
                autocast=self.autocast,
                max_batch=tools.batch or None,
                pool=pool,
                generator=generator,
                old_logps=False,
                **self.overrides,
            )

    def rewards(self, rollout: ToolGroupRollout, reward, ref: Reference) -> list[float]:
        rollout.scores = [thyme_score(t, reward, ref) for t in rollout.traces]
        return [s.reward for s in rollout.scores]

    def respond(self, model, processor) -> Callable[[list[list[dict]]], list[str]]:
        rl, tools = self.rl, self.rl.tools

        def answer(prompts: list[list[dict]]) -> list[str]:
            traces = tool_traces(
                model,
                processor,
                prompts,
                max_rounds=tools.max_rounds,
                max_new_tokens=rl.max_new_tokens,
                sandbox=tools.sandbox(),
                system=tools.system_prompt,
                think=rl.think,
                **self.overrides,
            )
            return [final_text(t) for t in traces]

        return answer

    def step_metrics(self, groups: list[ToolGroupRollout], out: Path, step: int, main: bool) -> dict:
        if main:
            first = groups[0]
            with open(out / "tool_traces.jsonl", "a") as fh:
                for trace, score in zip(first.traces, first.scores):
                    fh.write(json.dumps({"step": step, **score.as_dict(), "trace": trace.to_dict()}) + "\n")
        return tool_metrics(groups)


def make_sampler(rl: GSPOConfig, overrides: dict, autocast: Callable) -> PlainSampler:
    """The run's sampling strategy, chosen once."""
    return (ToolSampler if rl.tools.enabled else PlainSampler)(rl, overrides, autocast)
