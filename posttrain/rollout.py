"""Rollouts for RL on keye models: sample a group of responses to one (video) prompt, with their log-probs.

`sample_group` processes the prompt once (``processor(messages)``: ids, M-RoPE ``position_ids`` and vision inputs),
runs the vision tower once, and samples G responses in one batched ``model.generate`` call: the prompt is repeated G
times and the vision tokens are passed as ``video_embeds`` / ``image_embeds`` repeated G times. (Passing
``pixel_values_videos`` with ``num_return_sequences=G`` would not work: transformers repeats every row of the patch
tensor and of ``video_grid_thw`` in place, interleaving frames, and would also run the tower G times.) It records the
old-policy log-probs of the sampled tokens at sampling time from the generation logits (``output_logits``), as GSPO's
importance ratio needs.

`response_logprobs` turns a forward pass's logits into per-token log-probs of the response tokens, and
`policy_logprobs` scores a `GroupRollout` (with grad, for the loss: the prompt and its video run once, their KV cache
shared by the G responses, gradients flowing back through it); both score tokens under the
model's distribution at the sampling temperature, ``softmax(logits / temperature)``, without top-k/top-p truncation:
the truncated sampler is an implementation detail of exploration, and the importance ratio compares policies. A
rollout sampled with per-token temperatures (GRPO-ATS, `keye.posttrain.thyme`) carries them in
``GroupRollout.temperatures`` and is scored under them (`keye.posttrain.ats.tempered_logprobs`).

Not for rewards, advantages or the update: `keye.posttrain.rewards`, `keye.posttrain.gspo` and the ``keye rl`` recipe.
TRL's GRPO trainer does the same for text and images but has no video input, which is why this exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import BatchFeature, DynamicCache

from keye.batching import cache_from_layers
from keye.modeling import KeyeForConditionalGeneration
from keye.posttrain.ats import tempered_logprobs
from keye.processing import VISION_INPUTS, KeyeProcessor

__all__ = ["GroupRollout", "mask_after_eos", "policy_logprobs", "response_logprobs", "sample_group"]


def response_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Log-probs of the response tokens, aligned with the tokens they score: ``out[b, t] = log p(input_ids[b, t] |
    input_ids[b, :t])`` (read from ``logits[b, t - 1]``) where ``response_mask[b, t]``, else 0.

    ``logits`` ``(B, T, V)``, ``input_ids`` and ``response_mask`` ``(B, T)`` -> ``(B, T)`` float32. Only the masked
    positions are normalised over the vocabulary, so a long prompt (a video) costs nothing here. ``temperature``: one
    for every token, or ``(B, T)`` per token, aligned like ``input_ids`` (0 = greedy, see `tempered_logprobs`).
    """
    if logits.shape[:2] != input_ids.shape or input_ids.shape != response_mask.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must agree on (B, T)"
        )
    mask = response_mask.bool()  # (B, T)
    if mask[:, 0].any():
        raise ValueError(
            "response_mask marks position 0, which no logit predicts; a response follows a prompt"
        )
    predicted = mask[:, 1:]  # (B, T-1): positions 1.. are predicted by the logits at 0..T-2
    rows = logits[:, :-1][predicted]  # (N, V) only the response positions
    targets = input_ids[:, 1:][predicted]  # (N,)
    if isinstance(temperature, torch.Tensor):
        if temperature.shape != input_ids.shape:
            raise ValueError(
                f"temperature {tuple(temperature.shape)} must be a number or (B, T) like input_ids"
            )
        temps = temperature.to(logits.device)[:, 1:][predicted]  # (N,)
    else:
        temps = torch.full(targets.shape, float(temperature), device=logits.device)  # (N,)
    lp = tempered_logprobs(rows, targets, temps)  # (N,)
    shifted = torch.zeros(predicted.shape, dtype=lp.dtype, device=lp.device).masked_scatter(predicted, lp)
    return torch.cat([shifted.new_zeros(shifted.shape[0], 1), shifted], dim=1)  # (B, T)


