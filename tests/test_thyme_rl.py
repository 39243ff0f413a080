"""Thyme RL (``keye rl`` with ``rl.tools.enabled``): tool-loop rollouts, their loss mask and temperatures, the reward.

A scripted rollout on a tiny random model (a logits processor forces the model's turns) runs one real sandbox round:
the loss mask covers exactly the forced model tokens, the sandbox's text and image tokens are masked, code tokens
are recorded at temperature 0 and text at 1.0, and the full-forward log-probs agree with the sampling distribution.
Thyme's reward is checked on hand-worked traces, and ``keye rl --config configs/posttrain/thyme-tiny.yaml`` runs two
steps. Needs bubblewrap for the sandbox, like the sandbox tests.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor

from keye.chat import ChatSession, ConversationPool, PooledSession
from keye.errors import ConfigError
from keye.posttrain.ats import thyme_score
from keye.posttrain.gspo import group_advantages, gspo_loss
from keye.posttrain.rewards import Reference, make_verifier
from keye.posttrain.rollout import policy_logprobs
from keye.posttrain.thyme import ToolSamplingSession, build_tool_group, sample_tool_group
from keye.tools.loop import TOOL_SYSTEM_PROMPT, ToolRound, ToolTrace, run_tool_loop
from keye.tools.protocol import CODE_CLOSE, parse_turn
from keye.tools.sandbox import SandboxConfig, SandboxResult
from keye.training import load_config
from keye.training.testing import make_tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]
THYME_TINY = ROOT / "configs" / "posttrain" / "thyme-tiny.yaml"
needs_bwrap = pytest.mark.usefixtures("bwrap")  # skipped without it, failed under CI (conftest)

CODE = "```python\nfrom PIL import Image\nim = Image.open(image_path)\nprint(im.size)\nim.crop((0, 0, 20, 10)).save('crop.png')\n```"
CROP = f"<think>measure it</think><code>\n{CODE}\n</code>"


# ----------------------------------------------------------------------------------------------------------------------
# Thyme's reward on hand-worked traces (no model)
# ----------------------------------------------------------------------------------------------------------------------


def _run(stdout: str, ok: bool = True) -> SandboxResult:
    return SandboxResult(ok=ok, stdout=stdout, stderr="", images=[], error=None if ok else "boom", elapsed_s=0.1,
                         killed_by=None)  # fmt: skip


def _trace(*turns: tuple[str, SandboxResult | None]) -> ToolTrace:
    trace = ToolTrace(question="How wide is the image?")
    trace.rounds = [ToolRound(text=t, parsed=parse_turn(t), result=r) for t, r in turns]
    trace.answer = trace.rounds[-1].parsed.answer
    trace.stopped = "answer" if trace.answer is not None else "no_action"
    return trace


@pytest.mark.parametrize(
    "turns, expected",
    [
        # code printed (60, 40); answer 60 is right, agrees with the print, every turn well formed: 1 x 1.5 + 0.5
        (
            [(CROP, _run("(60, 40)\n")), ("<think>it printed 60</think><answer>60</answer>", None)],
            (1, 1, 1, 2.0),
        ),
        # the same trace answering 40: wrong, but it agrees with what the code printed: 0 x 1.5 + 0.5
        ([(CROP, _run("(60, 40)\n")), ("<think>so 40</think><answer>40</answer>", None)], (0, 1, 1, 0.5)),
        # right, but the code printed 64 and the answer does not follow from it: 1 x 1 + 0.5
        ([(CROP, _run("64\n")), ("<think>hm</think><answer>60</answer>", None)], (1, 0, 1, 1.5)),
        # no code: the evidence is the final turn's reasoning ("sixty" is 60)
        ([("<think>it is sixty pixels</think><answer>60</answer>", None)], (1, 1, 1, 2.0)),
        # a failed run is no evidence; no <think>: bad format; still right: 1 x 1 + 0
        ([(CROP, _run("60", ok=False)), ("<answer>60</answer>", None)], (1, 0, 0, 1.0)),
        # never answers: nothing
        ([("<think>no idea</think>", None), ("<think>still none</think>", None)], (0, 0, 0, 0.0)),
    ],
)
def test_thyme_reward_on_hand_worked_traces(turns, expected):
    score = thyme_score(_trace(*turns), make_verifier("number"), Reference("60"))
    assert (score.result, score.consistency, score.format, score.reward) == expected


def test_consistency_of_a_word_answer():
    verifier = make_verifier("normalized")
    trace = _trace(
        (CROP, _run("the dominant colour is dark red\n")), ("<think>red</think><answer>Red.</answer>", None)
    )
    assert thyme_score(trace, verifier, Reference("red")).as_dict() == {
        "result": 1.0, "consistency": 1.0, "format": 1.0, "reward": 2.0}  # fmt: skip
    trace = _trace((CROP, _run("reddish\n")), ("<think>red</think><answer>red</answer>", None))
    assert thyme_score(trace, verifier, Reference("red")).consistency == 0.0  # whole words only


def test_tools_config_is_validated():
    from keye.posttrain.rl import RLConfig

    cfg = load_config(THYME_TINY, cls=RLConfig)
    assert cfg.rl.tools.enabled and cfg.rl.tools.code_temperature == 0.0 and cfg.rl.replay_per_prompt == 0
    assert cfg.rl.tools.sandbox().timeout_s == cfg.rl.tools.timeout_s
    for bad, key in (
        ("rl.replay_per_prompt=2", "replay"),
        ("rl.rewards=[{name: number}, {name: format}]", "R_format"),
        ("rl.tools.max_rounds=0", "max_rounds"),
        ("rl.top_p=0.9", "top_p"),
    ):
        with pytest.raises(ConfigError, match=key):
            load_config(THYME_TINY, [bad], cls=RLConfig)


# ----------------------------------------------------------------------------------------------------------------------
# Scripted rollouts on a tiny random model
# ----------------------------------------------------------------------------------------------------------------------


class Force(LogitsProcessor):
    """Force the scripted token ids of one turn, then let the model sample."""

    def __init__(self, ids: list[int], start: int):
        self.ids, self.start = ids, start

    def __call__(self, input_ids, scores):
        i = input_ids.shape[1] - self.start
        if i >= len(self.ids):
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[i]] = 0.0
        return forced


class Record(LogitsProcessor):
    """The sampling distribution at every step (after the temperature processor, before forcing)."""

    def __init__(self):
        self.logps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.logps.append(torch.log_softmax(scores.float(), dim=-1)[0].clone())
        return scores


class ScriptedSession(ToolSamplingSession):
    def __init__(self, *args, script: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.script, self.records = list(script), []

    def extra_logits_processors(self, start):
        text = self.script.pop(0) if self.script else ""
        self.records.append(Record())
        return [
            self.records[-1],
            Force(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"], start),
        ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from keye.training.config import ModelConfig
    from keye.training.model import load_model

    folder = make_tiny_model_folder(tmp_path_factory.mktemp("thyme") / "model")
    model, processor = load_model(ModelConfig(path=f"random:{folder}"), seed=0)
    model.eval().generation_config.eos_token_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model, processor


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(path)
    return path


def _scripted(tiny, image, tmp_path, script, **kwargs):
    model, processor = tiny
    pool = ConversationPool(model, processor)
    session = pool.session(ScriptedSession, script=script, system=TOOL_SYSTEM_PROMPT)
    (trace,) = pool.run(
        [lambda: run_tool_loop(session, "How wide is it?", [image], out_dir=tmp_path / "out", **kwargs)]
    )
    return session, trace


@needs_bwrap
def test_scripted_code_round_masks_the_sandbox_and_records_temperatures(tiny, image, tmp_path):
    model, processor = tiny
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    answers = [
        "<think>it printed 60</think><answer>60</answer><|im_end|>",
        "<think>no</think><answer>40</answer><|im_end|>",
    ]
    rows = [
        _scripted(tiny, image, tmp_path / str(i), [CROP, a], max_new_tokens=120)
        for i, a in enumerate(answers)
    ]
    for _, trace in rows:
        assert trace.stopped == "answer" and trace.rounds[0].result.ok
        assert trace.rounds[0].result.stdout.strip() == "(60, 40)" and len(trace.rounds[0].result.images) == 1
    rollout = build_tool_group(
        [s.conversation(t) for s, t in rows], [], pad_token_id=tok.pad_token_id, temperature=1.0
    )
    g, r = rollout.response_ids.shape
    assert g == 2
    assert rollout.response_mask.shape == rollout.temperatures.shape == rollout.attention_mask.shape == (g, r)

    for row, answer in enumerate(answers):
        ids, mask = rollout.response_ids[row], rollout.response_mask[row].bool()
        real = rollout.attention_mask[row].bool()
        # the loss covers exactly the tokens the model wrote: the code turn (cut at </code>) and the answer turn
        expected = (
            tok(CROP, add_special_tokens=False)["input_ids"]
            + tok(answer, add_special_tokens=False)["input_ids"]
        )
        assert ids[mask].tolist() == expected and ids[real][-1] == end
        # everything else of the conversation is the environment's: <|im_end|>, the sandbox turn with its image
        env = ids[real & ~mask]
        env_text = processor.decode(env, skip_special_tokens=False)
        assert "<sandbox_output>(60, 40)" in env_text and "</sandbox_output>" in env_text
        assert env[0] == end  # the environment closed the code turn: generation stopped at </code>
        image_pads = ids == processor.token_ids["image_pad"]
        assert image_pads.sum() > 0 and not (image_pads & mask).any()  # the crop is an input, never a target
        assert rollout.response_vision[row][0]["image_grid_thw"].shape == (1, 3)
        # temperatures: 0 from after <code> up to and including </code>, 1.0 for every other model token
        temps = rollout.temperatures[row][mask]
        code_at = len(tok("<think>measure it</think><code>", add_special_tokens=False)["input_ids"])
        code_end = len(tok(CROP, add_special_tokens=False)["input_ids"])
        assert (temps[:code_at] == 1.0).all() and (temps[code_at:code_end] == 0.0).all()
        assert (temps[code_end:] == 1.0).all()
        assert (rollout.temperatures[row][~mask] == 1.0).all()

    # old log-probs from the full forward (prompt image + sandbox image in the middle, per-row positions) equal the
    # distribution each text token was sampled from during the KV-cached turns
    with torch.no_grad():
        old = policy_logprobs(model, rollout)  # (G, R)
    assert (old[~rollout.response_mask.bool()] == 0).all()
    for row, (session, _) in enumerate(rows):
        sampled = []
        for turn, record in zip(session.turns, session.records):
            toks = session.prefix.ids[0, turn.start : turn.start + turn.length]
            sampled += [lp[t] for lp, t in zip(record.logps, toks)]
        sampled = torch.stack(sampled)  # (model tokens,)
        text = rollout.temperatures[row][rollout.response_mask[row].bool()] == 1.0
        torch.testing.assert_close(
            old[row][rollout.response_mask[row].bool()][text], sampled[text], atol=1e-4, rtol=0
        )

    # the loss: advantages from Thyme's reward, finite, with a gradient
    ref = Reference("60")
    rollout.traces = [t for _, t in rows]
    scores = [thyme_score(t, make_verifier("number"), ref) for t in rollout.traces]
    assert [s.reward for s in scores] == [2.0, 0.5]
    rollout.old_logps = old
    model.train()
    try:
        new = policy_logprobs(model, rollout)
        loss, _ = gspo_loss(new, old, group_advantages(torch.tensor([[s.reward for s in scores]]))[0],
                            rollout.response_mask)  # fmt: skip
        loss.backward()
    finally:
        model.eval()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert math.isfinite(float(loss.detach())) and grads and all(torch.isfinite(gr).all() for gr in grads)
    model.zero_grad(set_to_none=True)


@needs_bwrap
def test_code_at_temperature_zero_is_greedy(tiny, image, tmp_path):
    model, processor = tiny
    tok = processor.tokenizer
    prefix = "<think>crop</think><code>\n```python\n"
    n_prefix = len(tok(prefix, add_special_tokens=False)["input_ids"])
    torch.manual_seed(0)
    session, trace = _scripted(tiny, image, tmp_path, [prefix], max_new_tokens=n_prefix + 8, max_rounds=1)
    first = session.turns[0]
    assert first.length == n_prefix + 8  # the free part: 8 tokens inside the open code block
    code_at = len(tok("<think>crop</think><code>", add_special_tokens=False)["input_ids"])
    assert (first.temperatures[:code_at] == 1.0).all() and (first.temperatures[code_at:] == 0.0).all()
    conv = session.conversation(trace)
    end = first.start + first.length  # the first turn only: a forward over the prompt image and the code turn
    with torch.no_grad():
        logits = model(input_ids=conv.ids[:, :end], position_ids=conv.position_ids[:, :, :end],
                       **conv.vision[0]).logits[0]  # fmt: skip
    free = range(first.start + n_prefix, first.start + first.length)
    # each code token is the argmax of the full forward's logits at its position
    assert [int(conv.ids[0, t]) for t in free] == [int(logits[t - 1].argmax()) for t in free]
    rollout = build_tool_group([conv], [], pad_token_id=tok.pad_token_id, temperature=1.0)
    with torch.no_grad():
        old = policy_logprobs(model, rollout)[0]
    at = first.start - rollout.prompt_length
    greedy = old[at + n_prefix : at + first.length]
    assert (greedy > -1e-3).all()  # log pi_0 of the greedy token: about 0 (probability 1)


class EosBias(LogitsProcessor):
    def __init__(self, eos: int, bias: float):
        self.eos, self.bias = eos, bias

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.eos] += self.bias
        return scores


def test_a_batched_group_equals_each_response_generated_alone(tiny, image, tmp_path, monkeypatch):
    """The group's conversations decoded in one batch give the same tokens, masks and old log-probs as each decoded
    alone (max_batch=1), for a fixed seed: rows of different lengths (the random model ends its turns early now and
    then), each with a second turn (the demanded answer) that continues from its own returned KV cache."""
    model, processor = tiny
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    monkeypatch.setattr(
        ToolSamplingSession, "extra_logits_processors", lambda self, start: [EosBias(eos, 8.5)]
    )

    def group(max_batch: int):
        torch.manual_seed(7)
        return sample_tool_group(
            model, processor, [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                            {"type": "text", "text": "How wide is it?"}]}],
            4, max_rounds=1, max_new_tokens=24, sandbox=SandboxConfig(), out_dir=tmp_path / str(max_batch),
            max_batch=max_batch,
        )  # fmt: skip

    batched, alone = group(4), group(1)
    assert [len(t.rounds) for t in batched.traces] == [2, 2, 2, 2]  # no code: an answer was demanded of each
    lengths = batched.attention_mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # the rows differ in length: the batch was padded
    assert torch.equal(batched.response_ids, alone.response_ids)
    assert torch.equal(batched.response_mask, alone.response_mask)
    assert torch.equal(batched.temperatures, alone.temperatures)
    torch.testing.assert_close(batched.old_logps, alone.old_logps, atol=1e-5, rtol=0)
    assert [t.to_dict() for t in batched.traces] == [t.to_dict() for t in alone.traces]


def test_the_prompts_of_a_step_decode_together_with_the_tokens_of_each_alone(tiny, image, monkeypatch):
    """RL's `ToolSampler.each_prompt`: two prompts, each sampling two groups one after another (as a failed group
    escalates its hint), their conversations in one pool. Turns of both prompts share decoding steps, and the
    tokens are those of every response generated alone (``rl.tools.batch=1``), whichever prompt's turns came first;
    the old log-probs are left to the loss (on-policy)."""
    from keye.batching import BatchDecoder
    from keye.posttrain.rl import GSPOConfig, ToolsConfig
    from keye.posttrain.samplers import make_sampler

    model, processor = tiny
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    monkeypatch.setattr(
        ToolSamplingSession, "extra_logits_processors", lambda self, start: [EosBias(eos, 8.5)]
    )
    widest = []
    step = BatchDecoder.step
    monkeypatch.setattr(BatchDecoder, "step", lambda self: (widest.append(len(self)), step(self))[1])
    questions = ["How wide is it?", "What colour is it?"]

    def job(question, sample):
        content = [{"type": "image", "image": str(image)}, {"type": "text", "text": question}]
        first = sample([{"role": "user", "content": content}], 3)
        hinted = sample([{"role": "user", "content": [*content, {"type": "text", "text": "Crop it."}]}], 3)
        return first, hinted

    def run(batch: int):
        rl = GSPOConfig(max_new_tokens=24, tools=ToolsConfig(enabled=True, max_rounds=1, batch=batch))
        sampler = make_sampler(rl, {}, contextlib.nullcontext)
        torch.manual_seed(3)
        widest.clear()
        groups = sampler.each_prompt(model, processor, [functools.partial(job, q) for q in questions])
        return [g for pair in groups for g in pair], max(widest)

    together, width = run(0)
    alone, width_alone = run(1)
    assert width > 3 and width_alone == 1  # more than one group's rows in a decoding step
    for a, b in zip(together, alone):
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
        assert [t.to_dict() for t in a.traces] == [t.to_dict() for t in b.traces]
        assert a.old_logps is None
    assert not torch.equal(together[0].response_ids, together[2].response_ids)  # the prompts' own seeds


class ForcedPooled(PooledSession):
    """A pooled turn that writes a fixed text (then whatever the model says): the same forcing as `Force`."""

    def __init__(self, *args, text: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.text = text

    def sequence_settings(self, prompt_ids):
        force = Force(
            self.processor.tokenizer(self.text, add_special_tokens=False)["input_ids"], prompt_ids.shape[1]
        )
        prompt = prompt_ids[0].tolist()
        return {"logits_processor": lambda tokens, scores: force(torch.tensor([prompt + tokens]), scores),
                "generator": torch.Generator().manual_seed(0)}  # fmt: skip


def test_a_tool_turn_ends_at_code_close_in_chat_and_in_rl_alike(tiny):
    """`run_tool_loop` sends every turn with stop_at=</code>: a chat session (generate + StopAtText, as keye chat
    --tools and the demo run it) and a pooled session (BatchDecoder's stop string, as RL runs it) end the turn at the
    same token, the one that completes </code>, whatever the model would write next."""
    model, processor = tiny
    text = "<think>crop it</think><code>\n```python\nprint(1)\n```\n</code> and then more words"
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    content = [{"type": "text", "text": "How wide is it?"}]
    chat = ChatSession(model, processor)
    forced = Force(ids, None)

    class Late(LogitsProcessor):  # Force needs the prompt length, known once generate starts
        def __call__(self, input_ids, scores):
            forced.start = forced.start or input_ids.shape[1]
            return forced(input_ids, scores)

    reply = chat.send(content, max_new_tokens=64, stop_at=CODE_CLOSE, logits_processor=[Late()])
    pool = ConversationPool(model, processor)
    pooled = pool.session(ForcedPooled, text=text)
    (pooled_reply,) = pool.run([lambda: pooled.send(content, max_new_tokens=64, stop_at=CODE_CLOSE)])
    chat_ids = chat.prefix.ids[0, -reply.num_tokens :].tolist()
    pooled_ids = pooled.prefix.ids[0, -pooled_reply.num_tokens :].tolist()
    assert chat_ids == pooled_ids
    end = next(n for n in range(1, len(ids) + 1) if CODE_CLOSE in processor.tokenizer.decode(ids[:n]))
    assert chat_ids == ids[:end]  # cut at the token that completes </code>, not later
    assert reply.text == pooled_reply.text and reply.text.endswith(CODE_CLOSE)


# ----------------------------------------------------------------------------------------------------------------------
# The recipe, end to end
# ----------------------------------------------------------------------------------------------------------------------


@needs_bwrap
def test_keye_rl_thyme_tiny_two_steps(tmp_path):
    from keye.cli import main
    from keye.posttrain.rewards import VERIFIERS, register_verifier
    from keye.posttrain.rl import write_rl_prompts
    from keye.posttrain.tooltask import write_tool_task

    if "test_parity" not in VERIFIERS:
        # A random model never answers right; a reward that varies within a group gives GSPO non-zero advantages.
        register_verifier("test_parity")(lambda: lambda response, ref: float(len(response) % 2 == 0))
    model = make_tiny_model_folder(tmp_path / "model")
    prompts = write_rl_prompts(write_tool_task(tmp_path / "task", n=2, size=56), tmp_path / "thyme.jsonl")
    out = tmp_path / "run"
    status = main([
        "rl", "--config", str(THYME_TINY),
        f"model.path=random:{model}", f"output_dir={out}", f"data.sources=[{{path: {prompts}, weight: 1}}]",
        "max_steps=2", "save_every=2", "mixed_precision='no'",
        "rl.group_size=4", "rl.prompts_per_step=2", "rl.max_new_tokens=4", "rl.tools.max_rounds=1",
        "rl.rewards=[{name: test_parity}]", "rl.success=test_parity",
        f"rl.eval_manifest={prompts}", "rl.eval_n=1",
    ])  # fmt: skip
    assert status == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss"]) and 0 <= m["reward_mean"] <= 2 for m in metrics)
    trained = [m for m in metrics if m["groups_trained"]]
    assert trained
    # on-policy: the old log-probs are the first update's own forward (detached), a ratio of exactly 1
    assert all(abs(m["ratio_mean"] - 1) < 1e-5 and m["grad_norm"] > 0 for m in trained)
    from safetensors.torch import load_file

    lora_b = [
        v
        for k, v in load_file(out / "checkpoints" / "step-000002" / "trainable.safetensors").items()
        if "lora_B" in k
    ]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero: the policy was updated
    assert {"code_rounds", "sandbox_ok", "answered", "r_result", "r_consistency", "r_format"} <= set(
        metrics[0]
    )
    traces = [json.loads(x) for x in (out / "tool_traces.jsonl").read_text().splitlines()]
    assert len(traces) == 2 * 4 and all(t["trace"]["rounds"] for t in traces)
    assert [json.loads(x)["when"] for x in (out / "eval.jsonl").read_text().splitlines()] == [
        "before",
        "after",
    ]
    assert (out / "final").exists()


def test_evaluate_tools_scores_answers_format_and_rounds_per_type(tmp_path, monkeypatch):
    """`keye posttrain-eval --tools`'s numbers from known conversations: accuracy and well-formed share per question
    type (a right answer in a malformed conversation counts as right, not as well formed), median code rounds."""
    import keye.posttrain.thyme as thyme
    from keye.posttrain.rl import write_rl_prompts
    from keye.posttrain.tooltask import write_tool_task

    manifest = write_rl_prompts(write_tool_task(tmp_path / "task", n=3, seed=2), tmp_path / "held.jsonl")
    answers = [
        json.loads(x)["meta"]["answer"]
        for x in (tmp_path / "task" / "manifest.jsonl").read_text().splitlines()
    ]
    traces = [  # spot: one code round, right; measure: two rounds, right, no <think> in the answer; zoom: wrong
        _trace((CROP, _run("")), (f"<think>seen</think><answer>{answers[0]}</answer>", None)),
        _trace(
            (CROP, _run("1", ok=False)), (CROP, _run(answers[1])), (f"<answer>{answers[1]}</answer>", None)
        ),
        _trace((f"<think>no</think><answer>{int(answers[2]) + 1}</answer>", None)),
    ]
    seen = []

    def fake_traces(model, processor, prompts, **kwargs):
        seen.append(kwargs)
        return traces[: len(prompts)]

    monkeypatch.setattr(thyme, "tool_traces", fake_traces)
    model = torch.nn.Linear(1, 1)  # not run: the conversations are the fake's
    result = thyme.evaluate_tools(model, None, manifest, make_verifier("normalized"), n=3, max_rounds=2,
                                  max_new_tokens=8, sandbox=SandboxConfig())  # fmt: skip
    assert result["by_qtype"] == {"measure": 1.0, "spot": 1.0, "zoom": 0.0} and result["n"] == 3
    assert result["well_formed_by_qtype"] == {"measure": 0.0, "spot": 1.0, "zoom": 1.0}
    assert result["well_formed"] == pytest.approx(2 / 3) and result["median_code_rounds"] == 1
    assert len(result["traces"]) == 3 and seen[0]["max_rounds"] == 2


@needs_bwrap
def test_keye_posttrain_eval_tools_prints_both_sides_and_writes_the_traces(tiny, tmp_path, capsys):
    """The CLI as the README runs it (`keye posttrain-eval --tools`), on a saved tiny random model: one JSON line
    with the tool loop's accuracy, well-formed share and rounds beside the no-tools accuracy, and every
    conversation in ``--traces``."""
    from keye.cli import main
    from keye.posttrain.rl import write_rl_prompts
    from keye.posttrain.tooltask import write_tool_task

    model, processor = tiny
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    manifest = write_rl_prompts(write_tool_task(tmp_path / "task", n=2, size=56), tmp_path / "held.jsonl")
    traces = tmp_path / "traces.jsonl"
    capsys.readouterr()
    status = main(["posttrain-eval", "--model", str(folder), "--manifest", str(manifest), "--tools", "--verifier",
                   "normalized", "--n", "2", "--max-new-tokens", "8", "--traces", str(traces)])  # fmt: skip
    assert status == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    result = json.loads(line)
    assert result["tools"]["n"] == result["no_tools"]["n"] == 2
    assert 0 <= result["tools"]["well_formed"] <= 1 and "median_code_rounds" in result["tools"]
    assert set(result["tools"]["by_qtype"]) == set(result["no_tools"]["by_qtype"])
    assert [json.loads(x)["question"] for x in traces.read_text().splitlines()] == [
        m["content"][-1]["text"]
        for x in manifest.read_text().splitlines()
        for m in json.loads(x)["messages"]
        if m["role"] == "user"
    ]
