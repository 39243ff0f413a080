"""The Gradio chat demo: upload a video or image (or generate one), ask, watch the answer stream.

A client of keye's public API only: `load_pretrained` gives the model and processor, the processor plans each
video (`KeyeProcessor.load_video`: Slow-Fast frames within the token budget), and a `ChatSession` per browser
session generates, streaming, with the KV cache kept across turns (a follow-up question does not re-encode the
video). Nothing here runs the model another way.

    build_app(model, processor, model_name=..., limits=Limits()) -> gr.Blocks
    launch(app, limits, host=..., port=..., share=...)      # queue with bounded concurrency, upload size limit

Run it with ``keye demo`` (see `keye.demo.cli`). Not for: batch inference or evaluation (``keye chat``,
``keye.eval``).
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from keye.chat import ChatSession
from keye.compression import COMPRESSIONS, compressed_video_tokens
from keye.demo.limits import Limits
from keye.demo.messages import (
    error_message,
    reply_messages,
    speed_summary,
    tool_round_messages,
    tools_status,
    video_summary,
)
from keye.errors import KeyeInputError
from keye.processing import KeyeProcessor, VideoInput

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
THINK_CHOICES = [("model default", "auto"), ("think (/think)", "on"), ("answer directly (/no_think)", "off")]
THINK_VALUES = {"auto": None, "on": True, "off": False}
COMPRESSION_LABELS = {"none": "none", "dyntok": "DynTok", "clapper": "Clapper"}
EXAMPLE_PROMPT = "What happens in this video?"
PENDING_NOTE = "  \n*Goes with your next question.*"
SENT_NOTE = "  \n*In the conversation: follow-up questions reuse it without encoding it again.*"


@dataclass
class Media:
    """An uploaded file, checked and (for a video) already planned, waiting to go with the next question."""

    kind: str  # "video" | "image"
    path: str
    name: str
    video: VideoInput | None = None  # planned frames; handed to the session as is, so it is decoded once
    summary: str = ""  # its token count, as shown


@dataclass
class DemoState:
    """Per browser session: the conversation shown, the model's session, media not yet sent, a stop flag."""

    history: list[dict] = field(default_factory=list)  # chatbot messages, the single source of what is shown
    session: ChatSession | None = None
    pending: Media | None = None
    sent: list[Media] = field(default_factory=list)  # media already in the conversation
    stop: threading.Event = field(default_factory=threading.Event)
    busy: threading.Lock = field(default_factory=threading.Lock)


