"""Multi-turn chat over images and videos, with streaming and a KV cache kept across turns.

A `ChatSession` holds the conversation so far as a `CachedPrefix` (token ids, M-RoPE positions, KV cache). Each new
turn tokenizes only the new user message (and encodes only its new images/videos); the earlier turns, videos
included, stay in the cache, so a second question about the same video does not run the vision tower again.

A `ConversationPool` runs many conversations at once: each is driven from its own thread (e.g. by
`keye.tools.loop.run_tool_loop`, whose sandbox runs then overlap) through a `PooledSession`, and every pending turn of
every conversation decodes in one `keye.batching.BatchDecoder` batch on the pool's thread. RL draws a Thyme group this
way. ``send(..., stop_at=TEXT)`` ends a turn with the token that completes ``TEXT`` in both kinds of session.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from keye.batching import BatchDecoder, Sequence, cache_from_layers, prefill
from keye.compression import compress_inputs, compressor
from keye.modeling import KeyeForConditionalGeneration
from keye.prefix import CachedPrefix
from keye.processing import VISION_INPUTS, KeyeProcessor, VideoInput


@dataclass
class Reply:
    """One assistant reply. ``prompt_tokens`` is the conversation the reply follows (earlier turns come from the KV
    cache, only the new ones are computed), ``vision_tokens`` how many of them stand for images and video frames
    (after compression); ``ttft_s`` is the time to the first streamed text (None when not streamed or no text
    came), ``seconds`` the whole turn."""

    text: str
    num_tokens: int
    prompt_tokens: int
    videos: list[VideoInput] = field(default_factory=list)
    vision_tokens: int = 0
    ttft_s: float | None = None
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float | None:
        """Decoding speed: tokens after the first over the time after the first text (None when unmeasurable)."""
        if self.ttft_s is None or self.num_tokens < 2 or self.seconds <= self.ttft_s:
            return None
        return (self.num_tokens - 1) / (self.seconds - self.ttft_s)

    def stats(self) -> str:
        """One line: time to first token, tokens/s, new tokens, prompt and vision tokens."""
        parts = []
        if self.ttft_s is not None:
            parts.append(f"first token after {self.ttft_s:.2f} s")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tokens/s")
        parts.append(f"{self.num_tokens} new tokens in {self.seconds:.2f} s")
        parts.append(f"prompt {self.prompt_tokens} tokens ({self.vision_tokens} vision)")
        return " · ".join(parts)


class ChatSession:
    """A conversation with one model. ``ask`` adds a user turn and returns (or streams) the assistant's reply."""

    def __init__(
        self,
        model: KeyeForConditionalGeneration,
        processor: KeyeProcessor,
        *,
        think: bool | None = None,
        system: str | None = None,
        compress: str = "none",
        **video_overrides,
    ):
        self.model = model
        self.processor = processor
        self.think = think
        self.compress = compressor(compress)  # chosen once: an unknown name fails here, not at the first turn
        self.video_overrides = video_overrides
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.prefix = CachedPrefix.empty(model)  # everything said so far, generated tokens too
        self.videos: list[VideoInput] = []
        self.last_reply: Reply | None = None

    def _new_turn_inputs(self, content: list[dict]):
        """Tokens of the new user turn (+ generation prompt), positions continuing after the conversation so far."""
        turn = [{"role": "user", "content": content}]
        if not self.prefix.length:
            turn = self.messages + turn
        processed = self.processor(turn, think=self.think, **self.video_overrides)
        inputs, _ = compress_inputs(self.model, processed, self.compress)
        inputs["videos"] = processed.videos
        ids, pos = inputs["input_ids"], inputs["position_ids"]
        if self.prefix.length:
            # Close the previous assistant turn exactly as a full re-render of the conversation would.
            eos = self.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
            closing = [eos] if self.prefix.ids[0, -1].item() != eos else []
            closing = torch.tensor(
                [closing + self.processor.tokenizer("\n", add_special_tokens=False)["input_ids"]]
            )
            ids = torch.cat([closing, ids], dim=1)
            pos = torch.cat([torch.arange(closing.shape[1]).expand(3, 1, -1), pos + closing.shape[1]], dim=2)
            pos = pos + self.prefix.next_position()
        return inputs, ids, pos

    def _generate_kwargs(self, content, max_new_tokens, gen_kwargs):
        inputs, new_ids, new_pos = self._new_turn_inputs(content)
        device = self.model.device
        kwargs = self.prefix.continue_with(new_ids, new_pos, device)
        kwargs.update(max_new_tokens=max_new_tokens, do_sample=False, **gen_kwargs)
        for key in (*VISION_INPUTS, "video_embeds"):
            if key in inputs:
                kwargs[key] = inputs[key].to(device)
        return inputs, kwargs

    def _finish(
        self, kwargs, out_ids: torch.Tensor, inputs, content, began: float, ttft: float | None
    ) -> Reply:
        prompt_len = kwargs["input_ids"].shape[1]
        config = self.model.config
        vision = torch.isin(
            kwargs["input_ids"], torch.tensor([config.image_token_id, config.video_token_id])
        ).sum()
        new_tokens = out_ids[:, prompt_len:].cpu()
        n = new_tokens.shape[1]
        start = int(kwargs["position_ids"].max()) + 1
        self.prefix.commit(
            torch.cat([kwargs["input_ids"].cpu(), new_tokens], dim=1),
            torch.cat([kwargs["position_ids"].cpu(), torch.arange(start, start + n).expand(3, 1, -1)], 2),
        )
        text = self.processor.decode(new_tokens[0], skip_special_tokens=True).strip()
        self.messages += [{"role": "user", "content": content}, {"role": "assistant", "content": text}]
        self.videos += inputs["videos"]
        self.last_reply = Reply(
            text=text,
            num_tokens=n,
            prompt_tokens=prompt_len,
            videos=inputs["videos"],
            vision_tokens=int(vision),
            ttft_s=ttft,
            seconds=time.perf_counter() - began,
        )
        return self.last_reply

    @staticmethod
    def content(text: str, images=(), videos=()) -> list[dict]:
        """A user turn's content parts: videos, then images, then the text."""
        parts = [{"type": "video", "video": v} for v in videos] + [
            {"type": "image", "image": i} for i in images
        ]
        return parts + [{"type": "text", "text": text}]

    @torch.inference_mode()
    def send(
        self, content: list[dict], *, max_new_tokens: int = 256, stop_at: str | None = None, **gen_kwargs
    ) -> Reply:
        """Add a user turn given as content parts (any order of text/image/video) and wait for the whole reply;
        ``stop_at``: end the turn with the token that completes this text (`StopAtText`)."""
        start = time.perf_counter()
        inputs, kwargs = self._generate_kwargs(content, max_new_tokens, gen_kwargs)
        if stop_at is not None:
            stops = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
            stops.append(StopAtText(self.processor.tokenizer, kwargs["input_ids"].shape[1], stop_at))
            kwargs["stopping_criteria"] = stops
        out = self.model.generate(**kwargs)
        return self._finish(kwargs, out, inputs, content, start, None)

    def ask(self, text: str, *, images=(), videos=(), max_new_tokens: int = 256, **gen_kwargs) -> Reply:
        """Ask and wait for the whole reply."""
        return self.send(self.content(text, images, videos), max_new_tokens=max_new_tokens, **gen_kwargs)

    def stream(
        self, text: str, *, images=(), videos=(), max_new_tokens: int = 256, **gen_kwargs
    ) -> Iterator[str]:
        """Ask and yield the reply's text as it is generated; ``last_reply`` holds the whole reply afterwards."""
        start, ttft = time.perf_counter(), None
        content = self.content(text, images, videos)
        inputs, kwargs = self._generate_kwargs(content, max_new_tokens, gen_kwargs)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def run():
            try:
                with torch.inference_mode():
                    result["out"] = self.model.generate(**kwargs, streamer=streamer)
            except BaseException as e:  # re-raised in the caller's thread below
                result["error"] = e
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        for piece in streamer:
            if ttft is None and piece:
                ttft = time.perf_counter() - start
            yield piece
        thread.join()
        if "error" in result:
            raise result["error"]
        self._finish(kwargs, result["out"], inputs, content, start, ttft)


