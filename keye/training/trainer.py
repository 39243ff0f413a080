"""The training loop every recipe shares: accelerate (DDP, DeepSpeed ZeRO, FSDP), exact resume, metrics.

    trainer = Trainer(cfg)          # a TrainConfig (keye.training.config)
    trainer.setup(resume=True)      # model, LoRA, freezing, optimizer, schedule, data; the last checkpoint if any
    trainer.train()                 # max_steps optimizer steps; checkpoints every save_every; metrics.jsonl
    trainer.export()                # <output_dir>/final: weights.safetensors (delta file) + model/ (loadable folder)

One optimizer step is ``grad_accum`` micro-batches on every rank; the loss is the sum over the step's units (trained
tokens for the LM loss, pairs for DPO) divided by their number over the whole step (all micro-batches, all ranks), so
packing, padding, accumulation and the world size do not change what is optimised. A recipe supplies its
micro-batches and their summed loss (`Trainer` lists the hooks); the loop does the rest.

Checkpoints (``<output_dir>/checkpoints/step-NNNNNN``) hold the trained tensors full-size (gathered by accelerate,
whatever the engine shards), the optimizer (under DeepSpeed and FSDP: the engine's own shards, in ``engine/``), the
schedule, every rank's RNG states and data position, and the metrics so far; they are written to ``step-NNNNNN.tmp``
and renamed, so a checkpoint folder either exists whole or not at all, and only the last ``keep_last`` are kept.
Resuming restores all of it, so the loss curve continues exactly as an uninterrupted run (same seed, same world size,
same engine).

Not for: data processing (`keye.training.data`), what a stage freezes (the YAML), or the CLI (`keye.pretrain.cli`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from keye.deltas import trained_delta
from keye.training.config import TrainConfig
from keye.training.data import TrainStream
from keye.training.losses import SigLIPHead, contrastive_loss, lm_loss_sum
from keye.training.model import apply_freeze, inject_lora, load_model, merge_lora

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "latest_checkpoint", "plot_losses"]

_STEP = "step-{:06d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder (temporary ``*.tmp`` folders of an interrupted save are ignored)."""
    folder = Path(output_dir) / "checkpoints"
    done = sorted(p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def plot_losses(metrics: list[dict], path: Path, title: str) -> None:
    """Loss per step as a PNG (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _lr_lambda(cfg: TrainConfig):
    o = cfg.optim

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        frac = (step - o.warmup_steps) / max(1, cfg.max_steps - o.warmup_steps)
        frac = min(1.0, frac)
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if o.schedule == "cosine" else 1 - frac
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape

    return f


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EngineModule(torch.nn.Module):
    """What the engine (DDP, DeepSpeed, FSDP) wraps: the model, run through a recipe's function in ``forward``.

    ``engine(fn)`` returns ``fn(model)``: every loss (the LM forward, Stage 0's vision-only objectives, DPO's and
    GSPO's log-probs) goes through the wrapper's forward, which is where DDP arms its gradient exchange and FSDP
    gathers its root parameters; a loss that called a sub-module of the bare model would train each rank alone."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn(self.model)


class Trainer:
    """Setup, train, save, export: the one loop of the pretraining stages, SFT, DPO/MPO and GSPO (Thyme too).

    A recipe overrides what it supplies (`make_stream`, `micro_batches`, `_count`, `_micro_loss`, `step_metrics`,
    `updates_per_step`, `add_adapters`, `add_head`); the loop owns accumulation, clipping, mixed precision, schedule,
    logging and checkpoints."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.step = 0
        self.position = 0  # this rank's local data position
        self.metrics: list[dict] = []

    # ------------------------------------------------------------------------------------------------ setup
    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        mp = self.cfg.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() else "no"
        # accelerate keeps one state per process; a second run in the same process (keye-tiny's stage chain, a
        # notebook) with another precision starts afresh (the process group, in PartialState, stays).
        from accelerate.state import AcceleratorState, GradientState

        if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mp:
            AcceleratorState._reset_state()
            GradientState._reset_state()
        kwargs = {}
        if self.cfg.deepspeed:
            from accelerate.utils import DeepSpeedPlugin

            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=self.cfg.deepspeed)
        return Accelerator(
            mixed_precision=mp,
            gradient_accumulation_steps=self.cfg.grad_accum,
            # A micro-batch without images leaves the vision tower unused; DDP must not wait for its gradients.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            cpu=not torch.cuda.is_available(),
            **kwargs,
        )

    def setup(self, resume: bool = False) -> Trainer:
        cfg = self.cfg
        self.acc = acc = self._accelerator()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        model, self.processor = self._build_model()
        # names of the trained tensors (the head's too), read before any engine wraps or shards the parameters
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        logger.info("trainable: %d of %d parameters (%d tensors)", n_train, n_all, len(self.trainable))
        self.n_trainable = n_train

        optimizer = torch.optim.AdamW(
            self._param_groups(model), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas)
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
        # The schedule stays outside accelerate, which would step it once per process: it counts optimizer steps.
        self.model, self.optimizer = acc.prepare(EngineModule(model), optimizer)
        self.scheduler = scheduler
        if resume:
            ckpt = latest_checkpoint(self.out)
            if ckpt is not None:
                self._load_checkpoint(ckpt)
            else:
                logger.info("--resume: no checkpoint under %s, starting fresh", self.out)
        self.stream = self.build_stream()
        return self

    def _build_model(self):
        """The model as this run trains it, before any engine wraps it: loaded (``cfg.model``), adapters added,
        freezing applied, a head attached (`add_head`). Returns (model, processor)."""
        model, processor = load_model(self.cfg.model, seed=self.cfg.seed)
        self.add_adapters(model)
        apply_freeze(model, self.cfg.freeze, model.config)
        torch.manual_seed(self.cfg.seed)
        self.add_head(model)
        return model, processor

    def add_head(self, model) -> None:
        """Attach a training head as ``model.head`` (a sub-module, so every engine sees and syncs it; kept out of
        the exported weights). Default: the SigLIP head of ``objective: contrastive``."""
        if self.cfg.objective == "contrastive":
            c = self.cfg.contrastive
            model.head = SigLIPHead(
                model.config.vision.hidden_size,
                model.config.text.hidden_size,
                c.embed_dim,
                c.init_temperature,
                c.init_bias,
            )

    def _full_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state, gathered from every rank by accelerate (full tensors under DeepSpeed ZeRO-3 and
        FSDP too, where each rank holds only a shard); on the main process, None elsewhere. Every rank must call it."""
        state = self.acc.get_state_dict(self.model)
        if not self.acc.is_main_process:
            return None
        return {k.removeprefix("model."): v for k, v in state.items()}  # the `EngineModule`'s prefix

    @property
    def _sharded(self) -> bool:
        """Parameters and optimizer state are partitioned across ranks (DeepSpeed, FSDP)."""
        from accelerate.utils import DistributedType

        return self.acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)

    # Hooks a recipe may override (post-training: adapters outside the LLM, streams of pairs or prompts).
    def add_adapters(self, model) -> None:
        """Add trainable adapters before freezing is applied (default: LoRA on the LLM from ``cfg.lora``)."""
        inject_lora(model, self.cfg.lora)

    def build_stream(self):
        """The data stream, starting at this rank's restored position (`make_stream` chooses its class)."""
        acc = self.acc
        return self.make_stream(
            TrainStream,
            self.cfg.data,
            self.processor,
            self.cfg.seed,
            rank=acc.process_index,
            world=acc.num_processes,
            start=self.position,
        )

    def make_stream(self, core_stream, *args, **kwargs):
        """A recipe's data stream, built from `build_stream`'s arguments (default: ``core_stream``, `TrainStream`)."""
        return core_stream(*args, **kwargs)

    def _param_groups(self, model) -> list[dict]:
        """Weight decay on matrices only (never on embeddings, norms or biases); ``optim.lr_scale`` multipliers."""
        import re

        scales = [(re.compile(k), v) for k, v in self.cfg.optim.lr_scale.items()]
        groups: dict[tuple[float, float], list] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            wd = self.cfg.optim.weight_decay if p.ndim >= 2 and "embed" not in name else 0.0
            scale = next((v for r, v in scales if r.match(name)), 1.0)
            groups.setdefault((wd, scale), []).append(p)
        return [
            {"params": ps, "weight_decay": wd, "lr": self.cfg.optim.lr * scale}
            for (wd, scale), ps in groups.items()
        ]

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _unwrapped(self):
        """The bare model (what `EngineModule` holds), e.g. for generation."""
        return self.acc.unwrap_model(self.model).model

    def forward(self, fn):
        """``fn(model)`` through the engine's forward (`EngineModule`): how every recipe computes its loss."""
        return self.model(fn)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically (temporary folder, then rename) and prune to ``keep_last``."""
        from safetensors.torch import save_file

        acc = self.acc
        folder = self.out / "checkpoints"
        final = folder / _STEP.format(self.step)
        tmp = folder / (final.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        # Every rank: its RNG and data position.
        torch.save(
            {"rng": _rng_state(), "position": self.position},
            tmp / f"rank{acc.process_index}.pt",
        )
        if self._sharded:  # optimizer and model shards as the engine keeps them, every rank
            acc.save_state(str(tmp / "engine"))
        full = self._full_state()  # every rank takes part in the gathering
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {n: full[n].detach().cpu().contiguous() for n in self.trainable}
            save_file(state, str(tmp / "trainable.safetensors"))
            if not self._sharded:
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            meta = {"step": self.step, "world": acc.num_processes, "config": asdict(self.cfg)}
            (tmp / "state.json").write_text(json.dumps(meta, indent=2))
            (tmp / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in self.metrics))
            for f in tmp.iterdir():  # data on disk before the rename makes the folder visible
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in sorted(p for p in folder.glob("step-*") if not p.name.endswith(".tmp"))[
                : -self.cfg.keep_last
            ]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def _load_checkpoint(self, ckpt: Path) -> None:
        from safetensors.torch import load_file

        acc = self.acc
        meta = json.loads((ckpt / "state.json").read_text())
        if meta["world"] != acc.num_processes:
            raise RuntimeError(
                f"{ckpt}: written by {meta['world']} processes, resuming with {acc.num_processes}: "
                "the data order would differ; resume with the same world size"
            )
        if self._sharded:  # each rank loads its own shards of the model and the optimizer
            acc.load_state(str(ckpt / "engine"))
        else:
            state = load_file(str(ckpt / "trainable.safetensors"))
            params = dict(self._unwrapped().named_parameters())
            with torch.no_grad():
                for n, v in state.items():
                    params[n].copy_(v)
            self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
        self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
        rank = torch.load(ckpt / f"rank{acc.process_index}.pt", weights_only=False)
        _set_rng_state(rank["rng"])
        self.position = rank["position"]
        self.step = meta["step"]
        self.metrics = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines() if x]
        logger.info("resumed from %s (step %d)", ckpt, self.step)

    # ------------------------------------------------------------------------------------------------ training
    # What a recipe supplies to the one loop below: its micro-batches, how many units each holds (the step's loss is
    # the sum over units divided by their number over the whole step: every micro-batch, every rank), the summed
    # loss of one micro-batch, and any metrics of its own.
    def micro_batches(self):
        """An endless iterator of micro-batches that keeps ``self.position`` (default: the stream's batches)."""
        loader = torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=self.cfg.data.num_workers, persistent_workers=False
        )
        for batch in loader:
            self.position = batch["next_position"]
            yield batch

    def _count(self, batch: dict) -> int:
        """Units of ``batch`` the loss is averaged over (default: trained tokens; contrastive: the micro-batch, whose
        loss is already a mean over its pairs)."""
        if self.cfg.objective == "contrastive":
            return 1
        return int((batch["labels"][:, 1:] != -100).sum())

    def _micro_loss(self, batch: dict) -> tuple[torch.Tensor | None, int]:
        """The loss of ``batch`` summed over its `_count` units, computed through `forward`; None when
        the micro-batch has nothing to learn (no backward then; only a recipe that can say so on one process)."""
        if self.cfg.objective == "contrastive":
            return self.forward(lambda m: contrastive_loss(m, m.head, batch))
        return self.forward(lambda m: lm_loss_sum(m, batch))

    def step_metrics(self, window: list[dict]) -> dict:
        """A recipe's own metrics of the step just taken on ``window`` (its micro-batches), after the update."""
        return {}

    def updates_per_step(self) -> int:
        """Optimizer steps taken on one window of micro-batches (GSPO may reuse its rollouts; default 1)."""
        return 1

    def _open_metrics(self) -> Path:
        """``metrics.jsonl`` rewritten from ``self.metrics``: after a resume, steps past the checkpoint are dropped."""
        path = self.out / "metrics.jsonl"
        if self.acc.is_main_process:
            path.write_text("".join(json.dumps(m) + "\n" for m in self.metrics))
        return path

    def _finish_step(self, m: dict, metrics_path: Path, bar, **postfix: str) -> None:
        """Record one step's metrics (in memory and in ``metrics.jsonl``), advance the bar, checkpoint when due."""
        self.metrics.append(m)
        if self.acc.is_main_process:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(m) + "\n")
        bar.update(1)
        bar.set_postfix(**postfix)
        if self.step % self.cfg.save_every == 0 or self.step == self.cfg.max_steps:
            self.save_checkpoint()

    def train(self) -> list[dict]:
        """Run to ``max_steps``; returns the metrics (one dict per optimizer step)."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        self.out.mkdir(parents=True, exist_ok=True)
        batches = self.micro_batches()
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=cfg.name,
            disable=not acc.is_main_process,
            dynamic_ncols=True,
        )
        metrics_path = self._open_metrics()
        start_time = time.perf_counter()
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            window = [next(batches) for _ in range(cfg.grad_accum)]
            self.model.train()  # after the window: a recipe may sample its micro-batches in eval mode
            local = torch.tensor(
                [sum(self._count(b) for b in window), sum(int(b["num_tokens"]) for b in window)],
                dtype=torch.float64,
            )
            total = acc.reduce(local.to(acc.device), reduction="sum").cpu()  # units, tokens: all ranks
            denom = max(float(total[0]), 1.0)
            # accelerate divides by grad_accum and DDP averages over ranks: undo both, so the gradient is that of
            # (sum over the step's units) / (the step's unit count).
            scale = acc.num_processes * cfg.grad_accum / denom
            grad_norm = None
            for _ in range(self.updates_per_step()):  # one optimizer step each, on the same window
                loss_sum = torch.zeros((), dtype=torch.float64)
                for batch in window:
                    with acc.accumulate(self.model):
                        with acc.autocast():
                            loss, _ = self._micro_loss(batch)
                        if (
                            loss is not None
                        ):  # None: nothing to learn from this micro-batch (see `_micro_loss`)
                            acc.backward(loss * scale)
                            loss_sum += loss.detach().double().cpu()
                        if acc.sync_gradients:
                            grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
                            self.optimizer.step()
                            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()  # the schedule counts steps
            total_loss = acc.reduce(loss_sum.to(acc.device), reduction="sum").cpu()  # the last update's
            loss_value = float(total_loss / denom)
            self.step += 1
            dt = time.perf_counter() - t0
            m = {
                "step": self.step,
                "loss": loss_value,
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens": int(total[1]),
                "tokens_per_s": float(total[1]) / dt,
                "time_s": time.perf_counter() - start_time,
                **self.step_metrics(window),
            }
            self._finish_step(
                m, metrics_path, bar, loss=f"{loss_value:.4f}", tok_s=f"{m['tokens_per_s']:.0f}"
            )
        bar.close()
        if acc.is_main_process and self.metrics:
            plot_losses(self.metrics, self.out / "loss.png", cfg.name)
        self.report_skipped()
        return self.metrics

    def report_skipped(self) -> None:
        """Warn about samples the stream had to skip (unreadable media, too long)."""
        s = getattr(self.stream, "stats", None)
        if s is not None and (s.skipped_media or s.skipped_too_long):
            logger.warning(
                "skipped %d samples with unreadable media, %d longer than data.max_length",
                s.skipped_media,
                s.skipped_too_long,
            )

    # ------------------------------------------------------------------------------------------------ export
    def export(self) -> Path | None:
        """``<output_dir>/final``: ``weights.safetensors`` (delta file: trained tensors, LoRA factors, trained
        embedding rows) and ``model/`` (LoRA merged; ``load_pretrained`` reads it). Every rank calls it; the main
        process writes and returns the folder, the others return None."""
        from safetensors.torch import save_file

        acc = self.acc
        acc.wait_for_everyone()
        full = self._full_state()  # every rank takes part in the gathering
        final = self.out / "final"
        if not acc.is_main_process:
            return None
        # A model of the run's own structure on the CPU, holding the gathered full tensors: the same export whatever
        # the engine (the trained module itself holds only this rank's shards under ZeRO-3 and FSDP).
        with torch.random.fork_rng(devices=[]):
            model, _ = self._build_model()
        model.load_state_dict({k: v.detach().cpu() for k, v in full.items()})
        del full
        tmp = self.out / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        delta = {k: v for k, v in trained_delta(model).items() if not k.startswith("head.")}
        save_file(delta, str(tmp / "weights.safetensors"))
        if getattr(model, "head", None) is not None:
            save_file(
                {k: v.detach().contiguous() for k, v in model.head.state_dict().items()},
                str(tmp / "head.safetensors"),
            )
            del model.head
        merge_lora(model)
        model.save_pretrained(tmp / "model")
        self.processor.save_pretrained(tmp / "model")
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in self.metrics))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        return final
