"""The Gradio chat demo: upload a video or image (or generate one), ask, watch the answer stream.

A client of keye's public API only: `load_pretrained` gives the model and processor, the processor plans each
video (`KeyeProcessor.load_video`: Slow-Fast frames within the token budget), and a `ChatSession` per browser
session generates, streaming, with the KV cache kept across turns (a follow-up question does not re-encode the
video). Nothing here runs the model another way.

    DemoApp(model, processor, model_name=..., limits=..., work_dir=...)   # the handlers; the page: `keye.demo.page`

What the page promises is what happens: the model's card (`keye.configuration.ModelCard`) says what it can do and
toggles it was not trained for are disabled with the reason; the media the panel calls "in the conversation" are
the media the next prompt carries (a tool turn's image is sent to the chat again if the chat has not seen it); a
generated example keeps its questions and expected answers beside the model's answers, marked right or wrong.

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
from typing import TYPE_CHECKING, Any

import gradio as gr
import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from keye.chat import ChatSession
from keye.compression import compressed_video_tokens
from keye.demo.limits import Limits
from keye.demo.messages import (
    error_message,
    reply_messages,
    same_question,
    speed_summary,
    tool_answer,
    tool_round_messages,
    tools_status,
    truth_panel,
    video_summary,
)
from keye.errors import KeyeInputError
from keye.processing import KeyeProcessor, VideoInput

if TYPE_CHECKING:
    from keye.synthetic import QA, Sample

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
THINK_CHOICES = [("model default", "auto"), ("think (/think)", "on"), ("answer directly (/no_think)", "off")]
THINK_VALUES = {"auto": None, "on": True, "off": False}
COMPRESSION_LABELS = {"none": "none", "dyntok": "DynTok", "clapper": "Clapper"}
EXAMPLE_PROMPT = "What happens in this video?"
PENDING_NOTE = "  \n*Goes with your next question.*"
SENT_NOTE = "  \n*In the conversation: follow-up questions are about it too.*"
TEXT_ONLY_NOTE = (
    "ℹ No video or image in this conversation, so {model} answers from your text alone. Upload a file or generate "
    "an example to ask about one."
)
UNTRAINED_CLAPPER = (
    "⚠ This model has no trained Clapper: an untrained one pools the frames' tokens, and answers may suffer."
)


TOOL_EXAMPLE_CAPTION = (
    "a large image of big shapes with a small shape in one corner, too small to see at the model's input size "
    "(the tool task: crop and enlarge that corner; turn Tools on)"
)


@dataclass
class ToolTaskExample:
    """A generated tool-task image (`keye.posttrain.tooltask.tool_example`) as the truth panel shows it."""

    caption: str
    questions: list[QA]


@dataclass(eq=False)  # compared by identity: the same upload, not an equal one
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
    in_session: list[Media] = field(default_factory=list)  # media the chat session's cache holds
    pending: Media | None = None
    sent: list[Media] = field(default_factory=list)  # media in the conversation (chat or tool turns)
    example: Sample | ToolTaskExample | None = None  # the generated example up, its questions and answers
    graded: dict[str, tuple[str, bool]] = field(default_factory=dict)  # example question -> (answer, right)
    stop: threading.Event = field(default_factory=threading.Event)
    busy: threading.Lock = field(default_factory=threading.Lock)

    def drop_session(self) -> None:
        """Forget the chat session (its cache may hold a half-finished turn); the media stay in the
        conversation and go with the next question again."""
        self.session, self.in_session = None, []


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

    def __init__(self, model, processor: KeyeProcessor, *, model_name: str, limits: Limits, work_dir: Path):
        self.model = model
        self.processor = processor
        self.model_name = model_name
        self.limits = limits
        self.card = model.config.card
        # Generated examples and the tool loop's images. The caller owns the folder (`keye demo` removes it on exit).
        self.work_dir = Path(work_dir)
        self._example_lock = threading.Lock()
        self._example_count = 0

    def toggles(self) -> dict[str, tuple[bool, str | None]]:
        """Whether the thinking and tools controls can be used with this model here, and the line under each."""
        name = self.model_name
        think = (
            (True, None)
            if self.card.thinking
            else (False, f"{name} was not trained to reason step by step: it answers directly.")
        )
        sandbox_ok, sandbox_info = tools_status()
        if not self.card.tools:
            tools = (False, f"{name} has not learned to write code for the tools yet.")
        else:
            tools = (sandbox_ok, sandbox_info)
        return {"think": think, "tools": tools}

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
        if compress == "clapper" and self.model.clapper is None:
            summary += "  \n" + UNTRAINED_CLAPPER
        return (
            Media("video", path, name, video, summary),
            filmstrip(video.plan, video.frames, per_row=4),
            summary,
        )

    def on_media(
        self, path: str | None, st: DemoState | None, fps, max_frames, token_budget, compress, example=None
    ):
        """A file was uploaded (or set): check and plan it, or say in the chat why it cannot be used (and drop it).

        Returns ``(file box, state, chatbot, film strip, token count, player, truth panel, preset questions)``. A
        dropped file clears the film strip and player only when they showed the dropped file, not a video already
        in the conversation. An upload replaces the generated example's panel (``example``: the `Sample` of a
        generated clip)."""
        st = st or DemoState()
        dropped = gr.skip() if st.pending is None else None
        st.pending = None
        if example is not None or path:
            st.example, st.graded = example, {}
        truth, presets = self._example_outputs(st)
        if not path:
            return None, st, st.history, dropped, dropped, dropped, truth, presets
        try:
            media, strip, summary = self.check_media(
                path, self._overrides(fps, max_frames, token_budget), compress
            )
        except KeyeInputError as e:
            st.history.append(error_message(e))
            return None, st, st.history, dropped, dropped, dropped, truth, presets
        st.pending = media
        if media.kind == "video":
            label, player = (
                "Sampled frames (green: slow, orange: fast; time, kind, tokens)",
                gr.update(value=path, visible=True),
            )
        else:
            label, player = "The image (its size as the model sees it is below)", gr.update(visible=False)
        strip = gr.update(value=strip, label=label)
        return gr.skip(), st, st.history, strip, summary + PENDING_NOTE, player, truth, presets

    def _example_outputs(self, st: DemoState) -> tuple[str, Any]:
        """The truth panel and the preset-question choices for the example up (empty and hidden without one)."""
        if st.example is None:
            return "", gr.update(choices=[], value=None, visible=False)
        truth = truth_panel(st.example, st.graded, self.model_name)
        choices = [qa.question for qa in st.example.questions]
        return truth, gr.update(choices=choices, value=None, visible=True)

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
        out = self.on_media(str(path), st, fps, max_frames, token_budget, compress, example=sample)
        question = sample.questions[0].question if sample.questions else EXAMPLE_PROMPT
        return (str(path), *out[1:], question)

    def on_tool_example(self, st: DemoState | None, fps, max_frames, token_budget, compress):
        """Generate an image of the tool task, put it up with its question, and turn Tools on if the model uses them."""
        from keye.posttrain.tooltask import tool_example

        st = st or DemoState()
        with self._example_lock:
            seed = self._example_count
            self._example_count += 1
        path = self.work_dir / "examples" / f"tool-example-{seed}.png"
        qa = tool_example(path, seed=seed)
        example = ToolTaskExample(TOOL_EXAMPLE_CAPTION, [qa])
        out = self.on_media(str(path), st, fps, max_frames, token_budget, compress, example=example)
        tools = gr.update(value=True) if self.toggles()["tools"][0] else gr.skip()
        return (str(path), *out[1:], qa.question, tools)

    # ---------------------------------------------------------------- chat
    def respond(
        self, message: str, st: DemoState | None, think: str, tools: bool, compress: str, max_new_tokens
    ) -> Iterator[tuple]:
        """Stream the answer to ``message`` (with the pending media, if any) into the chat.

        Yields ``(chatbot messages, prompt box, state, speed line, file box, token count, truth panel)``; once its
        file goes into the conversation the file box is emptied, ready for the next upload (the player and, for a
        generated example, the truth panel keep showing it)."""
        st = st or DemoState()
        text = (message or "").strip()
        if not text:
            yield st.history, message, st, gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        if not st.busy.acquire(blocking=False):
            st.history.append(error_message("Still answering the previous question; press Stop first."))
            yield st.history, message, st, gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        try:
            use_tools = tools and self.toggles()["tools"][0]
            carried = self._media_for_turn(st, use_tools)
            names = ", ".join(m.name for m in carried)
            st.history.append({"role": "user", "content": f"*[{names}]*\n\n{text}" if carried else text})
            note = TEXT_ONLY_NOTE.format(model=self.model_name)
            if st.pending is None and not st.sent and all(m["content"] != note for m in st.history):
                st.history.append({"role": "assistant", "content": note})  # once per conversation
            st.stop.clear()
            media = st.pending
            tokens = media.summary + SENT_NOTE if media else gr.skip()
            yield st.history, "", st, "…", None if media else gr.skip(), tokens, gr.skip()
            if (
                not self.card.thinking
            ):  # its control is disabled: never send a mode the model was not trained for
                think = "auto"
            turn = self._tool_turn if use_tools else self._chat_turn
            for out in turn(text, st, THINK_VALUES[think], compress, int(max_new_tokens)):
                yield *out, gr.skip(), gr.skip(), gr.skip()
            if self._grade(text, st):
                yield st.history, "", st, gr.skip(), gr.skip(), gr.skip(), self._example_outputs(st)[0]
        finally:
            st.busy.release()

    def _media_for_turn(self, st: DemoState, tools: bool) -> list[Media]:
        """The media the next prompt carries: for a chat turn, every medium of the conversation its session has not
        seen (one sent in a tool turn goes to the chat now) and the waiting one; for a tool turn, the last image."""
        waiting = [st.pending] if st.pending else []
        if tools:
            return [m for m in [*st.sent, *waiting] if m.kind == "image"][-1:]
        return [m for m in st.sent if m not in st.in_session] + waiting

    def _grade(self, text: str, st: DemoState) -> bool:
        """After a turn: if the question is one of the example's, mark the answer right or wrong beside it (and in
        the truth panel). Returns whether it did."""
        example = st.example
        if example is None or not st.history or st.history[-1]["role"] != "assistant":
            return False
        qa = next((q for q in example.questions if same_question(q.question, text)), None)
        answer = st.history[-1]["content"]
        if qa is None or not isinstance(answer, str) or answer.startswith(("⚠", "ℹ", "*(")):
            return False
        ok = qa.is_correct(answer)
        st.graded[qa.question] = (answer.strip(), ok)
        verdict = "✓ **Right**" if ok else "✗ **Wrong**"
        st.history = [
            *st.history,
            {"role": "assistant", "content": f"{verdict}: the expected answer is **{qa.answer}**."},
        ]
        return True

    def _chat_turn(
        self, text: str, st: DemoState, think: bool | None, compress: str, max_new_tokens: int
    ) -> Iterator[tuple]:
        """One turn of the conversation's `ChatSession`, streamed token by token."""
        carried = self._media_for_turn(st, tools=False)
        if st.session is None:
            st.session = ChatSession(self.model, self.processor)
        st.session.think = think  # both apply from this turn on; earlier turns stay in the cache as they were
        st.session.compress = compress
        videos = [m.video for m in carried if m.kind == "video"]
        images = [m.path for m in carried if m.kind == "image"]
        base = list(st.history)
        finished = False
        try:
            reply_text = ""
            for piece in st.session.stream(
                text,
                images=images,
                videos=videos,
                max_new_tokens=max_new_tokens,
                stopping_criteria=StoppingCriteriaList([_StopOnEvent(st.stop)]),
            ):
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
            st.drop_session()
            st.history = [
                *base,
                error_message(f"Something went wrong ({type(e).__name__}: {e}); the answer was dropped."),
            ]
            yield st.history, "", st, ""
            return
        finally:
            if not finished:  # closed mid-stream (client gone): end generation, drop the inconsistent session
                st.stop.set()
                st.drop_session()
        reply = st.session.last_reply
        st.in_session += carried
        st.sent += [m for m in carried if m not in st.sent]
        st.pending = None
        st.history = base + reply_messages(reply.text, streaming=False)
        yield st.history, "", st, speed_summary(reply, st.stop.is_set())

    def _tool_turn(
        self, text: str, st: DemoState, think: bool | None, compress: str, max_new_tokens: int
    ) -> Iterator[tuple]:
        """One question through the Thyme loop (`keye.tools.loop.run_tool_loop`), shown round by round.

        Each question runs in a fresh `ChatSession` with the tool system prompt, on the image waiting to be sent or
        the last image of this conversation."""
        from keye.tools.loop import TOOL_SYSTEM_PROMPT, run_tool_loop
        from keye.tools.sandbox import SandboxUnavailableError

        carried = self._media_for_turn(st, tools=True)
        images = [m.path for m in carried]
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
        if st.pending is not None:
            st.sent.append(st.pending)  # in the conversation; the chat session has not seen it (`in_session`)
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
            st.history = [*base, *shown, *tool_answer(outcome["trace"])]
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
        """Forget the conversation, its cache, any media and the example.

        Returns ``(state, chatbot, film strip, token count, speed line, file box, prompt box, player, truth panel,
        preset questions)``."""
        if st is not None:
            st.stop.set()
        truth, presets = self._example_outputs(DemoState())
        return DemoState(), [], None, "", "", None, "", gr.update(value=None, visible=False), truth, presets
