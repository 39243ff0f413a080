"""Continuous batching: sequences prefilled one at a time decode together, one token per step for all of them.

Each `Sequence` comes with its own prefill (`prefill`: its KV cache and the logits of its next token). `BatchDecoder`
joins it to the running batch between two steps (its cache left-padded to the batch's length, an attention mask
marking the padding) and drops it as soon as it stops (end of turn, a stop string, ``max_new_tokens``, or cancelled),
so a long generation never holds up a short one and a new request does not wait for the batch to end. A step is one
forward pass of ``(B, 1)`` tokens; on a memory-bound decoder that costs about what one sequence costs, which is where
the throughput of serving several clients comes from.

The decoded tokens are those ``model.generate`` gives each sequence alone (greedy; the test compares them), since
left padding with its mask changes nothing a token attends to. Sampling uses transformers' temperature and top-p
warpers with one random generator per sequence (seeded by the request's ``seed``).

    decoder = BatchDecoder(model, tokenizer)
    decoder.add(Sequence(**prefill(model, ids, positions, vision), max_new_tokens=64, on_text=print))
    while decoder:
        decoder.step()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

__all__ = ["BatchDecoder", "Sequence", "cache_from_layers", "prefill"]


def cache_from_layers(model, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A `DynamicCache` holding ``layers`` (each ``(keys, values)``, ``(B, heads, T, head_dim)``), not copied."""
    cache = DynamicCache(config=model.config.text_config)
    for layer, (k, v) in zip(cache.layers, layers, strict=True):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


@torch.inference_mode()
def prefill(model, kwargs: dict, *, keep: int | None = None, **vision) -> dict:
    """Run a prompt (``CachedPrefix.continue_with``'s ``input_ids``, ``position_ids``, ``cache``, with its vision
    inputs) and return what a `Sequence` starts from: its own copy of the KV cache, the next token's logits and
    position. The cache passed in ends holding its first ``keep`` tokens (default: what it held before), so a shared
    prefix can serve the next request, or a new one be kept from this pass."""
    cache = kwargs.get("cache")
    before = cache.get_seq_length() if cache is not None else 0
    if cache is None:
        cache = DynamicCache(config=model.config.text_config)
    ids = kwargs["input_ids"][:, before:]
    positions = kwargs["position_ids"][..., before:]
    out = model(
        input_ids=ids,
        position_ids=positions,
        attention_mask=kwargs["attention_mask"],
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
        **{k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in vision.items()},
    )
    # no copy: a DynamicCache never writes into its tensors (it concatenates into new ones, crops by slicing)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    keep = before if keep is None else keep
    if cache.get_seq_length() > keep:
        cache.crop(keep - cache.get_seq_length())
    return {
        "cache": layers,
        "logits": out.logits[0, -1].float(),
        "position": int(kwargs["position_ids"].max()) + 1,
        "prompt_tokens": kwargs["input_ids"].shape[1],
    }


