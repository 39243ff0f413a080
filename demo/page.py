"""The demo's page: the Gradio Blocks layout wired to `keye.demo.app.DemoApp`'s handlers, and serving it.

    build_app(model, processor, model_name=..., work_dir=..., limits=Limits()) -> gr.Blocks
    launch(app, limits, host=..., port=..., share=...)      # queue with bounded concurrency, upload size limit
    run(model_name, work_dir=...)                           # load, build, serve until interrupted

Run it with ``keye demo`` (`keye.demo.cli`), which checks the port and owns the work folder.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from keye.compression import COMPRESSIONS
from keye.demo.app import COMPRESSION_LABELS, THINK_CHOICES, UNTRAINED_CLAPPER, DemoApp
from keye.demo.limits import Limits
from keye.processing import KeyeProcessor

__all__ = ["build_app", "launch", "run"]


# The film strip's label and buttons float over the picture: keep its first row of frames clear of them.
CSS = """
#filmstrip .image-container { padding-top: 2.4em; }
#filmstrip img { object-fit: contain; }
#tokens, #stats { font-size: 0.9em; }
"""


def header(model_name: str, device: str, card, limits: Limits) -> str:
    """The page's opening lines: the model, what it can do (its card), the limits."""
    lines = [f"## keye · {model_name} on {device}"]
    if card.notes:
        lines.append(card.notes)
    if card.answers:
        lines.append(f"**Answers:** {card.answers}.")
    lines.append(
        f"Upload a video or an image (at most {limits.max_upload_mb:g} MB; videos up to {limits.max_duration_s:g} s) "
        "or generate an example, then ask. Follow-up questions reuse the encoded video (the KV cache is kept), so "
        "only the first answer pays for the frames."
    )
    return "\n\n".join(lines)


def build_app(
    model, processor: KeyeProcessor, *, model_name: str, work_dir: Path, limits: Limits | None = None
) -> gr.Blocks:
    """The Blocks app for one loaded model; generated files go under ``work_dir``, which the caller removes. Call
    `launch` (or ``.queue().launch()``) to serve it."""
    limits = limits or Limits()
    demo = DemoApp(model, processor, model_name=model_name, limits=limits, work_dir=work_dir)
    s = processor.settings.video  # the Slow-Fast config the sliders start from
    toggles = demo.toggles()
    clapper_info = None if model.clapper is not None else "Clapper: " + UNTRAINED_CLAPPER.lstrip("⚠ ")
    with gr.Blocks(title="keye demo") as app:
        gr.Markdown(header(model_name, str(model.device), demo.card, limits), elem_id="header")
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
                truth = gr.Markdown(elem_id="truth")
                presets = gr.Radio([], label="Questions about this example", elem_id="presets", visible=False)
            with gr.Column(scale=2):
                # Every file reaches `on_media`, which explains in the chat what it cannot use (no browser pop-up).
                media = gr.File(label="Video or image", elem_id="media", type="filepath", height=120)
                with gr.Row():
                    example = gr.Button("Generate an example video", elem_id="example", size="sm")
                    tool_example = gr.Button("Generate a tool-task image", elem_id="tool-example", size="sm")
                player = gr.Video(
                    label="The video", elem_id="player", interactive=False, visible=False, height=240
                )
                strip = gr.Image(
                    label="Sampled frames (green: slow, orange: fast; time, kind, tokens)",
                    elem_id="filmstrip",
                    type="pil",
                    format="png",
                    interactive=False,
                )
                tokens = gr.Markdown(elem_id="tokens")
                with gr.Accordion("Settings", open=True):
                    think_ok, think_info = toggles["think"]
                    think = gr.Radio(
                        THINK_CHOICES,
                        value="auto",
                        label="Thinking",
                        elem_id="think",
                        interactive=think_ok,
                        info=think_info,
                    )
                    tools_ok, tools_info = toggles["tools"]
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
                        info=clapper_info,
                    )
                    max_new = gr.Slider(
                        1, limits.max_new_tokens, value=min(256, limits.max_new_tokens), step=1,
                        label="Max new tokens", elem_id="max-new",
                    )  # fmt: skip

        plan_inputs = [fps, max_frames, budget, compress]
        media_outputs = [media, state, chatbot, strip, tokens, player, truth, presets]
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
        example.click(demo.on_example, [state, *plan_inputs], [*media_outputs, prompt], api_name="example")
        tool_example.click(
            demo.on_tool_example,
            [state, *plan_inputs],
            [*media_outputs, prompt, tools],
            api_name="tool_example",
        )
        presets.select(lambda q: q, [presets], [prompt], api_name=False)
        chat_args = dict(
            fn=demo.respond,
            inputs=[prompt, state, think, tools, compress, max_new],
            outputs=[chatbot, prompt, state, stats, media, tokens, truth],
            concurrency_id="generate",
        )
        send.click(**chat_args, api_name="chat")
        prompt.submit(**chat_args, api_name=False)
        # Stop and Clear must not wait behind the generation they interrupt: no concurrency limit.
        stop.click(demo.on_stop, [state], None, api_name="stop", concurrency_limit=None)
        clear_outputs = [state, chatbot, strip, tokens, stats, media, prompt, player, truth, presets]
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
    allowed_paths: list[str] | None = None,
):
    """Serve ``app``: a queue of at most ``limits.queue_size`` waiting requests, ``limits.concurrency``
    generations at once, uploads over ``limits.max_upload_mb`` refused; files under ``allowed_paths`` (the work
    folder) may be shown."""
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
        allowed_paths=allowed_paths,
    )


def run(
    model_name: str = "keye-tiny",
    *,
    work_dir: Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    limits: Limits | None = None,
) -> None:
    """Load ``model_name`` with `load_pretrained`, build the app and serve it until interrupted; prints the local
    URL. Generated files go under ``work_dir`` (``keye demo`` makes it and removes it on exit)."""
    from keye import load_pretrained

    limits = limits or Limits()
    model, processor = load_pretrained(model_name)
    name = Path(model_name).name  # a folder's name, not its whole path
    app = build_app(model, processor, model_name=name, limits=limits, work_dir=work_dir)
    launch(app, limits, host=host, port=port, share=share, block=False, allowed_paths=[str(work_dir)])
    print(f"keye demo ({name}) running on {app.local_url}", flush=True)
    if app.share_url:
        print(f"public URL: {app.share_url}", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()
