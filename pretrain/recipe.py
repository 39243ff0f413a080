"""The pretraining recipe: one YAML per stage (``configs/pretrain/``), one thin function over the training core.

Stages differ only in their configs: Stage 0 is ``objective: contrastive`` on the vision tower; Stage 1 trains the
projector (and the special-token embedding rows); Stage 2 trains everything on the multi-task mix; Stage 3 anneals
with a raised RoPE base (``model.rope_theta``), longer packed rows and more long video. Each stage starts from the
previous one's export (``model.init_from``). keye-tiny's Stage 0 is its own objective on the same loop
(``recipe: labels``, `keye.pretrain.labels.LabelTrainer`), which ``keye pretrain`` runs too.
"""

from __future__ import annotations

from pathlib import Path

from keye.training import Trainer, load_config
from keye.training.config import recipe_config_class

__all__ = ["run"]


def run(config: str | Path, overrides: list[str] | None = None, resume: bool = False) -> Path | None:
    """Train one stage; returns ``<output_dir>/final`` (None with ``export: false``)."""
    cls = recipe_config_class(config, default="pretrain")
    if cls.recipe == "labels":
        from keye.pretrain.labels import LabelTrainer

        trainer = LabelTrainer(load_config(config, overrides, cls=cls)).setup(resume=resume)
    else:  # a post-training YAML is refused here, naming the command that runs it
        trainer = Trainer(load_config(config, overrides)).setup(resume=resume)
    cfg = trainer.cfg
    trainer.train()
    return trainer.export() if cfg.export else None
