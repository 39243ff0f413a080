"""The vLLM route: `keye.serve.vllm` sends keye's Slow-Fast plan in the fields vLLM 0.33.0's Keye-VL-1.5 processor
and keye-vl-utils 1.5.2 use (see the module's docstring for where each is read). Checked on the wire with the
``openai`` client against a loopback HTTP server that records the request (no GPU, no vLLM here)."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading

import pytest
from PIL import Image

from keye.encoders.slowfast import SlowFastConfig
from keye.serve.vllm import ask, vllm_request

pytest.importorskip("openai")


def test_the_request_carries_the_plan(sample_video):
    body, plan = vllm_request(sample_video, "What happens?", temperature=0.0)
    kinds = [f.kind for f in plan.frames]
    assert "slow" in kinds and "fast" in kinds  # the clip has scene cuts and motion: both kinds planned
    n = len(plan.frames)
    url = body["messages"][0]["content"][0]["video_url"]["url"]
    header, frames = url.split(",", 1)[0], url.split(",")[1:]
    assert header == "data:video/jpeg;base64" and len(frames) == n
    slow = next(f for f in plan.frames if f.kind == "slow")
    fast = next(f for f in plan.frames if f.kind == "fast")
    for data in frames:  # one array: every frame at the slow size
        assert Image.open(io.BytesIO(base64.b64decode(data))).size == (slow.width, slow.height)
    mm = body["mm_processor_kwargs"]
    assert mm["frame_types"] == [[1 if k == "fast" else 0 for k in kinds]]
    assert mm["timestamps"] == [[pytest.approx(f.time, abs=1e-3) for f in plan.frames]]
    assert sorted(format(t, ".1f") for t in mm["timestamps"][0]) == sorted(
        f"{f.time:.1f}" for f in plan.frames
    )
    assert (mm["height"], mm["width"], mm["fast_height"], mm["fast_width"]) == (
        [slow.height],
        [slow.width],
        [fast.height],
        [fast.width],
    )
    assert fast.height * fast.width < slow.height * slow.width
    # vLLM keeps only media_io_kwargs.video.num_frames frames of a frame list (32 by default)
    assert body["media_io_kwargs"] == {"video": {"num_frames": n, "fps": plan.sample_fps}}
    assert body["model"] == "Kwai-Keye/Keye-VL-1_5-8B" and body["temperature"] == 0.0
    few, few_plan = vllm_request(sample_video, "?", config=SlowFastConfig(max_frames=3))
    assert len(few_plan.frames) == 3 and len(few["mm_processor_kwargs"]["frame_types"][0]) == 3


def test_ask_sends_exactly_that_body_through_the_openai_client(sample_video):
    seen: list[dict] = []

    class Fake(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            seen.append(
                {"path": self.path, "body": json.loads(self.rfile.read(int(self.headers["content-length"])))}
            )
            reply = json.dumps({
                "id": "x", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "a red circle"},
                             "finish_reason": "stop"}],
            }).encode()  # fmt: skip
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        answer = ask(
            f"http://127.0.0.1:{server.server_address[1]}/v1", sample_video, "What happens?", think=False
        )
    finally:
        server.shutdown()
    expected, _ = vllm_request(sample_video, "What happens?", think=False)
    assert answer == "a red circle"
    assert seen[0]["path"] == "/v1/chat/completions" and seen[0]["body"] == expected
