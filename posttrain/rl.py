"""GSPO reinforcement learning on image and video prompts with verifiable answers: ``keye rl --config ...``.

One optimizer step (on each rank)::

    prompts_per_step prompts (chat manifests mixed by data.sources weights; the reference answer from ``meta``),
      in grad_accum micro-batches; rank r of N takes prompts r, r + N, ... of the mix
      --sample_with_hints(sample_group)-->  G responses each, escalating the hint while the whole group fails
      --build_reward-->  rewards (G,)  --RLEP replay (optional)-->  + earlier successes, old log-probs recomputed
      --skip groups with equal rewards (zero advantages: nothing to learn)-->
      --group_advantages, policy_logprobs, gspo_loss-->  backward (mean over every rank's groups), clip, AdamW step
    (rl.updates_per_batch > 1: further optimizer steps on the same rollouts)

The recipe is `PostTrainer` on the training core's loop (`Trainer.train`): it supplies micro-batches of sampled groups
and their summed loss; accumulation, clipping, precision, schedule, atomic checkpoints, resume and export are the
core's. Optionally, before training, each prompt's pass rate is
measured (``rl.prefilter_samples`` responses) and only prompts solved sometimes but not always are kept
(`filter_by_pass_rate`). Writes ``metrics.jsonl`` (reward, pass rate, hint levels, ratio and clip statistics per step),
``reward.png`` and, with ``rl.eval_manifest``, held-out greedy accuracy before and after (``eval.jsonl``).

Limits: the replay buffer is not checkpointed (it restarts empty on resume); under N processes a rank whose groups all
have equal rewards still runs one backward (weight 0), so AdamW's momentum moves the weights where one process would
skip the step.

Thyme tool use (``rl.tools.enabled``, `ToolsConfig`): each response is a multi-round conversation in which the model's
``<code>`` blocks run in the sandbox and their output comes back (`keye.posttrain.thyme`); text is sampled at
``rl.temperature``, code at ``rl.tools.code_temperature`` (GRPO-ATS); the loss covers the model's tokens only, scored
under the temperature each was sampled at; the reward is Thyme's R_result x (1 + 0.5 R_consistency) + 0.5 R_format
(`keye.posttrain.ats.thyme_score`), R_result being the ``rl.rewards`` verifiers on the final turn. The ``rl.success``
verifier reads the final turn too. Not with RLEP replay yet.

Not for the losses, rewards, hints, prompts or sampling themselves: `keye.posttrain.gspo`, ``rewards``, ``hints``, ``prompts``,
``filtering``, ``rollout``, ``thyme``.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from keye.errors import ConfigError
from keye.posttrain.filtering import ReplayBuffer, filter_by_pass_rate
from keye.posttrain.gspo import group_advantages, gspo_loss
from keye.posttrain.hints import HintLevel, sample_with_hints
from keye.posttrain.prompts import (
    PromptStream,
    evaluate_accuracy,
    plot_rewards,
    reference_of,
    synthetic_hints,
    write_rl_prompts,
)
from keye.posttrain.rewards import Reference, RewardSpec, build_reward, make_verifier
from keye.posttrain.rollout import GroupRollout, policy_logprobs
from keye.posttrain.samplers import make_sampler
from keye.posttrain.sft import PostTrainConfig, PostTrainer
from keye.tools.loop import TOOL_SYSTEM_PROMPT
from keye.tools.sandbox import SandboxConfig
from keye.training import load_config

logger = logging.getLogger(__name__)

__all__ = [
    "GSPOConfig",
    "PromptStream",
    "RLConfig",
    "RLTrainer",
    "RewardTermConfig",
    "ToolsConfig",
    "evaluate_accuracy",
    "plot_rewards",
    "reference_of",
    "run",
    "synthetic_hints",
    "write_rl_prompts",
]


@dataclass
class RewardTermConfig:
    """One reward term: a registered verifier (`keye.posttrain.rewards`), its weight and its options."""

    name: str = "choice"
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolsConfig:
    """Thyme tool use in rollouts (off by default): the model may run Python on the images in the sandbox."""

    enabled: bool = False
    max_rounds: int = 4  # code rounds per response; after that an answer is demanded (Thyme: about 4)
    # GRPO-ATS: code between <code> and </code> is sampled at this temperature (0: greedy), text at rl.temperature
    code_temperature: float = 0.0
    timeout_s: float = 10.0  # sandbox wall clock per snippet (the CPU limit follows it)
    memory_mb: int = 1024  # sandbox address-space limit per process
    # Tells the model the turn format and the image_path variable
    system_prompt: str = TOOL_SYSTEM_PROMPT
    # How many conversations decode in one batch (0: all of a micro-batch's, every prompt's group at once; 1: each
    # alone, the same tokens)
    batch: int = 0

    def __post_init__(self):
        if self.max_rounds < 1:
            raise ConfigError("rl.tools.max_rounds", f"must be >= 1, got {self.max_rounds}")
        if self.code_temperature < 0:
            raise ConfigError("rl.tools.code_temperature", f"must be >= 0, got {self.code_temperature}")
        if self.timeout_s <= 0 or self.memory_mb <= 0:
            raise ConfigError("rl.tools", "timeout_s and memory_mb must be positive")
        if self.batch < 0:
            raise ConfigError("rl.tools.batch", f"must be >= 0 (0: all at once), got {self.batch}")

    def sandbox(self) -> SandboxConfig:
        return SandboxConfig(
            timeout_s=self.timeout_s,
            cpu_seconds=max(1, math.ceil(self.timeout_s)),
            memory_bytes=self.memory_mb << 20,
        )


@dataclass
class GSPOConfig:
    group_size: int = 4  # G responses per prompt
    prompts_per_step: int = 2
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    think: bool | None = (
        None  # True: /think, False: /no_think (empty think block pre-filled), None: prompt as is
    )
    eps_low: float = 3e-4
    eps_high: float = 4e-4
    variant: str = "sequence"  # sequence (GSPO) | token (GSPO-token)
    kl_coef: float = 0.0  # > 0: k3 KL to the initial policy (a frozen copy)
    updates_per_batch: int = 1  # optimizer steps on one batch of rollouts (the first is on-policy: s = 1)
    rewards: list[RewardTermConfig] = field(default_factory=lambda: [RewardTermConfig()])
    success: str = "choice"  # the verifier deciding success (hints, pass rate, replay); not a format bonus
    success_threshold: float = 1.0
    hints: bool = True  # progressive hints from each line's meta.hints
    max_hint_level: str = "solution"
    cumulative_hints: bool = False
    skip_uniform_groups: bool = (
        True  # a group whose rewards are all equal has zero advantages: skip its forward
    )
    prefilter_samples: int = 0  # > 0: measure every prompt's pass rate first; keep those strictly in (0, 1)
    replay_per_prompt: int = 0  # RLEP: earlier successes mixed into a group (0: off)
    replay_capacity: int = 16
    eval_manifest: str | None = (
        None  # held-out prompts: greedy accuracy (the success verifier) before and after
    )
    eval_n: int = 50
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    # Modules imported before the verifiers are looked up: your own rewards, registered with
    # `keye.posttrain.rewards.register_verifier` when the module is imported (e.g. ``[my_project.rewards]``).
    reward_modules: list[str] = field(default_factory=list)

    def __post_init__(self):
        import importlib

        for module in self.reward_modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ConfigError("rl.reward_modules", f"cannot import {module!r}: {e}") from e
        if self.variant not in ("sequence", "token"):
            raise ConfigError("rl.variant", f"must be 'sequence' or 'token', got {self.variant!r}")
        if self.max_hint_level.upper() not in HintLevel.__members__:
            raise ConfigError("rl.max_hint_level", f"unknown level {self.max_hint_level!r}")
        if self.group_size < 2:
            raise ConfigError("rl.group_size", "group-normalised advantages need at least 2 responses")
        names = [r.name for r in self.rewards]
        for name in {*names, self.success}:
            try:
                make_verifier(name)  # an unknown verifier is a config error now, not at step 1
            except KeyError as e:
                raise ConfigError("rl.rewards", str(e)) from e
        if self.tools.enabled:
            if self.replay_per_prompt > 0:
                raise ConfigError(
                    "rl.replay_per_prompt", "RLEP replay is not supported with rl.tools.enabled; set 0"
                )
            if "format" in names:
                raise ConfigError(
                    "rl.rewards", "with rl.tools.enabled the format term is Thyme's R_format; drop 'format'"
                )
            if self.top_p != 1.0 or self.top_k != 0:
                raise ConfigError(
                    "rl.top_p", "tool rollouts sample untruncated (GRPO-ATS); keep top_p 1.0 and top_k 0"
                )
            if self.temperature <= 0:
                raise ConfigError("rl.temperature", f"text must be sampled (> 0), got {self.temperature}")


@dataclass
class RLConfig(PostTrainConfig):
    recipe: str = "rl"
    rl: GSPOConfig = field(default_factory=GSPOConfig)

    def __post_init__(self):
        super().__post_init__()
        # A step's rl.prompts_per_step prompts (on each rank) are split into grad_accum micro-batches.
        if self.rl.prompts_per_step % self.grad_accum:
            raise ConfigError(
                "grad_accum",
                f"must divide rl.prompts_per_step ({self.rl.prompts_per_step}), got {self.grad_accum}",
            )


def _pad_cat(rows: list[torch.Tensor], length: int, value) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(r, (0, length - len(r)), value=value) for r in rows])


class RLTrainer(PostTrainer):
    """GSPO over the training core (see the module docstring)."""

    cfg: RLConfig

    def make_stream(self, core_stream, data_cfg, processor, seed, **_):
        return PromptStream(data_cfg, seed)

    def setup(self, resume: bool = False) -> RLTrainer:
        super().setup(resume=resume)
        rl = self.cfg.rl
        self.reward = build_reward([RewardSpec(r.name, r.weight, r.options) for r in rl.rewards])
        self.success = make_verifier(rl.success)
        self.replay = (
            ReplayBuffer(
                rl.replay_per_prompt,
                rl.replay_capacity,
                success_threshold=rl.success_threshold,
                seed=self.cfg.seed,
            )
            if rl.replay_per_prompt > 0
            else None
        )
        gen = self._unwrapped().generation_config
        if (
            gen.eos_token_id is None
        ):  # a random: model has no generation config; a chat turn ends at <|im_end|>
            gen.eos_token_id = self.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
            logger.warning("model has no eos_token_id; responses end at <|im_end|> (%d)", gen.eos_token_id)
        self.reference = None
        if rl.kl_coef > 0:
            self.reference = copy.deepcopy(self._unwrapped()).eval().requires_grad_(False)
        d = self.cfg.data
        self.overrides = {
            k: v
            for k, v in (("fps", d.fps), ("max_frames", d.max_frames), ("token_budget", d.token_budget))
            if v is not None
        }
        self.sampler = make_sampler(rl, self.overrides, self.acc.autocast)  # plain or tool conversations
        if rl.prefilter_samples > 0:
            self._prefilter()
        return self

    # ------------------------------------------------------------------------------------------------ sampling
    def _sample(self, messages: list[dict], g: int | None = None) -> GroupRollout:
        return self.sampler.group(self._unwrapped(), self.processor, messages, g or self.cfg.rl.group_size)

    def _rewards(self, rollout: GroupRollout, ref: Reference) -> list[float]:
        return self.sampler.rewards(rollout, self.reward, ref)

    def _prefilter(self) -> None:
        """Keep the prompts whose pass rate over ``prefilter_samples`` responses is strictly in (0, 1); the result is
        saved (``prefilter.json``) and reused on resume."""
        path = self.out / "prefilter.json"
        if path.exists():
            self.stream.allowed = set(json.loads(path.read_text())["kept"])
            return
        ids, successes = [], []
        model = self._unwrapped().eval()
        for pid, messages, ref, _ in self.stream.all():
            rollout = self._sample(messages, self.cfg.rl.prefilter_samples)
            ids.append(pid)
            successes.append([float(self.success(t, ref)) for t in rollout.texts])
        model.train()
        result = filter_by_pass_rate(ids, successes, success_threshold=self.cfg.rl.success_threshold)
        logger.info(
            "pass-rate filter: kept %d of %d prompts (%d never solved, %d always solved)",
            len(result.kept),
            len(ids),
            result.n_unsolved,
            result.n_solved,
        )
        self.out.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "kept": result.kept,
                    "rates": dict(zip(ids, result.rates.tolist())),
                    "n_unsolved": result.n_unsolved,
                    "n_solved": result.n_solved,
                },
                indent=1,
            )
        )
        self.stream.allowed = set(result.kept)

    def _with_replay(
        self, pid: str, rollout: GroupRollout, rewards: list[float]
    ) -> tuple[GroupRollout, list[float], int]:
        """RLEP: the new group plus up to ``replay_per_prompt`` earlier successes of this prompt, their old log-probs
        recomputed with the current policy (they were sampled by an older one)."""
        items = [
            (ids[: int(m.sum())], text)
            for ids, m, text in zip(rollout.response_ids, rollout.response_mask, rollout.texts)
        ]
        mix = self.replay.mix(pid, items, rewards)
        if mix.n_replayed == 0:
            return rollout, rewards, 0
        length = max(len(ids) for ids, _ in mix.rollouts)
        pad = self.processor.tokenizer.pad_token_id or 0
        ids = _pad_cat([i for i, _ in mix.rollouts], length, pad)  # (G', R)
        mask = _pad_cat([torch.ones(len(i), dtype=torch.long) for i, _ in mix.rollouts], length, 0)  # (G', R)
        old = torch.nn.functional.pad(rollout.old_logps, (0, length - rollout.old_logps.shape[1]))
        merged = GroupRollout(
            prompt=rollout.prompt,
            response_ids=ids,
            response_mask=mask,
            old_logps=torch.cat([old, torch.zeros(mix.n_replayed, length)]),
            texts=[t for _, t in mix.rollouts],
            temperature=rollout.temperature,
            messages=rollout.messages,
        )
        with torch.no_grad():
            current = policy_logprobs(self._unwrapped(), merged).cpu()  # (G', R)
        replayed = torch.tensor(mix.replayed)
        merged.old_logps[replayed] = current[replayed] * mask[replayed]
        return merged, mix.rewards, mix.n_replayed

    # ------------------------------------------------------------------------------------------------ training
    def _evaluate(self) -> dict | None:
        rl = self.cfg.rl
        if not rl.eval_manifest:
            return None
        return evaluate_accuracy(
            self._unwrapped(),
            self.processor,
            rl.eval_manifest,
            self.success,
            n=rl.eval_n,
            max_new_tokens=rl.max_new_tokens,
            think=rl.think,
            overrides=self.overrides,
            respond=self.sampler.respond(self._unwrapped(), self.processor),
        )

    def _log_eval(self, when: str, result: dict | None) -> None:
        if result is None or not self.acc.is_main_process:
            return
        logger.info("held-out accuracy %s: %.3f (%d prompts)", when, result["accuracy"], result["n"])
        with open(self.out / "eval.jsonl", "a") as fh:
            fh.write(json.dumps({"when": when, "step": self.step, **result}) + "\n")

    # The core loop (`keye.training.Trainer.train`) owns accumulation, clipping, precision, schedule, checkpoints;
    # this recipe supplies micro-batches of sampled groups and their GSPO loss summed over groups.
    def micro_batches(self):
        per_micro = self.cfg.rl.prompts_per_step // self.cfg.grad_accum
        while True:
            yield self._rollouts(per_micro)

    def _rollouts(self, n_prompts: int) -> dict:
        """``n_prompts`` prompts of this rank, each sampled as a group (hints escalated while the group fails,
        RLEP replay mixed in), rewarded; ``kept``: the groups with something to learn."""
        rl, acc = self.cfg.rl, self.acc
        self._unwrapped().eval()  # sampling: no dropout
        max_level = HintLevel[rl.max_hint_level.upper()]
        batch = {"groups": [], "rewards": [], "successes": [], "levels": [], "replayed": 0, "stats": []}
        items = []
        for _ in range(n_prompts):
            self.position, item = self.stream.next(self.position, acc.process_index, acc.num_processes)
            items.append(item)

        def escalate(sample, messages, ref, hints):
            return sample_with_hints(
                messages,
                hints if rl.hints else {},
                lambda m: sample(m, rl.group_size),
                lambda g: [float(self.success(t, ref)) for t in g.texts],
                max_level=max_level,
                success_threshold=rl.success_threshold,
                cumulative=rl.cumulative_hints,
            )

        jobs = [functools.partial(escalate, messages=m, ref=ref, hints=h) for _, m, ref, h in items]
        began = time.perf_counter()
        hinted_groups = self.sampler.each_prompt(self._unwrapped(), self.processor, jobs)
        batch["sample_s"] = time.perf_counter() - began
        batch["groups_sampled"] = sum(len(h.tried) for h in hinted_groups)
        for (pid, _, ref, _), hinted in zip(items, hinted_groups):
            rollout = hinted.group
            rewards = self._rewards(rollout, ref)
            batch["successes"].extend(hinted.rewards)
            batch["rewards"].extend(rewards)
            batch["levels"].append(int(hinted.level))
            if self.replay is not None and hinted.level == HintLevel.NONE:
                rollout, rewards, k = self._with_replay(pid, rollout, rewards)
                batch["replayed"] += k
            batch["groups"].append((rollout, rewards))
        batch["kept"] = [
            (r, w) for r, w in batch["groups"] if not (rl.skip_uniform_groups and max(w) == min(w))
        ]
        batch["num_tokens"] = sum(int(r.response_mask.sum()) for r, _ in batch["kept"])
        if self.reference is not None:
            with torch.no_grad():
                for r, _ in batch["kept"]:
                    r.ref_logps = policy_logprobs(self.reference, r)
        return batch

    def _count(self, batch: dict) -> int:
        return len(batch["kept"])  # groups: the step's loss is the mean over its groups

    def _micro_loss(self, batch: dict) -> tuple[torch.Tensor | None, int]:
        rl, acc = self.cfg.rl, self.acc
        groups, weight = batch["kept"], 1.0
        if not groups:
            if acc.num_processes == 1:
                return None, 0  # no backward: the optimizer leaves the weights alone
            # Other ranks may have groups to learn from: every rank runs a backward (the engine's gradient exchange
            # is collective), this one with a zero weight.
            groups, weight = batch["groups"][:1], 0.0
        total = None
        for rollout, rewards in groups:
            adv = group_advantages(torch.tensor([rewards]))[0].to(acc.device)  # (G,)
            new = self.forward(lambda m, r=rollout: policy_logprobs(m, r))  # (G, R) with grad
            if rollout.old_logps is None:  # not recorded when sampled: this first update is on-policy
                rollout.old_logps = new.detach().float().cpu()
            loss, st = gspo_loss(
                new,
                rollout.old_logps.to(new.device),
                adv,
                rollout.response_mask.to(new.device),
                eps_low=rl.eps_low,
                eps_high=rl.eps_high,
                variant=rl.variant,
                kl_coef=rl.kl_coef,
                ref_logps=rollout.ref_logps,
            )
            total = loss if total is None else total + loss
            if weight:
                batch["stats"].append(st)
        return total * weight, len(batch["kept"])

    def updates_per_step(self) -> int:
        return self.cfg.rl.updates_per_batch

    def step_metrics(self, window: list[dict]) -> dict:
        rl = self.cfg.rl
        rewards = [x for b in window for x in b["rewards"]]
        successes = [x for b in window for x in b["successes"]]
        levels = [x for b in window for x in b["levels"]]
        groups = [g for b in window for g in b["groups"]]
        stats = [st for b in window for st in b["stats"]]
        lengths = [int(r.response_mask.sum(1).float().mean()) for r, _ in groups]
        m = {
            "reward_mean": sum(rewards) / len(rewards),
            "pass_rate": sum(s >= rl.success_threshold for s in successes) / len(successes),
            "hint_level_mean": sum(levels) / len(levels),
            "hinted_share": sum(lv > 0 for lv in levels) / len(levels),
            "groups_trained": sum(len(b["kept"]) for b in window),
            "replayed": sum(b["replayed"] for b in window),
            "response_len": sum(lengths) / len(lengths),
            "sample_s": sum(b["sample_s"] for b in window),  # rollouts (every hint level), not the loss
            "groups_sampled": sum(b["groups_sampled"] for b in window),
        }
        if stats:  # the last update's, when the rollouts served several
            stats = stats[-len(stats) // self.updates_per_step() :]
            for key in ("ratio_mean", "ratio_min", "ratio_max", "clip", "kl"):
                m[key] = sum(getattr(s, key) for s in stats) / len(stats)
        m.update(
            self.sampler.step_metrics([r for r, _ in groups], self.out, self.step, self.acc.is_main_process)
        )
        return m

    def train(self) -> list[dict]:
        """The core loop, with held-out accuracy before and after (``rl.eval_manifest``) and ``reward.png``."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.step == 0:
            self._log_eval("before", self._evaluate())
        metrics = super().train()
        if self.acc.is_main_process and metrics:
            plot_rewards(metrics, self.out / "reward.png", self.cfg.name)
        self._log_eval("after", self._evaluate())
        return metrics


def run(config: str | Path, overrides: list[str] | None = None, resume: bool = False) -> Path | None:
    """A GSPO run: returns ``<output_dir>/final`` (None with ``export: false``)."""
    cfg = load_config(config, overrides, cls=RLConfig)
    trainer = RLTrainer(cfg).setup(resume=resume)
    trainer.train()
    return trainer.export() if cfg.export else None
