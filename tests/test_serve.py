"""``keye serve`` against the official ``openai`` client on 127.0.0.1: images and videos as data urls, frame lists and
allowed local paths; streaming and not; usage with cached tokens on the second turn; refusals as OpenAI error
objects with the right status."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    from keye.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("serve")
    allowed = root / "allowed"
    samples = generate_dataset(allowed / "media", seed=3, n=2, kinds=("video",), progress=False)
    video = Path(next(iter(Path(allowed / "media").rglob("*.mp4"))))
    (root / "secret.mp4").write_bytes(video.read_bytes())
    (allowed / "escape.mp4").symlink_to(root / "secret.mp4")
    port = _port()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "keye.cli", "serve", "--port", str(port), "--max-upload-mb", "1",
         "--allowed-local-media-path", str(allowed)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    request.addfinalizer(proc.kill)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
    return {
        "client": client,
        "base": base,
        "video": video,
        "root": root,
        "allowed": allowed,
        "samples": samples,
    }


def _data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _ask(client, parts, **kw):
    return client.chat.completions.create(
        model="keye-tiny", messages=[{"role": "user", "content": parts}], max_tokens=6, **kw
    )


def test_video_then_a_second_question_reuses_the_cached_prefix(server):
    c = server["client"]
    video = {"type": "video_url", "video_url": {"url": _data_url(server["video"], "video/mp4")}}
    msgs = [{"role": "user", "content": [video, {"type": "text", "text": "What colour is the shape?"}]}]
    first = c.chat.completions.create(model="keye-tiny", messages=msgs, max_tokens=6)
    assert first.object == "chat.completion" and first.choices[0].message.content
    assert first.usage.prompt_tokens > 50 and first.usage.prompt_tokens_details.cached_tokens == 0
    msgs += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "How many shapes are there?"},
    ]
    stream = c.chat.completions.create(
        model="keye-tiny", messages=msgs, max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    usage = chunks[-1].usage
    assert text.strip() and usage.completion_tokens >= 1
    # the whole first turn up to the video's end came from the cache (the video was not encoded again): all of the
    # first prompt but its question and the generation prompt
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached < first.usage.prompt_tokens <= cached + 20 and cached < usage.prompt_tokens
    # the answer with the cache is the answer without it: a fresh server-side prefill of the same conversation
    again = c.chat.completions.create(model="keye-tiny", messages=msgs, max_tokens=6)
    assert again.choices[0].message.content == text.strip()


def test_image_frame_list_and_allowed_local_path(server):
    c = server["client"]
    img = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), (200, 30, 30), np.uint8)).save(img, "PNG")
    url = f"data:image/png;base64,{base64.b64encode(img.getvalue()).decode()}"
    r = _ask(c, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Colour?"}])
    assert r.choices[0].message.content and r.usage.prompt_tokens > 10
    frames = []
    for k in range(4):
        buf = io.BytesIO()
        Image.fromarray(np.full((56, 56, 3), 60 * k, np.uint8)).save(buf, "JPEG")
        frames.append(base64.b64encode(buf.getvalue()).decode())
    r = _ask(c, [{"type": "video_url", "video_url": {"url": "data:video/jpeg;base64," + ",".join(frames)}},
                 {"type": "text", "text": "What happens?"}])  # fmt: skip
    assert r.choices[0].message.content is not None and r.usage.prompt_tokens > 10
    r = _ask(c, [{"type": "video_url", "video_url": {"url": f"file://{server['video']}"}},
                 {"type": "text", "text": "What is shown?"}])  # fmt: skip
    assert r.choices[0].message.content


@pytest.mark.parametrize(
    "case",
    ["outside", "dotdot", "symlink", "http", "corrupt_base64", "not_a_video", "over_long", "bad_part"],
)
def test_bad_requests_are_refused_with_an_error_object(server, case):
    c, allowed = server["client"], server["allowed"]
    part = {
        "outside": {"type": "video_url", "video_url": {"url": str(server["root"] / "secret.mp4")}},
        "dotdot": {"type": "video_url", "video_url": {"url": f"{allowed}/../secret.mp4"}},
        "symlink": {"type": "video_url", "video_url": {"url": str(allowed / "escape.mp4")}},
        "http": {"type": "video_url", "video_url": {"url": "http://example.com/v.mp4"}},
        "corrupt_base64": {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,@@@@"}},
        "not_a_video": {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,"
                                                           + base64.b64encode(b"%PDF-1.4 not a video" * 50).decode()}},
        "over_long": {"type": "text", "text": "word " * 20000},
        "bad_part": {"type": "audio_url", "audio_url": {"url": "x"}},
    }[case]  # fmt: skip
    with pytest.raises(openai.BadRequestError) as err:
        _ask(c, [part, {"type": "text", "text": "?"}])
    body = err.value.body
    assert set(body) >= {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    assert "\n" not in body["message"]
    if case != "over_long":
        assert body["param"] == "messages[0].content[0]"
    else:
        assert "context" in body["message"]


def test_oversized_upload_is_413_and_the_server_stays_up(server):
    big = base64.b64encode(os.urandom(3 << 20)).decode()  # 3 MB > --max-upload-mb 1
    with pytest.raises(openai.APIStatusError) as err:
        _ask(server["client"], [{"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{big}"}}])
    assert err.value.status_code == 413
    r = httpx.get(server["base"] + "/metrics")
    assert r.status_code == 200 and "keye_requests_total" in r.text and "keye_request_errors_total" in r.text
    assert httpx.get(server["base"] + "/v1/models").json()["data"][0]["id"] == "keye-tiny"