@dataclass
class GroupRollout:
    """G sampled responses to one prompt.

    ``prompt``: the processor's output for the prompt (batch 1: ``input_ids`` (1, P), ``position_ids`` (3, 1, P), vision
    inputs); ``response_ids`` (G, R): sampled tokens, padded after the end-of-sequence token; ``response_mask`` (G, R):
    1 on each response's tokens up to and including its end-of-sequence token; ``old_logps`` (G, R): their log-probs
    under the sampling policy at ``temperature`` (0 where masked; None until the first, on-policy, update gives
    them, when the sampler did not record them); ``texts``: the decoded responses, special tokens and
    the end-of-sequence token removed; ``messages``: the prompt messages sampled from (with any hint);
    ``temperatures`` (G, R): each token's sampling temperature when it varied within a response (GRPO-ATS), which
    then replaces ``temperature`` in `policy_logprobs`; ``ref_logps`` (G, R): the reference policy's, when GSPO's KL
    term needs them.
    """

    prompt: BatchFeature
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    old_logps: torch.Tensor | None
    texts: list[str]
    temperature: float
    messages: list[dict] = field(default_factory=list)
    temperatures: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None

    @property
    def group_size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.prompt["input_ids"].shape[1]

    def prompt_inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The prompt alone ``(1, P)``: what `policy_logprobs` runs once for the whole group. Copies: the sampler may
        have made them under ``torch.inference_mode``, and autograd keeps its inputs."""
        keys = ("input_ids", "attention_mask", "position_ids", *VISION_INPUTS)
        return {k: self.prompt[k].to(device, copy=True) for k in keys if k in self.prompt}

    def response_inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The responses, continuing from the prompt's KV cache: ``input_ids`` ``(G, R)``, ``attention_mask``
        ``(G, P + R)`` (0 on padding after a response ends), ``position_ids`` ``(3, G, R)``; a subclass adds the
        vision inputs inside the responses."""
        g, r = self.response_ids.shape
        pos = self.prompt["position_ids"]  # (3, 1, P)
        # Generated tokens continue after the prompt's last position, as generate() placed them.
        tail = pos[:, :, -1:] + torch.arange(1, r + 1, dtype=pos.dtype)  # (3, 1, R)
        inputs = {
            "input_ids": self.response_ids,
            "attention_mask": torch.cat(
                [self.prompt["attention_mask"].expand(g, -1), self.response_mask.to(pos.dtype)], dim=1
            ),  # (G, P+R)
            "position_ids": tail.expand(-1, g, -1).contiguous(),  # (3, G, R)
        }
        return {k: v.to(device) for k, v in inputs.items()} if device is not None else inputs

    def model_inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Forward inputs for the G full sequences, prompt + response ``(G, P + R)``: ``input_ids``,
        ``attention_mask``, ``position_ids`` (3, G, P + R), and the prompt's vision inputs repeated once per
        sequence (what `policy_logprobs` runs under gradient checkpointing, and the reference it is tested
        against)."""
        g = self.group_size
        response = self.response_inputs()
        inputs = {
            "input_ids": torch.cat([self.prompt["input_ids"].expand(g, -1), response["input_ids"]], dim=1),
            "attention_mask": response["attention_mask"],
            "position_ids": torch.cat(
                [self.prompt["position_ids"].expand(-1, g, -1), response["position_ids"]], dim=2
            ),  # (3, G, P+R)
        }
        for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if pixels in self.prompt:
                inputs[pixels] = self.prompt[pixels].repeat(g, 1)  # (G*N, 3*14*14), whole blocks in order
                inputs[grid] = self.prompt[grid].repeat(g, 1)  # (G*items, 3)
        if "video_reference_index" in self.prompt:  # frame indices: copy k counts from k times the frames
            refs = self.prompt["video_reference_index"]
            frames = int(self.prompt["video_grid_thw"][:, 0].sum())
            inputs["video_reference_index"] = torch.cat([refs + k * frames for k in range(g)])  # (G*frames,)
        return {k: v.to(device) for k, v in inputs.items()} if device is not None else inputs


def policy_logprobs(model: KeyeForConditionalGeneration, rollout: GroupRollout) -> torch.Tensor:
    """The model's log-probs of a rollout's response tokens ``(G, R)`` (0 where masked), with grad when enabled.

    The prompt (its vision inputs too) runs once and its KV cache serves all G responses: the same causal attention
    as G full sequences, with gradients flowing into the prompt's pass through every response that reads it. Under
    gradient checkpointing, which cannot carry a cache, G full sequences instead. Logits are computed only where a
    response token is scored (not for the prompt, padding, or tokens the mask leaves out, such as a Thyme
    conversation's sandbox output).
    """
    device = model.device
    mask = rollout.response_mask.bool().to(device)  # (G, R)
    g, r = mask.shape
    ids = rollout.response_ids.to(device)  # (G, R)
    temps = rollout.temperatures
    temps = (temps if temps is not None else torch.tensor(float(rollout.temperature))).to(device).expand(g, r)
    if model.is_activation_checkpointing:
        inputs = rollout.model_inputs(device)
        keep = torch.nn.functional.pad(mask, (rollout.prompt_length - 1, 1), value=False)  # (G, P+R)
        lp = tempered_logprobs(model(**inputs, logits_to_keep=keep).logits, ids[mask], temps[mask])  # (N,)
        return torch.zeros(mask.shape, dtype=lp.dtype, device=device).masked_scatter(mask, lp)
    cache = DynamicCache(config=model.config.text_config)
    first = model(**rollout.prompt_inputs(device), cache=cache, use_cache=True, logits_to_keep=1).logits[0]
    layers = [
        (layer.keys.expand(g, -1, -1, -1), layer.values.expand(g, -1, -1, -1)) for layer in cache.layers
    ]
    later = mask[:, 1:]  # (G, R-1): the tokens the responses' own positions predict
    keep = torch.nn.functional.pad(later, (0, 1), value=False)  # (G, R)
    shared = cache_from_layers(model, layers)  # the prompt's keys and values, one view per response
    logits = model(
        **rollout.response_inputs(device), cache=shared, use_cache=True, logits_to_keep=keep
    ).logits
    lp0 = tempered_logprobs(first.expand(g, -1), ids[:, 0], temps[:, 0])  # (G,): from the prompt's last logit
    rest = tempered_logprobs(logits, ids[:, 1:][later], temps[:, 1:][later])  # (N,)
    out = torch.zeros(g, r - 1, dtype=rest.dtype, device=device).masked_scatter(later, rest)
    return torch.cat([torch.where(mask[:, 0], lp0, 0.0)[:, None], out], dim=1)  # (G, R)


def mask_after_eos(response_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """Response mask ``(G, R)`` long: 1 up to and including each row's first end-of-sequence token, 0 after it (the
    padding generate() adds to finished rows); all 1 for a row that never ended (cut at ``max_new_tokens``)."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device)).long()  # (G, R)
    after_end = (is_eos.cumsum(dim=1) - is_eos) > 0  # (G, R): strictly after the first EOS
    return (~after_end).long()


