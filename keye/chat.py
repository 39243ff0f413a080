"""Multi-turn chat over images and videos, with streaming and a KV cache kept across turns.

A `ChatSession` holds the conversation so far as a `CachedPrefix` (token ids, M-RoPE positions, KV cache). Each new
turn tokenizes only the new user message (and encodes only its new images/videos); the earlier turns, videos
included, stay in the cache, so a second question about the same video does not run the vision tower again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import TextIteratorStreamer

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
    def send(self, content: list[dict], *, max_new_tokens: int = 256, **gen_kwargs) -> Reply:
        """Add a user turn given as content parts (any order of text/image/video) and wait for the whole reply."""
        start = time.perf_counter()
        inputs, kwargs = self._generate_kwargs(content, max_new_tokens, gen_kwargs)
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