class _StopOnEvent(StoppingCriteria):
    """Ends `generate` at the next token once the Stop button sets the event.

    Stopping this way (rather than cancelling the Gradio event) lets `ChatSession.stream` finish normally, so the
    reply so far and the KV cache stay consistent and the conversation can go on."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class _Stopped(Exception):
    """The Stop button ended a tool loop between two model turns."""


class _StoppableSession:
    """`ChatSession.send` for the tool loop, with the Stop button honoured: a running turn ends at the next token,
    and no further turn starts. Counts the tokens generated."""

    def __init__(self, session: ChatSession, stop: threading.Event):
        self.session, self.stop, self.new_tokens = session, stop, 0

    def send(self, content: list[dict], **kwargs):
        if self.stop.is_set():
            raise _Stopped
        reply = self.session.send(
            content, stopping_criteria=StoppingCriteriaList([_StopOnEvent(self.stop)]), **kwargs
        )
        self.new_tokens += reply.num_tokens
        return reply


def _kind(path: str) -> str | None:
    suffix = Path(path).suffix.lower()
    return "video" if suffix in VIDEO_SUFFIXES else "image" if suffix in IMAGE_SUFFIXES else None


# ------------------------------------------------------------------------------------------------ the app
class DemoApp:
    """The event handlers, bound to one model. Every handler returns the per-session `DemoState`."""

    def __init__(self, model, processor: KeyeProcessor, *, model_name: str, limits: Limits):
        self.model = model
        self.processor = processor
        self.model_name = model_name
        self.limits = limits
        # Generated examples and the tool loop's images; under the system temp folder, which Gradio serves.
        self.work_dir = Path(tempfile.mkdtemp(prefix="keye-demo-"))
        self._example_lock = threading.Lock()
        self._example_count = 0

    # ---------------------------------------------------------------- media
    def _overrides(self, fps: float, max_frames: float, token_budget: float) -> dict:
        return {"fps": float(fps), "max_frames": int(max_frames), "token_budget": int(token_budget)}

    def check_media(
        self, path: str, overrides: dict, compress: str = "none"
    ) -> tuple[Media, Image.Image, str]:
        """Check one file against the limits and plan it. Raises `KeyeInputError` with a readable reason.

        With a compression, a video's token count after it is measured as `ChatSession` will apply it (DynTok runs
        the vision tower once for this; the session encodes the frames again when the question is sent)."""
        from keye.encoders.filmstrip import filmstrip
        from keye.encoders.video import index

        name = Path(path).name
        kind = _kind(path)
        if kind is None:
            raise KeyeInputError(
                name,
                f"unsupported file type; send a video ({', '.join(VIDEO_SUFFIXES)}) "
                f"or an image ({', '.join(IMAGE_SUFFIXES)})",
            )
        size_mb = Path(path).stat().st_size / 2**20
        if size_mb > self.limits.max_upload_mb:
            raise KeyeInputError(
                name, f"{size_mb:.1f} MB is over this demo's limit of {self.limits.max_upload_mb:g} MB"
            )
        if kind == "image":
            from keye.encoders.image import load_image

            image = load_image(path)  # ImageLoadError names the file
            _, grid = self.processor.preprocess_image(image)
            patch, merge = self.processor.settings.patch_size, self.processor.settings.merge_size
            tokens = grid[1] * grid[2] // merge**2
            summary = (
                f"**{name}**: image {image.width}x{image.height} → {grid[2] * patch}x{grid[1] * patch} "
                f"pixels, **{tokens} vision tokens**"
            )
            thumb = image.copy()
            thumb.thumbnail((384, 384))
            return Media("image", path, name, summary=summary), thumb, summary
        duration = index(path).duration  # VideoDecodeError for a corrupt file or one without a video stream
        if duration > self.limits.max_duration_s:
            raise KeyeInputError(
                name,
                f"{duration:.0f} s long; this demo accepts videos up to {self.limits.max_duration_s:g} s",
            )
        video = self.processor.load_video(path, **overrides)
        if compress != "none":
            video.plan.compress = compress
            video.plan.tokens_after_compression = compressed_video_tokens(
                self.model, self.processor, video, compress
            )
        summary = video_summary(video, name)
        return (
            Media("video", path, name, video, summary),
            filmstrip(video.plan, video.frames, per_row=4),
            summary,
        )

    def on_media(self, path: str | None, st: DemoState | None, fps, max_frames, token_budget, compress):
        """A file was uploaded (or set): check and plan it, or say in the chat why it cannot be used (and drop it).

        Returns ``(file box, state, chatbot, film strip, token count)``. A dropped file clears the film strip only
        when it showed the dropped file, not a video already in the conversation."""
        st = st or DemoState()
        dropped = gr.skip() if st.pending is None else None
        st.pending = None
        if not path:
            return None, st, st.history, dropped, dropped
        try:
            media, strip, summary = self.check_media(
                path, self._overrides(fps, max_frames, token_budget), compress
            )
        except KeyeInputError as e:
            st.history.append(error_message(e))
            return None, st, st.history, dropped, dropped
        st.pending = media
        return gr.skip(), st, st.history, strip, summary + PENDING_NOTE

    def on_settings(self, st: DemoState | None, fps, max_frames, token_budget, compress):
        """fps / frames / budget / compression changed: re-plan the video waiting to be sent, so its token count
        is current."""
        if st is None or st.pending is None or st.pending.kind != "video":
            return st, gr.skip(), gr.skip()
        try:
            media, strip, summary = self.check_media(
                st.pending.path, self._overrides(fps, max_frames, token_budget), compress
            )
        except KeyeInputError as e:  # e.g. a budget too small for one frame: keep the previous plan
            return st, gr.skip(), f"⚠ {e.message}; the previous plan is kept."
        st.pending = media
        return st, strip, summary + PENDING_NOTE

    def on_example(self, st: DemoState | None, fps, max_frames, token_budget, compress):
        """Generate a new synthetic clip with known content and put it up as if it had been uploaded."""
        from keye.synthetic import make_demo_video

        st = st or DemoState()
        with self._example_lock:
            seed = self._example_count
            self._example_count += 1
        path = self.work_dir / "examples" / f"example-{seed}.mp4"
        sample = make_demo_video(path, seed=seed, duration=6.0, size=(180, 320), fps=12)
        _, st, history, strip, summary = self.on_media(str(path), st, fps, max_frames, token_budget, compress)
        question = sample.questions[0].question if sample.questions else EXAMPLE_PROMPT
        summary += f"  \nWhat the clip shows: *{sample.caption}*"
        return str(path), st, history, strip, summary, question

    # ---------------------------------------------------------------- chat
    def respond(
        self, message: str, st: DemoState | None, think: str, tools: bool, compress: str, max_new_tokens
    ) -> Iterator[tuple]:
        """Stream the answer to ``message`` (with the pending media, if any) into the chat.

        Yields ``(chatbot messages, prompt box, state, speed line, file box, token count)``; once its file goes
        into the conversation the file box is emptied, ready for the next upload."""
        st = st or DemoState()
        text = (message or "").strip()
        if not text:
            yield st.history, message, st, gr.skip(), gr.skip(), gr.skip()
            return
        if not st.busy.acquire(blocking=False):
            st.history.append(error_message("Still answering the previous question; press Stop first."))
            yield st.history, message, st, gr.skip(), gr.skip(), gr.skip()
            return
        try:
            media = st.pending
            shown = f"*[{media.name}]*\n\n{text}" if media else text
            st.history.append({"role": "user", "content": shown})
            st.stop.clear()
            if media:
                yield st.history, "", st, "…", None, media.summary + SENT_NOTE
            else:
                yield st.history, "", st, "…", gr.skip(), gr.skip()
            turn = self._tool_turn if tools and tools_status()[0] else self._chat_turn
            for out in turn(text, st, THINK_VALUES[think], compress, int(max_new_tokens)):
                yield *out, gr.skip(), gr.skip()
        finally:
            st.busy.release()

    def _chat_turn(
        self, text: str, st: DemoState, think: bool | None, compress: str, max_new_tokens: int
    ) -> Iterator[tuple]:
        """One turn of the conversation's `ChatSession`, streamed token by token."""
        media = st.pending
        if st.session is None:
            st.session = ChatSession(self.model, self.processor)
        st.session.think = think  # both apply from this turn on; earlier turns stay in the cache as they were
        st.session.compress = compress
        videos = [media.video] if media and media.kind == "video" else []
        images = [media.path] if media and media.kind == "image" else []
        base = list(st.history)
        start, first, reply_text, finished = time.perf_counter(), None, "", False
        try:
            for piece in st.session.stream(
                text,
                images=images,
                videos=videos,
                max_new_tokens=max_new_tokens,
                stopping_criteria=StoppingCriteriaList([_StopOnEvent(st.stop)]),
            ):
                if first is None and piece:
                    first = time.perf_counter() - start
                reply_text += piece
                st.history = base + reply_messages(reply_text, streaming=True)
                yield st.history, "", st, gr.skip()
            finished = True
        except KeyeInputError as e:  # raised before generation starts: the session is unchanged
            finished = True
            st.pending = None
            st.history = [*base, error_message(e)]
            yield st.history, "", st, ""
            return
        except Exception as e:
            finished = True
            logger.exception("generation failed")
            st.session = None  # its cache may hold a half-finished turn
            st.history = [
                *base,
                error_message(f"Something went wrong ({type(e).__name__}: {e}); conversation reset."),
            ]
            yield st.history, "", st, ""
            return
        finally:
            if not finished:  # closed mid-stream (client gone): end generation, drop the inconsistent session
                st.stop.set()
                st.session = None
        reply = st.session.last_reply
        if media:
            st.sent.append(media)
            st.pending = None
        st.history = base + reply_messages(reply.text, streaming=False)
        seconds = time.perf_counter() - start
        yield st.history, "", st, speed_summary(first, seconds, reply, st.stop.is_set())

    def _tool_turn(
        self, text: str, st: DemoState, think: bool | None, compress: str, max_new_tokens: int
    ) -> Iterator[tuple]:
        """One question through the Thyme loop (`keye.tools.loop.run_tool_loop`), shown round by round.

        Each question runs in a fresh `ChatSession` with the tool system prompt, on the image waiting to be sent or
        the last image of this conversation."""
        from keye.tools.loop import TOOL_SYSTEM_PROMPT, run_tool_loop
        from keye.tools.sandbox import SandboxUnavailableError

        media = st.pending
        images = [m.path for m in [*st.sent, *([media] if media else [])] if m.kind == "image"][-1:]
        base = list(st.history)
        if not images:
            st.history = [*base, error_message("Tools work on images: upload an image first.")]
            yield st.history, "", st, ""
            return
        session = _StoppableSession(
            ChatSession(self.model, self.processor, think=think, system=TOOL_SYSTEM_PROMPT), st.stop
        )
        rounds: queue.Queue = queue.Queue()
        outcome: dict = {}
        out_dir = Path(tempfile.mkdtemp(prefix="tools-", dir=self.work_dir))

        def work():
            try:
                outcome["trace"] = run_tool_loop(
                    session, text, images, out_dir=out_dir, max_new_tokens=max_new_tokens, on_round=rounds.put
                )
            except BaseException as e:  # reported in the chat below
                outcome["error"] = e
            rounds.put(None)

        start = time.perf_counter()
        threading.Thread(target=work, daemon=True).start()
        shown: list[dict] = []
        n_rounds = 0
        while (rnd := rounds.get()) is not None:
            n_rounds += 1
            shown += tool_round_messages(n_rounds, rnd)
            st.history = base + shown
            yield st.history, "", st, gr.skip()
        seconds = time.perf_counter() - start
        if media:
            st.sent.append(media)
            st.pending = None
        error = outcome.get("error")
        if isinstance(error, _Stopped):
            st.history = [*base, *shown, {"role": "assistant", "content": "*(stopped)*"}]
        elif isinstance(error, (KeyeInputError, SandboxUnavailableError)):
            st.history = [
                *base,
                *shown,
                error_message(error if isinstance(error, KeyeInputError) else str(error)),
            ]
        elif error is not None:
            logger.error("tool loop failed", exc_info=error)
            st.history = [
                *base,
                *shown,
                error_message(f"Something went wrong ({type(error).__name__}: {error})."),
            ]
        else:
            trace = outcome["trace"]
            answer = trace.answer
            if answer is None:  # show what the model said last, and that it never answered in the format
                last = trace.rounds[-1].text.strip() if trace.rounds else ""
                answer = f"{last}\n\n*(no `<answer>` given; the loop stopped: {trace.stopped})*"
            st.history = [*base, *shown, {"role": "assistant", "content": answer}]
        stats = (
            f"{n_rounds} model turns in **{seconds:.1f} s** · {session.new_tokens} new tokens "
            "(the tool loop shows whole turns, not single tokens)"
        )
        yield st.history, "", st, stats

    def on_stop(self, st: DemoState | None):
        """Stop the answer being generated; what was generated so far stays in the conversation."""
        if st is not None:
            st.stop.set()

    def on_clear(self, st: DemoState | None):
        """Forget the conversation, its cache and any media."""
        if st is not None:
            st.stop.set()
        return DemoState(), [], None, "", "", None, ""


