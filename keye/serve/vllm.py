"""Send a video to a vLLM server running Keye-VL-1.5 with keye's Slow-Fast plan (vLLM plans no Slow-Fast itself).

vLLM's OpenAI server samples a plain ``video_url`` uniformly and treats every frame as slow, without timestamps. This
helper plans the video with keye (`keye.encoders.slowfast.plan_video`, Keye-VL-1.5's settings by default) and sends
the planned frames as a JPEG frame list with the plan in ``mm_processor_kwargs``, as keye-vl-utils hands it to the
official processor:

- ``frame_types`` (0 slow, 1 fast) and ``timestamps`` (seconds): read by vLLM's Keye-VL-1.5 processor
  (``vllm/model_executor/models/keye_vl1_5.py``, ``KeyeVL1_5MultiModalProcessor._get_prompt_updates``, vLLM 0.33.0),
  which writes ``<|frame|>`` + the timestamp (one decimal) before each frame and wraps fast frames in
  ``<|fast_start|>``/``<|fast_end|>``;
- ``height``, ``width``, ``fast_height``, ``fast_width``: the slow and fast frame sizes, which the official processor
  resizes to (keye-vl-utils 1.5.2, ``fetch_video``'s processor kwargs). Each of these six is a list with one entry
  per video, as keye-vl-utils' ``process_vision_info`` builds them and vLLM's processor indexes them;
- ``media_io_kwargs.video.num_frames``: vLLM cuts a ``data:video/jpeg`` frame list to ``num_frames`` (32 by default,
  ``vllm/multimodal/media/video.py``), so the helper sets it to the plan's frame count; ``fps`` is the plan's rate.

All frames travel at the slow frames' size (a frame list is one array); the processor shrinks the fast ones. The
request fields themselves (``mm_processor_kwargs``, ``media_io_kwargs``, ``chat_template_kwargs``) are those of vLLM
0.33.0's ``ChatCompletionRequest`` (``vllm/entrypoints/openai/chat_completion/protocol.py``).

    from keye.serve.vllm import ask
    print(ask("http://gpu-host:8000/v1", "clip.mp4", "What happens?"))

Not run against a live vLLM here (no GPU); `tests/test_serve_vllm.py` checks the exact request on the wire.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from keye.encoders import video as video_io
from keye.encoders.slowfast import SlowFastConfig, VideoPlan, plan_video

__all__ = ["KEYE_VL_1_5", "ask", "vllm_request"]

KEYE_VL_1_5 = "Kwai-Keye/Keye-VL-1_5-8B"


def _jpeg(frame, quality: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode()


def vllm_request(
    video: str | Path,
    question: str,
    *,
    model: str = KEYE_VL_1_5,
    config: SlowFastConfig | None = None,
    max_tokens: int = 512,
    think: bool | None = None,
    jpeg_quality: int = 95,
    **sampling,
) -> tuple[dict, VideoPlan]:
    """The chat-completions body for ``question`` about ``video`` (and the plan it carries). ``sampling``:
    ``temperature``, ``top_p``, ``seed``, ... as the API takes them."""
    plan, _ = plan_video(video, config, keep_frames=False)
    slow = next(f for f in plan.frames if f.kind == "slow")
    fast = next((f for f in plan.frames if f.kind == "fast"), slow)
    frames = video_io.decode(video, [f.index for f in plan.frames], (slow.height, slow.width))
    url = "data:video/jpeg;base64," + ",".join(_jpeg(f, jpeg_quality) for f in frames)
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": url}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "media_io_kwargs": {"video": {"num_frames": len(plan.frames), "fps": plan.sample_fps}},
        "mm_processor_kwargs": {
            "frame_types": [[int(f.kind == "fast") for f in plan.frames]],
            "timestamps": [[round(f.time, 3) for f in plan.frames]],
            "height": [slow.height],
            "width": [slow.width],
            "fast_height": [fast.height],
            "fast_width": [fast.width],
        },
        **sampling,
    }
    if think is not None:
        body["chat_template_kwargs"] = {"enable_thinking": think}
    return body, plan


def ask(base_url: str, video: str | Path, question: str, *, api_key: str = "EMPTY", **kwargs) -> str:
    """Ask a vLLM (or any OpenAI-compatible) server about ``video`` with keye's plan; returns the answer text."""
    import openai

    body, _ = vllm_request(video, question, **kwargs)
    client = openai.OpenAI(base_url=base_url, api_key=api_key)
    standard = {k: body.pop(k) for k in ("model", "messages", "max_tokens")}
    reply = client.chat.completions.create(**standard, extra_body=body)
    return reply.choices[0].message.content
