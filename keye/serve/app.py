"""``keye serve``: the HTTP side of an OpenAI-compatible chat server (FastAPI + uvicorn) over one keye model.

Routes: ``POST /v1/chat/completions`` (a JSON answer, or Server-Sent Events with ``stream: true`` ending in
``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text). The model work is the
`keye.serve.engine.Engine`'s: videos planned server-side with the model's own Slow-Fast settings, requests decoded
together (continuous batching), prefixes reused across the turns of a conversation by their media.

Every refusal is an OpenAI error object (``{"error": {"message", "type", "param", "code"}}``): 400 for a malformed
request or unreadable media (naming ``messages[i].content[j]``), 413 for an upload over ``--max-upload-mb``, 429 when
the queue is full. A client that disconnects ends its generation at the next decoding step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from keye.encoders.errors import one_line
from keye.serve.cli import ServeConfig
from keye.serve.engine import Engine, Job
from keye.serve.media import APIError

logger = logging.getLogger(__name__)

__all__ = ["ServeConfig", "build_app", "run"]


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def build_app(
    model, processor, cfg: ServeConfig, *, model_name: str | None = None, engine_thread: bool = True
) -> FastAPI:
    """The FastAPI app serving ``model`` (its uploads live in a temporary folder removed at shutdown). The engine
    runs on a thread of its own, or (``engine_thread=False``) wherever ``app.state.engine.run_forever()`` is called."""
    media_dir = Path(tempfile.mkdtemp(prefix="keye-serve-"))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            shutil.rmtree(media_dir, ignore_errors=True)

    app = FastAPI(title="keye serve", lifespan=lifespan)
    engine = Engine(model, processor, cfg, media_dir, thread=engine_thread)
    app.state.engine = engine
    name = model_name or cfg.model

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "keye"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.text(engine.waiting, len(engine.decoder)))

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
            engine.admit()
        except APIError as e:
            engine.metrics.errors += 1
            return _error(e)
        try:
            job = await asyncio.to_thread(engine.prepare, body, asyncio.get_running_loop())
        except Exception as e:  # noqa: BLE001 - one error object; the server goes on
            engine.release()
            engine.metrics.errors += 1
            if not isinstance(e, APIError):
                logger.exception("request failed")
                e = APIError(500, one_line(str(e)))
            return _error(e)
        engine.submit(job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _events(engine, job, rid, created, name, include_usage), media_type="text/event-stream"
            )
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()  # nobody is waiting for the answer any more
                        return Response(status_code=499)
                    continue
                if kind == "error":
                    engine.metrics.errors += 1
                    return _error(value)
                if kind == "done":
                    break
        finally:
            engine.release()
        seq = value
        engine.metrics.gen_seconds += time.perf_counter() - job.arrived
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": seq.text.strip()},
                    "finish_reason": seq.finish_reason,
                }
            ],
            "usage": _usage(job),
        }

    return app


def _usage(job: Job) -> dict:
    n = len(job.sequence.tokens) if job.sequence is not None else 0
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": job.prompt_tokens + n,
        "prompt_tokens_details": {"cached_tokens": job.cached},
    }


async def _events(engine: Engine, job: Job, rid: str, created: int, name: str, include_usage: bool):
    """The SSE stream of one request: role, text deltas, the finish reason, usage when asked, ``[DONE]``."""

    def chunk(choices: list, **extra) -> str:
        c = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": name,
            "choices": choices,
        }
        return f"data: {json.dumps({**c, **extra})}\n\n"

    finished = False
    try:
        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield chunk([{"index": 0, "delta": {"content": value}, "finish_reason": None}])
            elif kind == "error":
                engine.metrics.errors += 1
                yield f"data: {json.dumps(value.body())}\n\n"
                break
            else:
                yield chunk([{"index": 0, "delta": {}, "finish_reason": value.finish_reason}])
                if include_usage:
                    yield chunk([], usage=_usage(job))
                engine.metrics.gen_seconds += time.perf_counter() - job.arrived
                break
        finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            job.cancel()  # the client went away mid-stream
        engine.release()


def run(cfg: ServeConfig) -> None:
    """Load the model and serve until interrupted: uvicorn on a thread, the engine on this one (which loaded the
    model; see `Engine.run_forever`)."""
    import uvicorn

    from keye import load_pretrained
    from keye.ports import check_port

    fix = f"pick another with --port (e.g. --port {cfg.port + 1})"
    check_port(cfg.host, cfg.port, "keye serve", fix)  # before loading the model: a busy port fails at once
    model, processor = load_pretrained(cfg.model)
    app = build_app(model, processor, cfg, engine_thread=False)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning"))
    http = threading.Thread(target=server.run, name="keye-http", daemon=True)
    http.start()
    try:  # from here on, Ctrl-C (even while waiting for the start) shuts uvicorn down: its lifespan removes uploads
        while not server.started:
            if not http.is_alive():
                raise SystemExit(f"keye serve: cannot listen on {cfg.host}:{cfg.port}; {fix}")
            time.sleep(0.05)
        print(f"keye serve: {cfg.model} on http://{cfg.host}:{cfg.port}/v1", flush=True)
        engine = app.state.engine
        threading.Thread(target=lambda: (http.join(), engine.stop()), daemon=True).start()
        engine.run_forever()
    finally:
        server.should_exit = True
        http.join(timeout=10)