@dataclass(eq=False)
class Sequence:
    """One generation: its prefill (`prefill`'s output), its sampling settings, and callbacks.

    ``on_text(piece)`` receives the decoded text as it grows (held back while it could be the start of a stop
    string); ``on_done(sequence)`` runs once when it stops, with ``finish_reason`` set (``stop``, ``length`` or
    ``cancelled``) and ``text`` the whole answer. Set ``cancelled`` from any thread to stop it at the next step."""

    cache: list[tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor
    position: int
    prompt_tokens: int = 0
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    keep_eos: bool = False  # the end-of-turn token that stopped it is the last of ``tokens`` (RL scores it)
    return_cache: bool = False  # when it stops, ``cache`` holds its KV again (every token but the last)
    # ``(tokens so far, logits (1, V)) -> scores (1, V)`` to sample from instead of temperature and top-p
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None
    generator: torch.Generator | None = None  # default: a new one, seeded by ``seed``
    on_text: Callable[[str], None] | None = None
    on_done: Callable[[Sequence], None] | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already given to on_text
    finish_reason: str | None = None
    cancelled: bool = False

    def __post_init__(self):
        if self.generator is None and (self.temperature > 0 or self.logits_processor is not None):
            self.generator = torch.Generator()
            if self.seed is not None:
                self.generator.manual_seed(self.seed)
            else:
                self.generator.seed()


class BatchDecoder:
    """The running batch: one KV cache for all its sequences (left-padded), their next logits and positions."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.rows: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (B, L): 1 where the cache holds a real token
        self.logits = torch.zeros(0)
        self.positions = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, seq: Sequence) -> None:
        """Join ``seq`` to the batch (its cache left-padded to the batch's length, or the batch's to its)."""
        length = seq.cache[0][0].shape[-2]
        total = max(length, self.mask.shape[1])
        device = self.model.device

        def pad(t: torch.Tensor, n: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, 0, n, 0)) if n else t

        if self.cache is None:
            self.cache = cache_from_layers(self.model, seq.cache)
        else:
            grow = total - self.mask.shape[1]
            for layer, (k, v) in zip(self.cache.layers, seq.cache, strict=True):
                layer.keys = torch.cat([pad(layer.keys, grow), pad(k, total - length)])
                layer.values = torch.cat([pad(layer.values, grow), pad(v, total - length)])
        mask = torch.cat(
            [torch.zeros(1, total - length, dtype=torch.long), torch.ones(1, length, dtype=torch.long)], 1
        )
        self.mask = torch.cat([torch.nn.functional.pad(self.mask, (total - self.mask.shape[1], 0)), mask])
        self.logits = torch.cat([self.logits.reshape(-1, seq.logits.shape[-1]), seq.logits[None].to(device)])
        self.positions = torch.cat([self.positions, torch.tensor([seq.position])])
        self.rows.append(seq)
        seq.cache = []  # the batch holds it now

    @torch.inference_mode()
    def step(self) -> None:
        """Pick every sequence's next token, end those that stop, and run one forward pass for the rest."""
        tokens = [self._sample(row, logits) for row, logits in zip(self.rows, self.logits, strict=True)]
        keep = []
        for i, (row, token) in enumerate(zip(self.rows, tokens, strict=True)):
            if row.cancelled:
                self._finish(row, "cancelled")
                continue
            eos = token in self.eos and not row.ignore_eos
            if not eos or row.keep_eos:
                row.tokens.append(token)
            reason = "stop" if eos or self._emit(row) else None
            if reason is None and len(row.tokens) >= row.max_new_tokens:
                reason = "length"
            if reason:
                if row.return_cache:
                    row.cache = self._row_cache(i)
                self._finish(row, reason)
            else:
                keep.append(i)
        if len(keep) < len(self.rows):
            self._select(keep)
        if not self.rows:
            return
        ids = torch.tensor([[tokens[i]] for i in keep], device=self.model.device)
        positions = self.positions[:, None].expand(3, -1, 1).to(self.model.device)  # text: three equal axes
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long)], 1)
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=self.mask.to(self.model.device),
            cache=self.cache,
            use_cache=True,
        )
        self.logits = out.logits[:, -1].float()
        self.positions = self.positions + 1

    # ------------------------------------------------------------------------------------------------ internals
    def _sample(self, row: Sequence, logits: torch.Tensor) -> int:
        if row.generator is None:
            return int(logits.argmax())
        if row.logits_processor is not None:
            scores = row.logits_processor(row.tokens, logits[None].clone())
        else:
            scores = TemperatureLogitsWarper(row.temperature)(None, logits[None].clone())
            if row.top_p < 1.0:
                scores = TopPLogitsWarper(row.top_p)(None, scores)
        probs = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probs[0], 1, generator=row.generator))

    def _row_cache(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row ``i``'s KV without its left padding: its prompt and every generated token but the last. Copied: a
        view would keep the whole batch's cache alive for as long as the row's conversation lasts."""
        start = int(self.mask[i].argmax())  # its first real column (the padding is on the left)
        return [
            (layer.keys[i : i + 1, :, start:].clone(), layer.values[i : i + 1, :, start:].clone())
            for layer in self.cache.layers
        ]

    def _emit(self, row: Sequence) -> bool:
        """Decode the row's text so far, pass on what is settled; True when it reached a stop string."""
        row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        stopped = False
        for s in row.stop:
            at = row.text.find(s)
            if at >= 0:
                row.text, stopped = row.text[:at], True
        settled = len(row.text)
        if not stopped:
            if row.text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                settled = len(row.text.rstrip("\ufffd"))
            if row.stop:  # keep back what could still become a stop string
                hold = max(len(s) for s in row.stop) - 1
                settled = min(settled, max(row.sent, len(row.text) - hold))
        if settled > row.sent and row.on_text is not None:
            row.on_text(row.text[row.sent : settled])
        row.sent = max(row.sent, settled)
        return stopped

    def _finish(self, row: Sequence, reason: str) -> None:
        row.finish_reason = reason
        if reason != "cancelled" and len(row.text) > row.sent and row.on_text is not None:
            row.on_text(row.text[row.sent :])
            row.sent = len(row.text)
        if row.on_done is not None:
            row.on_done(row)

    def _select(self, keep: list[int]) -> None:
        """Keep only the rows ``keep``, and drop the cache columns that are padding in all of them."""
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, torch.zeros(0, 0, dtype=torch.long)
            self.logits, self.positions = torch.zeros(0), torch.zeros(0, dtype=torch.long)
            return
        index = torch.tensor(keep)
        self.mask, self.logits, self.positions = (
            self.mask[index],
            self.logits[index.to(self.logits.device)],
            self.positions[index],
        )
        start = int(self.mask.any(0).long().argmax())  # first column some row uses
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, start:]
            layer.values = layer.values[index.to(layer.values.device), :, start:]