def _eos_ids(model: KeyeForConditionalGeneration) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        raise ValueError("model.generation_config.eos_token_id is not set: responses would have no end")
    return [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def sample_group(
    model: KeyeForConditionalGeneration,
    processor: KeyeProcessor,
    messages: list[dict],
    group_size: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    think: bool | None = None,
    **video_overrides,
) -> GroupRollout:
    """Sample ``group_size`` responses to one prompt and record their old-policy log-probs.

    ``messages`` is one conversation ending with the user turn (any images/videos in it are processed once);
    ``think`` as in `KeyeProcessor` (appends ``/think`` or ``/no_think``); ``top_p``/``top_k`` (0: off) truncate the
    sampler only. ``video_overrides`` go to the processor (``max_frames=...``). Uses torch's global RNG: seed it for
    reproducible groups.
    """
    if group_size < 1 or temperature <= 0:
        raise ValueError(f"need group_size >= 1 and temperature > 0, got {group_size}, {temperature}")
    prompt = processor(messages, think=think, **video_overrides)
    device, g = model.device, group_size
    ids = prompt["input_ids"].to(device)  # (1, P)
    batch = {
        "input_ids": ids.expand(g, -1).contiguous(),  # (G, P)
        "attention_mask": prompt["attention_mask"].to(device).expand(g, -1).contiguous(),  # (G, P)
        "position_ids": prompt["position_ids"].to(device).expand(-1, g, -1).contiguous(),  # (3, G, P)
    }
    for pixels, grid, embeds in (
        ("pixel_values", "image_grid_thw", "image_embeds"),
        ("pixel_values_videos", "video_grid_thw", "video_embeds"),
    ):
        if pixels in prompt:
            refs = prompt.get("video_reference_index") if pixels == "pixel_values_videos" else None
            tokens = model.encode_vision(prompt[pixels].to(device), prompt[grid].to(device), refs)  # (N/4, D)
            batch[embeds] = tokens.repeat(g, 1)  # (G*N/4, D)
    eos = _eos_ids(model)
    pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else eos[0]
    out = model.generate(
        **batch,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        return_dict_in_generate=True,
        output_logits=True,
    )
    p = ids.shape[1]
    response = out.sequences[:, p:]  # (G, R)
    logits = torch.stack(out.logits, dim=1)  # (G, R, V) raw, before temperature and truncation
    is_eos = torch.isin(response, torch.tensor(eos, device=response.device))  # (G, R)
    mask = mask_after_eos(response, eos)  # (G, R)
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (G, R, V)
    old = lp.gather(-1, response[..., None]).squeeze(-1) * mask  # (G, R)
    texts = [
        processor.decode(row[(m > 0) & ~e], skip_special_tokens=True)
        for row, m, e in zip(response.cpu(), mask.cpu(), is_eos.cpu())
    ]
    return GroupRollout(
        prompt=prompt,
        response_ids=response.cpu(),
        response_mask=mask.cpu(),
        old_logps=old.cpu(),
        texts=texts,
        temperature=temperature,
        messages=list(messages),
    )
