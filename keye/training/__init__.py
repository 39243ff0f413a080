"""The training core shared by the pretraining and post-training recipes.

- `config`: nested dataclasses loaded from YAML with dotted overrides (unknown keys are errors)
- `data`: JSONL chat manifests mixed by weight, processed, packed (per-sample positions, no cross-sample attention)
- `model`: load, RoPE base change, LoRA, freezing by regex, delta files (trained tensors only)
- `losses`: next-token loss on assistant tokens; SigLIP contrastive loss (Stage 0)
- `trainer`: the accelerate loop with atomic checkpoints and exact resume

Recipes (`keye.pretrain`, `keye.posttrain`) stay thin: a YAML plus a few lines that call `Trainer`.
"""

from keye.training.config import TrainConfig, load_config
from keye.training.trainer import Trainer, latest_checkpoint

__all__ = ["TrainConfig", "Trainer", "latest_checkpoint", "load_config"]