class StopAtText(StoppingCriteria):
    """Ends a turn at the first token after which its decoded text contains ``text``; that token is the turn's
    last. `BatchDecoder`'s stop strings apply the same rule, so a `PooledSession` turn ends at the same token."""

    def __init__(self, tokenizer, prompt_length: int, text: str):
        self.tokenizer, self.prompt_length, self.text = tokenizer, prompt_length, text

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = [
            self.text in self.tokenizer.decode(row[self.prompt_length :], skip_special_tokens=True)
            for row in input_ids
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # (B,)


# ----------------------------------------------------------------------------------------------------------------------
# Many conversations decoded together
# ----------------------------------------------------------------------------------------------------------------------

T = TypeVar("T")


class PooledSession(ChatSession):
    """A `ChatSession` whose turns a `ConversationPool` decodes, batched with other conversations' turns.

    ``send`` is called from one of `ConversationPool.run`'s worker threads and waits for its turn. Greedy unless a
    subclass samples (`sequence_settings`); `turn_done` sees every finished turn. Make one with
    ``pool.session(cls, **chat_kwargs)``."""

    def __init__(self, pool: ConversationPool, model, processor, **kwargs):
        super().__init__(model, processor, **kwargs)
        self.pool = pool

    def send(
        self, content: list[dict], *, max_new_tokens: int = 256, stop_at: str | None = None, **gen_kwargs
    ) -> Reply:
        if gen_kwargs:
            raise TypeError(f"a pooled turn takes no generate() arguments, got {sorted(gen_kwargs)}")
        return self.pool.submit(self, content, max_new_tokens, stop_at)

    def sequence_settings(self, prompt_ids: torch.Tensor) -> dict:
        """Extra `keye.batching.Sequence` fields for the turn about to be decoded after ``prompt_ids`` (1, P), the
        whole conversation so far (sampling: ``logits_processor``, ``generator``). Runs on the pool's thread."""
        return {}

    def turn_done(self, reply: Reply, seq: Sequence, inputs, prompt_length: int) -> None:
        """Called on the pool's thread once a turn is decoded and committed (its processor ``inputs``)."""


class ConversationPool:
    """Decodes the turns of many `PooledSession` conversations together, at most ``max_batch`` at once.

    ``run(jobs)`` starts each job (a function driving one or more sessions, e.g. a tool loop) on its own thread and
    serves their turns on the calling thread, the one that should own the model (processor, prefill and decoding
    all run there): a turn is prefilled alone, then decodes with every other turn in flight, one token per step for
    all of them, and leaves the batch when it ends; identical first turns (a group's shared prompt) are prefilled
    once. A conversation's KV cache goes back to its session between turns, so a sandbox run or a slow job holds up
    no one. A job may itself call ``run`` (e.g. RL: one job per prompt, each running its group's conversations):
    those jobs start on threads of their own and their turns join the same batch."""

    def __init__(self, model, processor, *, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.processor, self.max_batch = model, processor, max_batch
        self.decoder = BatchDecoder(model, processor.tokenizer)
        self.requests: queue.Queue = queue.Queue()
        # the last first turns prefilled (one per prompt in flight): (input ids, vision inputs, its state)
        self._openings: collections.deque = collections.deque(maxlen=8)
        self._server: int | None = None  # the thread serving turns while `run` is on

    def session(self, cls: type[PooledSession] = PooledSession, **kwargs) -> PooledSession:
        return cls(self, self.model, self.processor, **kwargs)

    def submit(self, session: PooledSession, content, max_new_tokens: int, stop_at: str | None) -> Reply:
        """From a worker thread: queue the turn and wait until it is decoded."""
        box: dict = {"done": threading.Event()}
        self.requests.put((session, content, max_new_tokens, stop_at, box))
        box["done"].wait()
        if "error" in box:
            raise box["error"]
        return box["reply"]

    def run(self, jobs: list[Callable[[], T]]) -> list[T]:
        """Run ``jobs`` on worker threads, decoding their turns here (or, called from a job, on the thread already
        serving this pool); their results in order (the first error of a job is raised after all have ended)."""
        results: list = [None] * len(jobs)
        errors: dict[int, BaseException] = {}

        def work(i: int, job: Callable[[], T]) -> None:
            try:
                results[i] = job()
            except BaseException as e:  # re-raised below, on the calling thread
                errors[i] = e

        threads = [threading.Thread(target=work, args=(i, job), daemon=True) for i, job in enumerate(jobs)]
        for t in threads:
            t.start()
        if self._server not in (None, threading.get_ident()):  # nested: the serving thread decodes them
            for t in threads:
                t.join()
        else:
            self._server = threading.get_ident()
            try:
                self._serve(threads)
            finally:
                self._server = None
        if errors:
            raise errors[min(errors)]
        return results

    def _serve(self, threads: list[threading.Thread]) -> None:
        while True:
            while len(self.decoder) < self.max_batch:
                try:
                    request = self.requests.get(timeout=0 if len(self.decoder) else 0.005)
                except queue.Empty:
                    break
                self._admit(*request)
            if len(self.decoder):
                self.decoder.step()
            elif self.requests.empty() and not any(t.is_alive() for t in threads):
                break

    def _prefill(self, kwargs: dict, vision: dict) -> dict:
        """`prefill`, once for the identical first turns of several conversations (a group's rows share their
        prompt): the state is shared, never written to (`BatchDecoder.add` copies it into the batch). With
        ``max_batch=1`` every turn is prefilled on its own, as if each conversation ran alone."""
        cache = kwargs.get("cache")
        if self.max_batch == 1 or (cache is not None and cache.get_seq_length()):
            return prefill(self.model, kwargs, **vision)  # the session's cache is left as it was
        ids = kwargs["input_ids"]
        for ids0, vision0, state in self._openings:
            same = vision.keys() == vision0.keys() and all(
                torch.equal(v, vision0[k]) if isinstance(v, torch.Tensor) else v == vision0[k]
                for k, v in vision.items()
            )
            if same and torch.equal(ids, ids0):
                return dict(state)
        state = prefill(self.model, kwargs, **vision)
        self._openings.append((ids, vision, state))
        return dict(state)

    def _admit(
        self, session: PooledSession, content, max_new_tokens: int, stop_at: str | None, box: dict
    ) -> None:
        """Process and prefill one turn, and add it to the batch; errors go back to the waiting thread."""
        began = time.perf_counter()
        try:
            inputs, kwargs = session._generate_kwargs(content, max_new_tokens, {})
            vision = {k: kwargs.pop(k) for k in (*VISION_INPUTS, "video_embeds") if k in kwargs}
            start = kwargs["input_ids"].shape[1]
            settings = session.sequence_settings(kwargs["input_ids"])
            state = self._prefill(kwargs, vision)
        except BaseException as e:
            box["error"] = e
            box["done"].set()
            return

        def done(seq: Sequence) -> None:
            try:
                session.prefix.cache = cache_from_layers(self.model, seq.cache)
                out = torch.cat([kwargs["input_ids"].cpu(), torch.tensor([seq.tokens], dtype=torch.long)], 1)
                reply = session._finish(kwargs, out, inputs, content, began, None)
                session.turn_done(reply, seq, inputs, start)
                box["reply"] = reply
            except BaseException as e:  # raised in the worker thread
                box["error"] = e
            box["done"].set()

        self.decoder.add(
            Sequence(
                **state,
                max_new_tokens=max_new_tokens,
                stop=[stop_at] if stop_at else [],
                keep_eos=True,  # as generate() returns it: the end-of-turn token is part of the reply
                return_cache=True,
                on_done=done,
                **settings,
            )
        )
