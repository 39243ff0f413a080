"""Thyme RL rollouts for ``keye rl`` with ``rl.tools.enabled``: each response is a multi-round tool conversation.

For each of a group's G responses, `run_tool_loop` (the same loop as ``keye chat --tools``, which ends every turn at
``</code>``: the environment answers there, as in Thyme) drives a `ToolSamplingSession`, a pooled chat session that
samples with GRPO-ATS (`CodeTemperatureProcessor`: text at ``rl.temperature``, code between ``<code>`` and
``</code>`` at ``rl.tools.code_temperature``, 0 = greedy) and records, turn by turn, where the model's tokens start,
the temperature each was sampled at, and the turn's image inputs. `build_tool_group` lays the G conversations out as
one `ToolGroupRollout`::

    prompt (1, P)          system + images + question: the same for every row
    response_ids (G, R)    model turn | <|im_end|> + sandbox turn (text + images) + assistant header | model turn | pad
    response_mask (G, R)   1 on the model's own tokens only: the loss never covers sandbox output or chat scaffolding
    attention_mask (G, R)  1 on every real token, 0 on padding
    temperatures (G, R)    each model token's sampling temperature (the loss scores it under the same one)
    + each row's M-RoPE positions and the images its sandbox produced, as pixel inputs

`keye.posttrain.rollout.policy_logprobs` scores it like a plain group. The old log-probs are computed once after
sampling by that same full forward (no grad), not read from the generation logits: a conversation is generated in
several KV-cached calls, and the loss's forward is the reference the ratio must agree with. Rewards:
`keye.posttrain.ats.thyme_score`. The synthetic task on which code helps: `keye.posttrain.tooltask`.

The G conversations of a group run at once (`keye.chat.ConversationPool`): each row's tool loop on its own thread
(so sandbox runs overlap), every pending model turn decoded in one batch. Limits: the prompt must be one user turn
with images (no video: the sandbox works on image files). Not for the loss or the
trainer (``keye.posttrain.rl``), nor for the sandbox or the turn format (``keye.tools``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import BatchFeature

from keye.chat import ConversationPool, PooledSession, Reply
from keye.posttrain.ats import CodeTemperatureProcessor, ThymeScore
from keye.posttrain.rollout import GroupRollout, policy_logprobs
from keye.tools.loop import TOOL_SYSTEM_PROMPT, ToolTrace, run_tool_loop
from keye.tools.sandbox import SandboxConfig

__all__ = [
    "SampledTurn",
    "ToolConversation",
    "ToolGroupRollout",
    "ToolSamplingSession",
    "build_tool_group",
    "sample_tool_group",
    "evaluate_tools",
    "tool_metrics",
    "tool_prompt",
    "tool_traces",
]


# ----------------------------------------------------------------------------------------------------------------------
# Sampling one conversation
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SampledTurn:
    """One model turn of a conversation: its tokens are ``ids[start : start + length]`` of the whole conversation."""

    start: int
    length: int
    temperatures: torch.Tensor  # (length,)


@dataclass
class ToolConversation:
    """A sampled conversation: ``ids`` (1, T) and ``position_ids`` (3, 1, T) of everything, system prompt first;
    ``prompt_length``: the tokens before the model's first turn; ``turns``: the model's turns; ``vision``: each user
    turn's image inputs (``pixel_values``, ``image_grid_thw``; empty for a text-only turn), the prompt's first."""

    ids: torch.Tensor
    position_ids: torch.Tensor
    prompt_length: int
    turns: list[SampledTurn]
    vision: list[dict[str, torch.Tensor]]
    trace: ToolTrace


class ToolSamplingSession(PooledSession):
    """A conversation of a Thyme group: GRPO-ATS sampling, each turn cut at ``</code>`` (by `run_tool_loop`), every
    model turn recorded. Its turns decode in the group's `ConversationPool`, batched with the other rows'.

    ``code_temperature`` 0 samples code greedily; ``seed`` seeds the row's own random generator, so a row samples
    the same tokens whatever else is in the batch. A subclass may add processors after the temperature one with
    `extra_logits_processors` (the tests force a scripted reply that way). After `run_tool_loop`, `conversation`
    returns what the loss needs.
    """

    def __init__(
        self,
        pool,
        model,
        processor,
        *,
        text_temperature: float = 1.0,
        code_temperature: float = 0.0,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(pool, model, processor, **kwargs)
        self.text_temperature = text_temperature
        self.code_temperature = code_temperature
        self.generator = torch.Generator().manual_seed(seed)
        self.turns: list[SampledTurn] = []
        self.vision: list[dict[str, torch.Tensor]] = []
        self.prompt_length: int | None = None
        self._ats: CodeTemperatureProcessor | None = None

    def extra_logits_processors(self, prompt_length: int) -> list:
        """Processors applied after the turn's `CodeTemperatureProcessor` (none)."""
        return []

    def sequence_settings(self, prompt_ids: torch.Tensor) -> dict:
        start = prompt_ids.shape[1]
        self._ats = CodeTemperatureProcessor(
            self.processor.tokenizer, start, self.text_temperature, self.code_temperature
        )
        chain = [self._ats, *self.extra_logits_processors(start)]
        prompt = prompt_ids[0].tolist()

        def process(tokens: list[int], scores: torch.Tensor) -> torch.Tensor:
            ids = torch.tensor([prompt + tokens])  # (1, P + n): what generate's processors see
            for p in chain:
                scores = p(ids, scores)
            return scores  # the per-token temperature is the processor's; no truncation (the ratio needs pi)

        return {"logits_processor": process, "generator": self.generator}

    def turn_done(self, reply: Reply, seq, inputs, prompt_length: int) -> None:
        temps = self._ats.temperatures()[0]  # (n,)
        if len(temps) != reply.num_tokens:
            raise RuntimeError(f"recorded {len(temps)} temperatures for {reply.num_tokens} sampled tokens")
        if self.prompt_length is None:
            self.prompt_length = prompt_length
        self.turns.append(SampledTurn(start=prompt_length, length=reply.num_tokens, temperatures=temps))
        self.vision.append({k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs})

    def conversation(self, trace: ToolTrace) -> ToolConversation:
        """The sampled conversation of ``trace``; the session's KV cache is released."""
        if self.prompt_length is None:
            raise ValueError("the session has not sampled anything yet")
        self.prefix.cache = None  # the conversation is kept, the cache (the big part) is not
        ids, positions = self.prefix.ids, self.prefix.positions
        return ToolConversation(ids, positions, self.prompt_length, self.turns, self.vision, trace)


