"""A prompt prefix the model has already run: its token ids, M-RoPE positions and KV cache, continued by generation.

The one prefix-reuse mechanism of keye. A chat keeps each turn (`commit`: the next question continues after the
answer, and a video asked about twice is encoded once); the evaluation harness prefills a video once and answers
each of its questions from there (`rewind` after each answer drops the question and answer again); a server can key
prefixes by their media.

    prefix = CachedPrefix.empty(model)
    prefix.prefill(model, ids, positions, video_embeds=embeds)    # run (1, L) tokens into the cache
    kwargs = prefix.continue_with(question_ids, question_positions, device)
    out = model.generate(**kwargs, max_new_tokens=16)
    prefix.rewind()                                               # or prefix.commit(...) to keep the turn
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

__all__ = ["CachedPrefix"]


@dataclass
class CachedPrefix:
    """``ids`` (1, L) and ``positions`` (3, 1, L): the tokens whose keys and values ``cache`` holds (``cache`` None:
    the tokens only, which every continuation runs again)."""

    ids: torch.Tensor
    positions: torch.Tensor
    cache: DynamicCache | None

    @classmethod
    def empty(cls, model) -> CachedPrefix:
        return cls(
            torch.zeros(1, 0, dtype=torch.long),
            torch.zeros(3, 1, 0, dtype=torch.long),
            DynamicCache(config=model.config.text_config),
        )

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def next_position(self) -> int:
        """The position after the prefix's last token (0 when empty)."""
        return int(self.positions.max()) + 1 if self.length else 0

    def continue_with(self, ids: torch.Tensor, positions: torch.Tensor, device) -> dict:
        """Arguments of ``model(...)`` / ``model.generate(...)`` for the prefix followed by ``ids`` (1, N) at
        ``positions`` (3, 1, N): the whole sequence and the cache (the model runs only the tokens it lacks)."""
        full = torch.cat([self.ids, ids.cpu()], dim=1)
        kwargs = {
            "input_ids": full.to(device),
            "attention_mask": torch.ones_like(full).to(device),
            "position_ids": torch.cat([self.positions, positions.cpu()], dim=2).to(device),
        }
        if self.cache is not None:
            kwargs["cache"] = self.cache
        return kwargs

    @torch.inference_mode()
    def prefill(self, model, ids: torch.Tensor, positions: torch.Tensor, **vision) -> None:
        """Run ``ids`` at ``positions`` (with their vision inputs) into the cache and keep them."""
        kwargs = self.continue_with(ids, positions, model.device)
        vision = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in vision.items()}
        model(**kwargs, **vision, use_cache=True, logits_to_keep=1)
        self.commit(kwargs["input_ids"], kwargs["position_ids"])

    def commit(self, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """The cache now holds ``ids`` (1, T) at ``positions`` (3, 1, T), e.g. a chat turn and its answer."""
        self.ids, self.positions = ids.cpu(), positions.cpu()

    def rewind(self) -> None:
        """Drop from the cache what a generation added after the prefix."""
        if self.cache is not None and self.cache.get_seq_length() > self.length:
            # DynamicCache.crop takes the (negative) count to drop here, not the length to keep
            self.cache.crop(self.length - self.cache.get_seq_length())
