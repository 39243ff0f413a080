"""The pretraining recipe: one YAML per stage (``configs/pretrain/``), one thin function over the training core.

Stages differ only in their configs: Stage 0 is ``objective: contrastive`` on the vision tower; Stage 1 trains the
projector (and the special-token embedding rows); Stage 2 trains everything on the multi-task mix; Stage 3 anneals
with a raised RoPE base (``model.rope_theta``), longer packed rows and more long video. Each stage starts from the
previous one's export (``model.init_from``).
"""

from __future__ import annotations

from pathlib import Path

from keye.training import Trainer, load_config

__all__ = ["run"]


def run(config: str | Path, overrides: list[str] | None = None, resume: bool = False) -> Path | None:
    """Train one stage; returns ``<output_dir>/final`` (None with ``export: false``)."""
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg).setup(resume=resume)
    trainer.train()
    return trainer.export() if cfg.export else None