def tool_prompt(messages: Sequence[dict]) -> tuple[str, list[str]]:
    """``(question, image paths)`` of a prompt for the tool loop: one user turn of image and text parts (the text
    parts joined, so a hint part appended by `keye.posttrain.hints.hinted_prompt` stays in the question)."""
    roles = [m["role"] for m in messages]
    if roles != ["user"]:
        raise ValueError(
            f"a tool-use prompt is one user turn (the system prompt is rl.tools.system_prompt), got {roles}"
        )
    content = messages[0]["content"]
    if isinstance(content, str):
        return content, []
    kinds = {p["type"] for p in content} - {"text", "image"}
    if kinds:
        raise ValueError(
            f"a tool-use prompt takes images and text only (the sandbox reads image files), got {kinds}"
        )
    return "".join(p["text"] for p in content if p["type"] == "text"), [
        p["image"] for p in content if p["type"] == "image"
    ]


# ----------------------------------------------------------------------------------------------------------------------
# A group of conversations as one rollout
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ToolGroupRollout(GroupRollout):
    """G tool conversations to one prompt (see the module docstring for the layout). ``texts``: each conversation's
    final model turn (what the verifiers read); ``temperatures`` is always set; ``scores``: filled by the trainer."""

    attention_mask: torch.Tensor | None = None  # (G, R)
    response_position_ids: torch.Tensor | None = None  # (3, G, R)
    # row -> its sandbox turns' image inputs (pixel_values, image_grid_thw)
    response_vision: list[list[dict[str, torch.Tensor]]] = field(default_factory=list)
    traces: list[ToolTrace] = field(default_factory=list)
    scores: list[ThymeScore] = field(default_factory=list)

    def response_inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The responses after the prompt's KV cache, ``(G, R)``, with the sandbox images of all rows in row order
        (the order in which the model fills their image slots)."""
        prompt_attention = self.prompt["attention_mask"].expand(self.group_size, -1)  # (G, P)
        inputs = {
            "input_ids": self.response_ids,  # (G, R)
            "attention_mask": torch.cat(
                [prompt_attention, self.attention_mask.to(prompt_attention.dtype)], 1
            ),
            "position_ids": self.response_position_ids,  # (3, G, R)
            **_vision([v for row in self.response_vision for v in row]),
        }
        return {k: v.to(device) for k, v in inputs.items()} if device is not None else inputs

    def model_inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Forward inputs ``(G, P + R)``; the image inputs of all rows in row order (each row: the prompt's images,
        then its sandbox images), the order in which the model fills the image slots."""
        g = self.group_size
        response = self.response_inputs()
        prompt_vision = [self.prompt] if "pixel_values" in self.prompt else []
        inputs = {
            "input_ids": torch.cat([self.prompt["input_ids"].expand(g, -1), response["input_ids"]], dim=1),
            "attention_mask": response["attention_mask"],  # (G, P+R)
            "position_ids": torch.cat(
                [self.prompt["position_ids"].expand(-1, g, -1), response["position_ids"]], dim=2
            ).contiguous(),  # (3, G, P+R)
            **_vision([v for row in self.response_vision for v in prompt_vision + row]),
        }
        return {k: v.to(device) for k, v in inputs.items()} if device is not None else inputs