# The film strip's label and buttons float over the picture: keep its first row of frames clear of them.
CSS = """
#filmstrip .image-container { padding-top: 2.4em; }
#filmstrip img { object-fit: contain; }
#tokens, #stats { font-size: 0.9em; }
"""


def build_app(model, processor: KeyeProcessor, *, model_name: str, limits: Limits | None = None) -> gr.Blocks:
    """The Blocks app for one loaded model. Call `launch` (or ``.queue().launch()``) to serve it."""
    limits = limits or Limits()
    demo = DemoApp(model, processor, model_name=model_name, limits=limits)
    s = processor.settings.video  # the Slow-Fast config the sliders start from
    device = str(model.device)
    tools_ok, tools_info = tools_status()
    with gr.Blocks(title="keye demo") as app:
        gr.Markdown(
            f"## keye · {model_name} on {device}\n"
            f"Upload a video or an image (at most {limits.max_upload_mb:g} MB; videos up to "
            f"{limits.max_duration_s:g} s) or generate an example, then ask. Follow-up questions reuse the "
            "encoded video (the KV cache is kept), so only the first answer pays for the frames."
        )
        state = gr.State(None, time_to_live=3600)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    elem_id="chat",
                    height=480,
                    label="Chat",
                    buttons=["copy"],
                    feedback_options=None,
                    group_consecutive_messages=False,  # an error stays a bubble of its own
                )
                with gr.Row():
                    prompt = gr.Textbox(
                        elem_id="prompt",
                        show_label=False,
                        placeholder="Ask about the video or image…",
                        scale=5,
                        lines=1,
                        max_lines=6,
                    )
                    send = gr.Button("Send", elem_id="send", variant="primary", scale=1, min_width=80)
                with gr.Row():
                    stop = gr.Button("Stop", elem_id="stop", variant="stop", size="sm")
                    clear = gr.Button("Clear", elem_id="clear", size="sm")
                stats = gr.Markdown(elem_id="stats")
            with gr.Column(scale=2):
                media = gr.File(
                    label="Video or image",
                    elem_id="media",
                    file_types=list(VIDEO_SUFFIXES + IMAGE_SUFFIXES),
                    type="filepath",
                    height=120,
                )
                example = gr.Button("Generate an example video", elem_id="example", size="sm")
                strip = gr.Image(
                    label="Sampled frames (green: slow, orange: fast; time, kind, tokens)",
                    elem_id="filmstrip",
                    type="pil",
                    format="png",
                    interactive=False,
                )
                tokens = gr.Markdown(elem_id="tokens")
                with gr.Accordion("Settings", open=True):
                    think = gr.Radio(THINK_CHOICES, value="auto", label="Thinking", elem_id="think")
                    tools = gr.Checkbox(
                        label="Tools (Thyme: the model writes code, a sandbox runs it)",
                        value=False,
                        interactive=tools_ok,
                        elem_id="tools",
                        info=tools_info,
                    )
                    fps = gr.Slider(0.25, 4.0, value=min(s.fps, 4.0), step=0.25, label="Frames per second")
                    max_frames = gr.Slider(
                        1, max(s.max_frames, 1), value=s.max_frames, step=1, label="Max frames"
                    )
                    budget = gr.Slider(
                        64,
                        max(s.token_budget * 4, 4096),
                        value=s.token_budget,
                        step=64,
                        label="Vision token budget per video",
                    )
                    compress = gr.Radio(
                        [(COMPRESSION_LABELS.get(c, c), c) for c in COMPRESSIONS],
                        value="none",
                        label="Token compression (of video frames)",
                        elem_id="compress",
                        info=None if "clapper" in COMPRESSIONS else "Clapper is not wired into chat yet.",
                    )
                    max_new = gr.Slider(
                        1, limits.max_new_tokens, value=min(256, limits.max_new_tokens), step=1,
                        label="Max new tokens", elem_id="max-new",
                    )  # fmt: skip

        plan_inputs = [fps, max_frames, budget, compress]
        media_outputs = [media, state, chatbot, strip, tokens]
        media.upload(demo.on_media, [media, state, *plan_inputs], media_outputs, api_name="load_media")
        media.clear(demo.on_media, [media, state, *plan_inputs], media_outputs, api_name=False)
        for control in plan_inputs:
            control.change(
                demo.on_settings,
                [state, *plan_inputs],
                [state, strip, tokens],
                api_name=False,
                trigger_mode="always_last",
            )
        example.click(
            demo.on_example,
            [state, *plan_inputs],
            [media, state, chatbot, strip, tokens, prompt],
            api_name="example",
        )
        chat_args = dict(
            fn=demo.respond,
            inputs=[prompt, state, think, tools, compress, max_new],
            outputs=[chatbot, prompt, state, stats, media, tokens],
            concurrency_id="generate",
        )
        send.click(**chat_args, api_name="chat")
        prompt.submit(**chat_args, api_name=False)
        # Stop and Clear must not wait behind the generation they interrupt: no concurrency limit.
        stop.click(demo.on_stop, [state], None, api_name="stop", concurrency_limit=None)
        clear_outputs = [state, chatbot, strip, tokens, stats, media, prompt]
        clear.click(demo.on_clear, [state], clear_outputs, api_name="clear", concurrency_limit=None)
        # The chat's own bin icon clears the display; forget the conversation with it.
        chatbot.clear(demo.on_clear, [state], clear_outputs, api_name=False, concurrency_limit=None)
    return app


def launch(
    app: gr.Blocks,
    limits: Limits | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    block: bool = True,
):
    """Serve ``app``: a queue of at most ``limits.queue_size`` waiting requests, ``limits.concurrency``
    generations at once, uploads over ``limits.max_upload_mb`` refused."""
    limits = limits or Limits()
    app.queue(default_concurrency_limit=limits.concurrency, max_size=limits.queue_size)
    return app.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=f"{limits.max_upload_mb:g}mb",
        prevent_thread_lock=not block,
        show_error=False,
        quiet=True,
        css=CSS,
    )


def run(
    model_name: str = "keye-tiny",
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    limits: Limits | None = None,
    block: bool = True,
) -> Any:
    """Load ``model_name`` with `load_pretrained`, build the app and serve it; prints the local URL."""
    from keye import load_pretrained

    limits = limits or Limits()
    model, processor = load_pretrained(model_name)
    app = build_app(model, processor, model_name=model_name, limits=limits)
    launch(app, limits, host=host, port=port, share=share, block=False)
    print(f"keye demo ({model_name}) running on {app.local_url}", flush=True)
    if app.share_url:
        print(f"public URL: {app.share_url}", flush=True)
    if block:
        app.block_thread()
    return app
