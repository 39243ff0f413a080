"""The Gradio demo as a user and an API client meet it: `keye demo` in a subprocess on a free localhost port,
driven by Playwright with the system Chromium (Debian's ``chromium``; never a downloaded browser) and by
``gradio_client``.

Screenshots and the measured timings go to ``$KEYE_ARTIFACTS/demo`` (a pytest temporary folder unless set); their
paths are printed. Without Chromium the browser test is skipped, except under CI, where it fails (install it with
``apt-get install -y chromium``; `conftest.require_system_tool`).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, require_system_tool

pytest.importorskip("gradio")

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
QUESTION = "What happens in this video?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _artifacts() -> Path:
    out = Path(os.environ["KEYE_ARTIFACTS"]) / "demo"  # a pytest temporary folder unless set (conftest)
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    """`keye demo` with keye-tiny, as a user starts it; yields its URL and stops it afterwards."""
    port = _free_port()
    log = tmp_path_factory.mktemp("demo") / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "keye.demo.cli", "demo", "--port", str(port), "--max-duration", "60"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180  # the first use of keye-tiny builds it (~20 s; more on busy cores)
        while True:
            if proc.poll() is not None:
                pytest.fail(f"keye demo exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if f"running on {url}" in log.read_text():
                break
            if time.monotonic() > deadline:
                pytest.fail(f"keye demo did not start in 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def clips(media_dir):
    from keye.synthetic import make_demo_video

    video = media_dir / "demo-clip.mp4"
    sample = make_demo_video(video, seed=5, duration=4.0, size=(180, 320), fps=8)
    corrupt = media_dir / "corrupt.mp4"
    corrupt.write_bytes(video.read_bytes()[:3000])  # a truncated container
    return video, corrupt, sample


def test_api_through_gradio_client(demo_url, clips):
    from gradio_client import Client, handle_file

    video, corrupt, _ = clips
    client = Client(demo_url, verbose=False)
    assert {"/load_media", "/example", "/chat", "/stop", "/clear"} <= set(
        client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    )
    _, history, strip, tokens = client.predict(
        handle_file(str(video)), 2.0, 16, 1024, "none", api_name="/load_media"
    )
    total = int(re.search(r"\*\*(\d+) vision tokens\*\*", tokens).group(1))
    assert history == [] and Path(strip).is_file() and total > 0

    job = client.submit(QUESTION, "auto", False, "none", 16, api_name="/chat")
    outputs = list(job)
    history, prompt_box, stats = outputs[-1][:3]
    answers = [o[0][-1]["content"][0]["text"] for o in outputs if o[0] and o[0][-1]["role"] == "assistant"]
    assert len(answers) >= 2 and answers[-1].startswith(answers[0])  # streamed: the answer grew
    assert history[0]["content"][0]["text"] == f"*[{video.name}]*\n\n{QUESTION}"
    first = re.search(r"(\d+) new tokens · prompt (\d+) tokens", stats)
    assert first and int(first.group(2)) > total  # the prompt holds the video's tokens

    history, _, stats, *_ = client.predict("And then?", "off", False, "none", 8, api_name="/chat")
    second = re.search(r"(\d+) new tokens · prompt (\d+) tokens", stats)
    assert int(second.group(2)) > int(first.group(2)) + int(first.group(1)), stats  # the conversation goes on
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]

    box, history, strip, tokens = client.predict(
        handle_file(str(corrupt)), 2.0, 16, 1024, "none", api_name="/load_media"
    )
    error = history[-1]["content"][0]["text"]
    assert error.startswith("⚠ **corrupt.mp4**: cannot open as a video") and "Traceback" not in error
    assert box is None  # the bad file is dropped


# Records, in the page's own clock, when Send is clicked, when the new answer's first text appears and when the
# speed line arrives (the stream is over): what a user sees, network and rendering included.
TIMING_JS = """
() => {
  const t = (window.__keye = {click: null, first: null, done: null, bots: 0});
  const bots = () => document.querySelectorAll('#chat [data-testid="bot"]');
  document.querySelector('#send').addEventListener('click', () => {
    Object.assign(t, {click: performance.now(), first: null, done: null, bots: bots().length});
  }, true);
  new MutationObserver(() => {
    if (t.click === null) return;
    const b = bots();
    if (t.first === null && b.length > t.bots && b[b.length - 1].innerText.trim()) t.first = performance.now();
    const stats = document.querySelector('#stats');
    if (t.first !== null && t.done === null && /new tokens/.test(stats.innerText)) t.done = performance.now();
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}
"""


def _ask(page, text: str) -> dict:
    """Type ``text``, click Send, wait for the whole answer; return what the page measured."""
    page.locator("#prompt textarea").fill(text)
    page.locator("#send").click()
    page.wait_for_function("window.__keye.done !== null", timeout=90_000)
    t = page.evaluate("window.__keye")
    stats = page.locator("#stats").inner_text()
    n = int(re.search(r"(\d+) new tokens", stats).group(1))
    decode_s = (t["done"] - t["first"]) / 1000
    return {
        "ttft_s": round((t["first"] - t["click"]) / 1000, 3),
        "tokens": n,
        "tokens_per_s": round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else None,
        "server_stats": stats,
    }


def test_queue_runs_one_generation_at_a_time(demo_url):
    """Two users at once: with ``--concurrency 1`` (the default) the second answer starts after the first ends."""
    import threading

    from gradio_client import Client

    times: dict[str, list[float]] = {"a": [], "b": []}

    def ask(name: str) -> None:
        job = Client(demo_url, verbose=False).submit(
            "Count to twenty.", "auto", False, "none", 24, api_name="/chat"
        )
        for _ in job:
            times[name].append(time.monotonic())

    a = threading.Thread(target=ask, args=("a",))
    a.start()
    deadline = time.monotonic() + 120
    while not times["a"]:  # a is being answered
        assert time.monotonic() < deadline, "the first request got no answer within 120 s"
        time.sleep(0.02)
    b = threading.Thread(target=ask, args=("b",))
    b.start()
    a.join(120)
    b.join(120)
    assert len(times["a"]) >= 2 and len(times["b"]) >= 2
    assert times["b"][0] > times["a"][-1] - 0.2  # b waited in the queue until a had finished


def test_browser_upload_ask_stream_and_bad_file(demo_url, clips, capsys):
    chromium = require_system_tool("chromium", "apt-get install -y chromium (make setup does)")
    from playwright.sync_api import sync_playwright  # a dev dependency: its absence is an error

    video, corrupt, sample = clips
    out = _artifacts()
    shots = []
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="keye-chromium-"),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = browser.new_page()
            page.goto(demo_url)
            page.wait_for_selector("#prompt textarea")
            page.evaluate(TIMING_JS)
            page.locator("#max-new input[type=number]").fill("24")  # keep the test short
            page.locator("#max-new input[type=number]").press("Enter")
            page.locator("#media input[type=file]").set_input_files(str(video))
            page.wait_for_selector("#filmstrip img", timeout=30_000)
            tokens = page.locator("#tokens").inner_text()
            assert re.search(r"\d+ frames \(\d+ slow, \d+ fast\) → \d+ vision tokens", tokens), tokens
            strip = page.locator("#filmstrip img").evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert min(strip) > 50  # the strip's picture loaded
            # DynTok: the waiting video is re-planned and its count after compression shown.
            page.locator("#compress label", has_text="DynTok").click()
            page.locator("#tokens", has_text="compression dyntok").wait_for(timeout=30_000)
            counts = re.search(
                r"(\d+) vision tokens.*compression dyntok: (\d+) tokens", page.locator("#tokens").inner_text()
            )
            assert int(counts.group(2)) < int(counts.group(1)), counts.group(0)

            first = _ask(page, QUESTION)
            answer = page.locator('#chat [data-testid="bot"]').last.inner_text().strip()
            assert answer and first["tokens"] >= 1
            shots.append(out / "1-answer.png")
            page.screenshot(path=shots[-1], full_page=True)

            follow_up = _ask(page, "What colour is the background?")
            assert page.locator('#chat [data-testid="user"]').count() == 2

            page.locator("#media input[type=file]").set_input_files(str(corrupt))
            error = page.locator('#chat [data-testid="bot"]', has_text="corrupt.mp4")
            error.wait_for(timeout=30_000)
            text = error.inner_text()
            assert "cannot open as a video" in text and "Traceback" not in text
            shots.append(out / "2-corrupt-file.png")
            page.screenshot(path=shots[-1], full_page=True)

            page.locator("#clear").click()
            page.wait_for_function("document.querySelectorAll('#chat [data-testid=\"bot\"]').length === 0")
            # A generated example arrives planned, with a question about it.
            page.locator("#example").click()
            page.locator("#tokens", has_text="What the clip shows").wait_for(timeout=30_000)
            assert page.locator("#prompt textarea").input_value().endswith("?")
            assert re.search(r"example-\d+\s*\.mp4", page.locator("#media").inner_text())
        finally:
            browser.close()

    timings = {"first_turn": first, "follow_up": follow_up, "video": sample.caption}
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    with capsys.disabled():
        print(f"\n[demo] screenshots: {', '.join(map(str, shots))}")
        for name, t in (("first turn", first), ("follow-up", follow_up)):
            print(f"[demo] {name}: TTFT {t['ttft_s']} s, {t['tokens_per_s']} tokens/s ({t['tokens']} tokens)")
        print(f"[demo] timings: {out / 'timings.json'}")