def _vision(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Image inputs concatenated in order: ``pixel_values`` (sum N_i, 3*14*14), ``image_grid_thw`` (images, 3)."""
    if not items:
        return {}
    return {
        "pixel_values": torch.cat([v["pixel_values"] for v in items]),
        "image_grid_thw": torch.cat([v["image_grid_thw"] for v in items]),
    }


def build_tool_group(
    conversations: Sequence[ToolConversation],
    messages: Sequence[dict],
    *,
    pad_token_id: int,
    temperature: float,
) -> ToolGroupRollout:
    """Lay G conversations out as one `ToolGroupRollout` (``old_logps`` None: see `sample_tool_group`)."""
    first = conversations[0]
    p = first.prompt_length
    for c in conversations:
        if c.prompt_length != p or not torch.equal(c.ids[:, :p], first.ids[:, :p]):
            raise ValueError("the conversations of a group must start from the same prompt tokens")
    r = max(c.ids.shape[1] for c in conversations) - p
    g = len(conversations)
    ids = torch.full((g, r), pad_token_id, dtype=torch.long)
    attention = torch.zeros(g, r, dtype=torch.long)
    mask = torch.zeros(g, r, dtype=torch.long)
    temps = torch.ones(g, r)
    last = first.position_ids[:, 0, p - 1 : p]  # (3, 1)
    positions = (last + torch.arange(1, r + 1)).unsqueeze(1).repeat(1, g, 1)  # (3, G, R): padding continues
    for row, c in enumerate(conversations):
        n = c.ids.shape[1] - p
        ids[row, :n] = c.ids[0, p:]
        attention[row, :n] = 1
        positions[:, row, :n] = c.position_ids[:, 0, p:]
        for turn in c.turns:
            at = turn.start - p
            mask[row, at : at + turn.length] = 1
            temps[row, at : at + turn.length] = turn.temperatures
    prompt = BatchFeature(
        {
            "input_ids": first.ids[:, :p],  # (1, P)
            "attention_mask": torch.ones(1, p, dtype=torch.long),
            "position_ids": first.position_ids[:, :, :p],  # (3, 1, P)
            **first.vision[0],
        }
    )
    return ToolGroupRollout(
        prompt=prompt,
        response_ids=ids,
        response_mask=mask,
        old_logps=None,
        texts=[c.trace.rounds[-1].text if c.trace.rounds else "" for c in conversations],
        temperature=temperature,
        messages=list(messages),
        temperatures=temps,
        attention_mask=attention,
        response_position_ids=positions,
        response_vision=[[v for v in c.vision[1:] if v] for c in conversations],
        traces=[c.trace for c in conversations],
    )


@torch.no_grad()
def sample_tool_group(
    model,
    processor,
    messages: Sequence[dict],
    group_size: int,
    *,
    max_rounds: int,
    max_new_tokens: int,
    sandbox: SandboxConfig,
    out_dir: str | Path,
    system: str | None = TOOL_SYSTEM_PROMPT,
    temperature: float = 1.0,
    code_temperature: float = 0.0,
    think: bool | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    max_batch: int | None = None,
    pool: ConversationPool | None = None,
    generator: torch.Generator | None = None,
    old_logps: bool = True,
    **video_overrides,
) -> ToolGroupRollout:
    """Sample ``group_size`` tool conversations to one prompt and score their model tokens under the policy.

    The conversations run together (`keye.chat.ConversationPool`): their turns decode in one batch of at most
    ``max_batch`` (default: the whole group; 1 generates each response alone, with the same tokens) and their
    sandbox runs overlap; in ``pool`` instead, when given (called from one of its jobs, the turns join the batch of
    every other group in flight). ``max_new_tokens`` is per model turn; the sandbox's output images go under
    ``out_dir`` (their pixels are processed when they come back, so the caller may delete the folder afterwards).
    ``autocast``: the context the loss's forward runs in, so that old and new log-probs are computed alike;
    ``old_logps=False`` leaves them unset (None) for a caller whose first update is on-policy (its loss's own
    forward gives them). Each row samples with its own generator, seeded from ``generator`` (default: torch's
    global RNG).
    """
    question, images = tool_prompt(messages)
    pad = processor.tokenizer.pad_token_id
    pad = pad if pad is not None else processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    pool = pool or ConversationPool(model, processor, max_batch=max_batch or group_size)
    seeds = torch.randint(0, 2**62, (group_size,), generator=generator).tolist()  # seed it to repeat a group
    sessions = [
        pool.session(
            ToolSamplingSession,
            text_temperature=temperature,
            code_temperature=code_temperature,
            seed=seed,
            think=think,
            system=system,
            **video_overrides,
        )
        for seed in seeds
    ]
    jobs = [
        functools.partial(
            run_tool_loop,
            session,
            question,
            images,
            max_rounds=max_rounds,
            sandbox=sandbox,
            out_dir=Path(out_dir) / f"row-{row}",
            max_new_tokens=max_new_tokens,
        )
        for row, session in enumerate(sessions)
    ]
    traces = pool.run(jobs)  # the rows' turns decode together; their sandbox runs overlap
    conversations = [s.conversation(t) for s, t in zip(sessions, traces)]
    rollout = build_tool_group(conversations, messages, pad_token_id=pad, temperature=temperature)
    if old_logps:
        with autocast():
            rollout.old_logps = policy_logprobs(model, rollout).float().cpu()  # (G, R), 0 off model tokens
    return rollout


@torch.no_grad()
def tool_traces(
    model,
    processor,
    prompts: Sequence[Sequence[dict]],
    *,
    max_rounds: int,
    max_new_tokens: int,
    sandbox: SandboxConfig,
    system: str | None = TOOL_SYSTEM_PROMPT,
    think: bool | None = None,
    max_batch: int = 16,
    **video_overrides,
) -> list[ToolTrace]:
    """Greedy tool conversations, one per prompt (held-out evaluation): their turns decode together, at most
    ``max_batch`` at once, and their sandbox runs overlap (`keye.chat.ConversationPool`)."""
    import tempfile

    from tqdm.auto import tqdm

    pool = ConversationPool(model, processor, max_batch=max_batch)
    bar = tqdm(total=len(prompts), desc="tool conversations", unit="conv", disable=len(prompts) < 2)

    def converse(session, question: str, images: list[str], out_dir: Path) -> ToolTrace:
        trace = run_tool_loop(session, question, images, max_rounds=max_rounds, sandbox=sandbox, out_dir=out_dir,
                              max_new_tokens=max_new_tokens)  # fmt: skip
        bar.update()
        return trace

    with tempfile.TemporaryDirectory(prefix="keye-thyme-eval-") as tmp, bar:
        jobs = []
        for i, messages in enumerate(prompts):
            question, images = tool_prompt(messages)
            session = pool.session(think=think, system=system, **video_overrides)
            jobs.append(functools.partial(converse, session, question, images, Path(tmp) / str(i)))
        return pool.run(jobs)


def evaluate_tools(
    model,
    processor,
    manifest: str | Path,
    success,
    *,
    n: int,
    max_rounds: int,
    max_new_tokens: int,
    sandbox: SandboxConfig,
    system: str | None = TOOL_SYSTEM_PROMPT,
    think: bool | None = None,
    max_batch: int = 16,
    **video_overrides,
) -> dict:
    """Held-out accuracy with tools (`keye.posttrain.prompts.evaluate_accuracy` over `tool_traces`), plus the share
    of well-formed conversations (Thyme's R_format: every model turn well formed, ending with an answer), overall and
    per question type, and the median number of code rounds. ``traces`` holds every conversation."""
    import json
    import statistics
    from collections import defaultdict

    from keye.posttrain.ats import final_text, trace_format
    from keye.posttrain.prompts import evaluate_accuracy

    traces: list[ToolTrace] = []

    def respond(prompts):
        traces.extend(
            tool_traces(model, processor, prompts, max_rounds=max_rounds, max_new_tokens=max_new_tokens,
                        sandbox=sandbox, system=system, think=think, max_batch=max_batch, **video_overrides)
        )  # fmt: skip
        return [final_text(t) for t in traces]

    result = evaluate_accuracy(
        model, processor, manifest, success, n=n, max_new_tokens=max_new_tokens, think=think,
        overrides=video_overrides, respond=respond,
    )  # fmt: skip
    with open(manifest) as fh:
        qtypes = [
            str((json.loads(line).get("meta") or {}).get("qtype", "all")) for line in fh if line.strip()
        ]
    formed = defaultdict(list)
    for trace, qtype in zip(traces, qtypes):
        formed[qtype].append(trace_format(trace))
    rounds = [sum(r.result is not None for r in t.rounds) for t in traces]
    return {
        **result,
        "well_formed": sum(map(sum, formed.values())) / max(len(traces), 1),
        "well_formed_by_qtype": {q: sum(v) / len(v) for q, v in sorted(formed.items())},
        "median_code_rounds": statistics.median(rounds) if rounds else 0,
        "traces": [t.to_dict() for t in traces],
    }


def tool_metrics(rollouts: Sequence[ToolGroupRollout]) -> dict[str, float]:
    """Per-step means over the responses: code rounds run, share of runs that succeeded, share answered, and the
    reward terms (``R_result``, ``R_consistency``, ``R_format``)."""
    traces = [t for r in rollouts for t in r.traces]
    runs = [rnd.result for t in traces for rnd in t.rounds if rnd.result is not None]
    scores = [s for r in rollouts for s in r.scores]
    out = {
        "code_rounds": len(runs) / max(len(traces), 1),
        "sandbox_ok": sum(r.ok for r in runs) / len(runs) if runs else 0.0,
        "answered": sum(t.answer is not None for t in traces) / max(len(traces), 1),
    }
    for key in ("result", "consistency", "format"):
        out[f"r_{key}"] = sum(getattr(s, key) for s in scores) / len(scores) if scores else 0.0
    return out
