"""The serving engine: requests turned into model inputs, prefilled one at a time and decoded together.

A request goes through three places:

1. `Engine.prepare` (on the HTTP side, in a worker thread): validate the body, resolve its media
   (`keye.serve.media`), plan its videos (Slow-Fast with the model's settings and the request's overrides; planned
   videos are kept by content and settings, so a re-sent video is not decoded again) and render the prompt: a `Job`.
2. The engine thread takes jobs in arrival order while the batch has room (``max_batch``): compresses the video
   tokens when the request asks (DynTok/Clapper), then prefills. A conversation whose media all sit in its first
   user turn keeps that turn's prefix (system prompt to the last ``<|vision_end|>``) as a `CachedPrefix`, keyed by
   the media's SHA-256 and the video settings: a request re-sending the same media (as OpenAI clients do on every
   turn) prefills only what comes after it, and reports those tokens as ``cached_tokens``.
3. `keye.batching.BatchDecoder` decodes all running requests one token per step; each leaves the batch as soon as it
   stops or its client goes away (``Job.cancel``).

The HTTP side sees a job's output as an asyncio queue of events: ``("text", piece)``, then ``("done", Sequence)`` or
``("error", APIError)``. At most ``max_batch + queue_size`` requests are in the engine at once; `Engine.admit` refuses
more (429).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from keye.batching import BatchDecoder, Sequence, prefill
from keye.compression import compress_inputs, compressor
from keye.encoders.errors import KeyeInputError, one_line
from keye.encoders.image import load_image
from keye.prefix import CachedPrefix
from keye.processing import VISION_INPUTS
from keye.serve.cli import ServeConfig
from keye.serve.media import APIError, MediaResolver

logger = logging.getLogger(__name__)

__all__ = ["Engine", "Job", "Metrics"]

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Counters for ``GET /metrics`` (Prometheus text format)."""

    def __init__(self):
        self.requests = self.errors = self.cancelled = self.tokens = 0
        self.gen_seconds = 0.0
        self.ttft = [0] * (len(_TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0

    def first_token(self, seconds: float) -> None:
        self.ttft_sum += seconds
        self.ttft[next((i for i, b in enumerate(_TTFT_BUCKETS) if seconds <= b), len(_TTFT_BUCKETS))] += 1

    def text(self, waiting: int, running: int) -> str:
        rows = [
            ("keye_requests_total", "counter", "requests received", [("", self.requests)]),
            ("keye_request_errors_total", "counter", "requests refused or failed", [("", self.errors)]),
            (
                "keye_requests_cancelled_total",
                "counter",
                "generations ended by their client",
                [("", self.cancelled)],
            ),
            ("keye_queue_depth", "gauge", "requests waiting for a place in the batch", [("", waiting)]),
            ("keye_running_requests", "gauge", "requests in the running batch", [("", running)]),
            ("keye_generated_tokens_total", "counter", "tokens generated", [("", self.tokens)]),
            (
                "keye_generation_seconds_total",
                "counter",
                "request time, arrival to end",
                [("", self.gen_seconds)],
            ),
        ]
        cumulative, buckets = 0, []
        for bound, n in zip((*_TTFT_BUCKETS, "+Inf"), self.ttft, strict=True):
            cumulative += n
            buckets.append((f'_bucket{{le="{bound}"}}', cumulative))
        buckets += [("_sum", self.ttft_sum), ("_count", cumulative)]
        rows.append(("keye_time_to_first_token_seconds", "histogram", "arrival to first token", buckets))
        out = []
        for name, kind, doc, samples in rows:
            out += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
            out += [f"{name}{suffix} {value}" for suffix, value in samples]
        return "\n".join(out) + "\n"


@dataclass(eq=False)
class Job:
    """One request on its way through the engine."""

    messages: list[dict]  # keye chat messages, images loaded and videos planned
    think: bool | None
    overrides: dict  # video settings the request changed
    settings: tuple  # the video settings (part of the prefix key)
    keys: list[str]  # SHA-256 of each medium, in order
    system: str  # the system prompt (part of the prefix key)
    compress: str
    sampling: dict  # Sequence fields: max_new_tokens, temperature, top_p, seed, stop, ignore_eos
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    first: float | None = None
    cached: int = 0
    prompt_tokens: int = 0
    sequence: Sequence | None = None
    cancelled: bool = False

    def send(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def cancel(self) -> None:
        self.cancelled = True
        if self.sequence is not None:
            self.sequence.cancelled = True


class Engine:
    """Owns the model, the running batch, the prefix and video caches; one thread does all model work."""

    def __init__(self, model, processor, cfg: ServeConfig, media_dir: Path, *, thread: bool = True):
        self.model, self.processor, self.cfg = model, processor, cfg
        self.media = MediaResolver(
            media_dir,
            Path(cfg.allowed_local_media_path) if cfg.allowed_local_media_path else None,
            int(cfg.max_upload_mb * (1 << 20)),
            list(cfg.allowed_media_domains or []),
        )
        self.prefixes: OrderedDict[tuple, CachedPrefix] = OrderedDict()  # engine thread only
        self.videos: OrderedDict[tuple, object] = OrderedDict()
        self.videos_lock = threading.Lock()
        self.metrics = Metrics()
        self.inflight = 0  # admitted and not finished (event loop only)
        self.pending: deque[Job] = deque()
        self.wake = threading.Condition()
        self.decoder = BatchDecoder(model, processor.tokenizer)
        self.running: dict[Sequence, Job] = {}
        self.stopped = False
        if thread:
            threading.Thread(target=self.run_forever, name="keye-engine", daemon=True).start()

    # ------------------------------------------------------------------------------------------ the HTTP side
    def admit(self) -> None:
        """Count a request in, or refuse it (429) when ``max_batch + queue_size`` are already in."""
        if self.inflight >= self.cfg.max_batch + self.cfg.queue_size:
            raise APIError(429, "the server's queue is full; retry later", code="queue_full")
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1

    @property
    def waiting(self) -> int:
        return max(0, self.inflight - len(self.decoder))

    def prepare(self, body: dict, loop: asyncio.AbstractEventLoop) -> Job:
        """Validate and process a request body (media read and videos planned here); raises `APIError`."""
        sampling = self.sampling(body)
        if body.get("n", 1) != 1:
            raise APIError(400, "n must be 1", param="n")
        messages, keys = self.media.messages(body.get("messages"))
        mm = body.get("mm_processor_kwargs") or {}
        io = body.get("media_io_kwargs") or {}
        if not isinstance(mm, dict) or not isinstance(io, dict) or not isinstance(io.get("video", {}), dict):
            raise APIError(
                400, "mm_processor_kwargs and media_io_kwargs must be objects", param="mm_processor_kwargs"
            )
        video_io = io.get("video") or {}
        # vLLM's names: media_io_kwargs.video.num_frames / fps, mm_processor_kwargs.fps / max_frames / token_budget
        overrides = {"fps": video_io.get("fps"), "max_frames": video_io.get("num_frames")}
        overrides.update({k: mm[k] for k in ("fps", "max_frames", "token_budget") if k in mm})
        overrides = {k: v for k, v in overrides.items() if v is not None}
        for k, v in overrides.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise APIError(400, f"{k} must be a positive number", param="mm_processor_kwargs")
        compress = mm.get("compress", "none")
        try:
            compressor(compress)
        except ValueError as e:
            raise APIError(400, one_line(str(e)), param="mm_processor_kwargs") from None
        settings = tuple(sorted(overrides.items())) + (("compress", compress),)
        for i, m in enumerate(messages):
            for j, part in enumerate(m["content"] if isinstance(m["content"], list) else []):
                where = f"messages[{i}].content[{j}]"
                try:
                    if part["type"] == "image":
                        part["image"] = load_image(part["image"])
                    elif part["type"] == "video":
                        part["video"] = self._video(part["video"], settings, overrides)
                except KeyeInputError as e:
                    reason = one_line(str(e)).split(": ", 1)[-1]  # without the server's file name
                    raise APIError(
                        400, f"{where}: unreadable {part['type']}: {reason}", param=where
                    ) from None
        template = body.get("chat_template_kwargs") or {}
        think = template.get("enable_thinking", mm.get("think")) if isinstance(template, dict) else None
        if not _has_media_only_in_first_user_turn(messages):
            keys = []  # no prefix reuse
        system = json.dumps(messages[0]["content"]) if messages[0]["role"] == "system" else ""
        return Job(messages, think, overrides, settings, keys, system, compress, sampling, loop)

    def _video(self, path: str, settings: tuple, overrides: dict):
        key = (path, settings)
        with self.videos_lock:
            if key in self.videos:
                self.videos.move_to_end(key)
                return self.videos[key]
        video = self.processor.load_video(path, **overrides)
        with self.videos_lock:
            _remember(self.videos, key, video, self.cfg.prefix_cache_size)
        return video

    def sampling(self, body: dict) -> dict:
        """`Sequence` settings from ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``ignore_eos``."""
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise APIError(400, "max_tokens must be a positive integer", param="max_tokens")
        out = {
            "max_new_tokens": min(max_tokens, self.cfg.max_tokens),
            "ignore_eos": bool(body.get("ignore_eos")),
        }
        for key, low, high in (("temperature", 0.0, 2.0), ("top_p", 1e-9, 1.0)):
            value = body.get(key)
            if value is not None:
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
                    raise APIError(400, f"{key} must be a number in [{low:g}, {high:g}]", param=key)
                out[key] = float(value)
        stops = body.get("stop")
        if stops:
            stops = [stops] if isinstance(stops, str) else stops
            if (
                not isinstance(stops, list)
                or not all(isinstance(x, str) and x for x in stops)
                or len(stops) > 4
            ):
                raise APIError(400, "stop must be a string or a list of up to 4 strings", param="stop")
            out["stop"] = stops
        if body.get("seed") is not None:
            if not isinstance(body["seed"], int) or isinstance(body["seed"], bool):
                raise APIError(400, "seed must be an integer", param="seed")
            out["seed"] = body["seed"]
        return out

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()

    def submit(self, job: Job) -> None:
        with self.wake:
            self.pending.append(job)
            self.wake.notify()

    # ---------------------------------------------------------------------------------------- the engine thread
    def run_forever(self) -> None:
        """The engine's loop, until `stop`. Best run on the thread that loaded the model: on CPU, torch's OpenMP
        threads serve the thread that first used them, and a decoding step elsewhere measured 1.7x slower here."""
        while not self.stopped:
            with self.wake:
                while not self.pending and not len(self.decoder) and not self.stopped:
                    self.wake.wait(timeout=0.5)
                if self.stopped:
                    return
                job = (
                    self.pending.popleft()
                    if self.pending and len(self.decoder) < self.cfg.max_batch
                    else None
                )
            if job is not None and not job.cancelled:  # one new request per step (a cancelled one is dropped)
                try:
                    self._start(job)
                except Exception as e:  # noqa: BLE001 - the request fails, the engine goes on
                    if not isinstance(e, (APIError, KeyeInputError)):
                        logger.exception("prefill failed")
                    if isinstance(e, KeyeInputError):  # a prompt longer than the context
                        e = APIError(400, one_line(str(e)), param="messages")
                    error = e if isinstance(e, APIError) else APIError(500, one_line(str(e)))
                    job.send("error", error)
            if len(self.decoder):
                try:
                    self.decoder.step()
                except Exception as e:  # noqa: BLE001 - fail the batch's requests, keep serving
                    logger.exception("decoding failed")
                    for row in self.decoder.rows:
                        self.running.pop(row).send("error", APIError(500, one_line(str(e))))
                    self.decoder = BatchDecoder(self.model, self.processor.tokenizer)

    @torch.inference_mode()
    def _start(self, job: Job) -> None:
        processed = self.processor(job.messages, think=job.think, **job.overrides)
        inputs, _ = compress_inputs(self.model, processed, job.compress)
        ids, positions = inputs["input_ids"], inputs["position_ids"]
        vision = {k: inputs[k] for k in (*VISION_INPUTS, "video_embeds") if k in inputs}
        end = self._media_prefix_end(ids) if job.keys else 0
        pkey = (tuple(job.keys), job.settings, job.system)
        prefix = self.prefixes.get(pkey) if end else None
        if prefix is not None and torch.equal(prefix.ids[0], ids[0, :end]):  # the media's turn is cached
            job.cached = end
            self.prefixes.move_to_end(pkey)
            kwargs = prefix.continue_with(ids[:, end:], positions[:, :, end:], self.model.device)
            state = prefill(self.model, kwargs)
        else:  # one forward pass for the whole prompt; the media's turn stays in a new prefix
            prefix = CachedPrefix.empty(self.model)
            kwargs = prefix.continue_with(ids, positions, self.model.device)
            state = prefill(self.model, kwargs, keep=end, **vision)
            if end:
                prefix.commit(ids[:, :end], positions[:, :, :end])
                _remember(self.prefixes, pkey, prefix, self.cfg.prefix_cache_size)
        job.prompt_tokens = ids.shape[1]

        def on_text(piece: str) -> None:
            if job.first is None:
                job.first = time.perf_counter()
                self.metrics.first_token(job.first - job.arrived)
            job.send("text", piece)

        def on_done(seq: Sequence) -> None:
            self.metrics.tokens += len(seq.tokens)
            self.metrics.cancelled += seq.finish_reason == "cancelled"
            self.running.pop(seq, None)
            job.send("done", seq)

        job.sequence = Sequence(**state, **job.sampling, on_text=on_text, on_done=on_done)
        job.sequence.cancelled = job.cancelled
        self.running[job.sequence] = job
        job.messages = []  # the planned frames are no longer needed here
        self.decoder.add(job.sequence)

    def _media_prefix_end(self, ids: torch.Tensor) -> int:
        """Tokens up to the last ``<|vision_end|>``."""
        ends = (ids[0] == self.model.config.vision_end_token_id).nonzero()
        return int(ends[-1]) + 1 if len(ends) else 0


def _has_media_only_in_first_user_turn(messages: list[dict]) -> bool:
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    has_media = [
        i for i, m in enumerate(messages)
        if isinstance(m["content"], list) and any(p["type"] != "text" for p in m["content"])
    ]  # fmt: skip
    return bool(has_media) and has_media == users[:1]


def _remember(cache: OrderedDict, key, value, size: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)
