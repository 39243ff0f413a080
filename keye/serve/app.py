"""``keye serve``: an OpenAI-compatible chat server (FastAPI + uvicorn) over one keye model.

Routes: ``POST /v1/chat/completions`` (non-streaming, or Server-Sent Events with ``stream: true``), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text). Videos are planned server-side with the model's own Slow-Fast
settings (``mm_processor_kwargs``: ``fps``, ``max_frames``, ``token_budget`` override them per request).

The engine runs one generation at a time on a worker thread; at most ``queue_size`` more requests wait, and further
ones get 429. Prefix cache: a conversation whose first user turn holds media keeps that turn's prefix (system
prompt, the media, up to the last ``<|vision_end|>``) as a `CachedPrefix`, keyed by the media's SHA-256 and the
video settings; a request that re-sends the same media (as OpenAI clients do on every turn) prefills only what comes
after it, and its usage reports those tokens as ``prompt_tokens_details.cached_tokens``. The planned videos are kept
too, so a re-sent video is not decoded again.

First slice of issue 19: no cross-request batching yet, no http(s) media, no compression per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from keye.encoders.errors import KeyeInputError, one_line
from keye.encoders.image import load_image
from keye.prefix import CachedPrefix
from keye.processing import VISION_INPUTS
from keye.serve.cli import ServeConfig
from keye.serve.media import APIError, MediaResolver

logger = logging.getLogger(__name__)

__all__ = ["ServeConfig", "build_app", "run"]


class _Stop(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class Metrics:
    def __init__(self):
        self.requests = self.errors = self.tokens = 0
        self.ttft_sum, self.ttft_count, self.gen_seconds = 0.0, 0, 0.0

    def text(self, queue_depth: int) -> str:
        rows = [
            ("keye_requests_total", "counter", self.requests),
            ("keye_request_errors_total", "counter", self.errors),
            ("keye_queue_depth", "gauge", queue_depth),
            ("keye_time_to_first_token_seconds_sum", "counter", self.ttft_sum),
            ("keye_time_to_first_token_seconds_count", "counter", self.ttft_count),
            ("keye_generated_tokens_total", "counter", self.tokens),
            ("keye_generation_seconds_total", "counter", self.gen_seconds),
        ]
        return "".join(f"# TYPE {n} {t}\n{n} {v}\n" for n, t, v in rows)


class Engine:
    """Runs requests one at a time on a worker thread; owns the prefix and video caches (used only there)."""

    def __init__(self, model, processor, cfg: ServeConfig, media_dir: Path):
        self.model, self.processor, self.cfg = model, processor, cfg
        self.media = MediaResolver(
            media_dir,
            Path(cfg.allowed_local_media_path) if cfg.allowed_local_media_path else None,
            int(cfg.max_upload_mb * (1 << 20)),
        )
        self.prefixes: OrderedDict[tuple, CachedPrefix] = OrderedDict()
        self.videos: OrderedDict[tuple, object] = OrderedDict()
        self.lock = threading.Lock()
        self.waiting = 0
        self.metrics = Metrics()

    def _remember(self, cache: OrderedDict, key, value) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > self.cfg.prefix_cache_size:
            cache.popitem(last=False)

    def prepare(self, body: dict) -> dict:
        """Parse and process a request: ``{"kwargs", "gen", "prompt_tokens", "cached", "prefix"}``."""
        gen = self.generation(body)
        messages, keys = self.media.messages(body.get("messages"))
        mm = body.get("mm_processor_kwargs") or {}
        if not isinstance(mm, dict):
            raise APIError(400, "mm_processor_kwargs must be an object", param="mm_processor_kwargs")
        overrides = {k: mm[k] for k in ("fps", "max_frames", "token_budget") if mm.get(k) is not None}
        settings = tuple(sorted(overrides.items()))
        # media read here, so that an unreadable one is named by its part; planned videos are reused across requests
        for i, m in enumerate(messages):
            for j, part in enumerate(m["content"] if isinstance(m["content"], list) else []):
                where = f"messages[{i}].content[{j}]"
                try:
                    if part["type"] == "image":
                        part["image"] = load_image(part["image"])
                    elif part["type"] == "video":
                        vkey = (part["video"], settings)
                        if vkey not in self.videos:
                            video = self.processor.load_video(part["video"], **overrides)
                            self._remember(self.videos, vkey, video)
                        part["video"] = self.videos[vkey]
                except KeyeInputError as e:
                    reason = one_line(str(e)).split(": ", 1)[-1]  # without the server's file name
                    raise APIError(
                        400, f"{where}: unreadable {part['type']}: {reason}", param=where
                    ) from None
        think = (body.get("chat_template_kwargs") or {}).get("enable_thinking")
        full = self.processor(messages, think=think, **overrides)
        ids, positions = full["input_ids"], full["position_ids"]
        vision = {k: full[k] for k in VISION_INPUTS if k in full}
        end = self._media_prefix_end(messages, ids)
        prefix, cached = None, 0
        if end and keys:
            pkey = (
                tuple(keys),
                settings,
                json.dumps(messages[0]["content"]) if messages[0]["role"] == "system" else "",
            )
            prefix = self.prefixes.get(pkey)
            if prefix is not None and torch.equal(prefix.ids[0], ids[0, :end]):
                cached = end
                self.prefixes.move_to_end(pkey)
            else:
                prefix = CachedPrefix.empty(self.model)
                with torch.inference_mode():
                    prefix.prefill(self.model, ids[:, :end], positions[:, :, :end], **vision)
                self._remember(self.prefixes, pkey, prefix)
            kwargs = prefix.continue_with(ids[:, end:], positions[:, :, end:], self.model.device)
        else:
            kwargs = CachedPrefix.empty(self.model).continue_with(ids, positions, self.model.device)
            kwargs.update({k: v.to(self.model.device) for k, v in vision.items()})
        return {
            "kwargs": kwargs,
            "gen": gen,
            "prompt_tokens": ids.shape[1],
            "cached": cached,
            "prefix": prefix,
        }

    def _media_prefix_end(self, messages: list[dict], ids: torch.Tensor) -> int:
        """Tokens up to the last <|vision_end|> when every medium is in the first user turn (else 0: no reuse)."""
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        has_media = [
            i for i, m in enumerate(messages)
            if isinstance(m["content"], list) and any(p["type"] != "text" for p in m["content"])
        ]  # fmt: skip
        if not has_media or has_media != users[:1]:
            return 0
        ends = (ids[0] == self.model.config.vision_end_token_id).nonzero()
        return int(ends[-1]) + 1 if len(ends) else 0

    def generation(self, body: dict) -> dict:
        """``generate`` arguments from the request's ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``."""
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise APIError(400, "max_tokens must be a positive integer", param="max_tokens")
        temperature, top_p = body.get("temperature"), body.get("top_p")
        for key, value in (("temperature", temperature), ("top_p", top_p)):
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise APIError(400, f"{key} must be a number >= 0", param=key)
        gen = dict(max_new_tokens=min(max_tokens, self.cfg.max_tokens), do_sample=bool(temperature))
        if temperature:
            gen.update(temperature=float(temperature), top_p=float(top_p or 1.0))
        stops = body.get("stop")
        if stops:
            stops = [stops] if isinstance(stops, str) else stops
            if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
                raise APIError(400, "stop must be a string or a list of strings", param="stop")
            gen.update(stop_strings=stops, tokenizer=self.processor.tokenizer)
        if body.get("seed") is not None:
            if not isinstance(body["seed"], int):
                raise APIError(400, "seed must be an integer", param="seed")
            torch.manual_seed(body["seed"])
        return gen

    def generate(self, prepared: dict, stop: threading.Event) -> Iterator[str]:
        """Text pieces as they are generated (``prepared["completion_tokens"]`` and ``finish_reason`` after)."""
        gen = prepared["gen"]
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def work():
            try:
                with torch.inference_mode():
                    result["out"] = self.model.generate(
                        **prepared["kwargs"],
                        **gen,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Stop(stop)]),
                    )
            except BaseException as e:  # re-raised below
                result["error"] = e
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        text = ""
        for piece in streamer:
            text += piece
            yield piece
        thread.join()
        if prepared["prefix"] is not None:
            prepared["prefix"].rewind()
        if "error" in result:
            raise result["error"]
        n = result["out"].shape[1] - prepared["kwargs"]["input_ids"].shape[1]
        prepared["completion_tokens"] = n
        prepared["finish_reason"] = "length" if n >= gen["max_new_tokens"] else "stop"


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def build_app(model, processor, cfg: ServeConfig, *, model_name: str | None = None) -> FastAPI:
    """The FastAPI app serving ``model``."""
    app = FastAPI(title="keye serve")
    media_dir = Path(tempfile.mkdtemp(prefix="keye-serve-"))
    engine = Engine(model, processor, cfg, media_dir)
    app.state.engine = engine
    name = model_name or cfg.model
    worker = asyncio.Semaphore(1)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "keye"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.text(engine.waiting))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        engine.metrics.requests += 1
        try:
            limit = int(cfg.max_upload_mb * (1 << 20) * 4 / 3) + (1 << 20)
            if int(request.headers.get("content-length") or 0) > limit:
                raise APIError(413, f"request body larger than {limit >> 20} MB", code="request_too_large")
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError):
                raise APIError(400, "the request body is not JSON") from None
            if not isinstance(body, dict):
                raise APIError(400, "the request body must be a JSON object")
            if engine.waiting >= cfg.queue_size + 1:
                raise APIError(429, "the server's queue is full; retry later", code="queue_full")
        except APIError as e:
            engine.metrics.errors += 1
            return _error(e)
        engine.waiting += 1
        stop = threading.Event()
        start = time.perf_counter()
        try:
            await worker.acquire()
        except asyncio.CancelledError:
            engine.waiting -= 1
            raise
        try:
            prepared = await asyncio.to_thread(_prepare, engine, body)
        except Exception as e:  # noqa: BLE001 - one error object; the worker is free for the next request
            engine.metrics.errors += 1
            worker.release()
            engine.waiting -= 1
            if not isinstance(e, APIError):
                logger.exception("request failed")
                e = APIError(500, one_line(str(e)))
            return _error(e)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        pieces = engine.generate(prepared, stop)

        def next_piece():
            return next(pieces, None)

        def usage():
            n = prepared.get("completion_tokens", 0)
            return {
                "prompt_tokens": prepared["prompt_tokens"],
                "completion_tokens": n,
                "total_tokens": prepared["prompt_tokens"] + n,
                "prompt_tokens_details": {"cached_tokens": prepared["cached"]},
            }

        def done():
            worker.release()
            engine.waiting -= 1

        if not body.get("stream"):
            try:
                text, first = "", None
                while (piece := await asyncio.to_thread(next_piece)) is not None:
                    first = first or time.perf_counter()
                    text += piece
            except Exception as e:  # noqa: BLE001 - any failure is one error object, the server stays up
                engine.metrics.errors += 1
                return _error(APIError(500, one_line(str(e))))
            finally:
                done()
            _account(engine, start, first, prepared)
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text.strip()},
                        "finish_reason": prepared.get("finish_reason", "stop"),
                    }
                ],
                "usage": usage(),
            }

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events():
            def chunk(delta: dict, finish=None) -> str:
                c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
                return f"data: {json.dumps(c)}\n\n"

            first = None
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (piece := await asyncio.to_thread(next_piece)) is not None:
                    first = first or time.perf_counter()
                    if await request.is_disconnected():
                        stop.set()  # the client left: end the generation
                    yield chunk({"content": piece})
                yield chunk({}, prepared.get("finish_reason", "stop"))
                if include_usage:
                    u = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                         "choices": [], "usage": usage()}  # fmt: skip
                    yield f"data: {json.dumps(u)}\n\n"
                yield "data: [DONE]\n\n"
                _account(engine, start, first, prepared)
            except Exception as e:  # noqa: BLE001 - reported in the stream, the server stays up
                engine.metrics.errors += 1
                yield f"data: {json.dumps(APIError(500, one_line(str(e))).body())}\n\n"
            finally:
                stop.set()
                while await asyncio.to_thread(next_piece) is not None:  # let the generation thread finish
                    pass
                done()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _prepare(engine: Engine, body: dict) -> dict:
    try:
        return engine.prepare(body)
    except APIError:
        raise
    except KeyeInputError as e:  # unreadable media, a prompt longer than the context
        raise APIError(400, one_line(str(e)), param="messages") from None


def _account(engine: Engine, start: float, first: float | None, prepared: dict) -> None:
    m = engine.metrics
    if first is not None:
        m.ttft_sum += first - start
        m.ttft_count += 1
    m.tokens += prepared.get("completion_tokens", 0)
    m.gen_seconds += time.perf_counter() - start


def run(cfg: ServeConfig) -> None:
    """Load the model and serve until interrupted."""
    import uvicorn

    from keye import load_pretrained

    model, processor = load_pretrained(cfg.model)
    app = build_app(model, processor, cfg)
    print(f"keye serve: {cfg.model} on http://{cfg.host}:{cfg.port}/v1", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
