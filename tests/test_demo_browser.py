"""The Gradio demo as a user and an API client meet it: `keye demo` in a subprocess on a free localhost port,
driven by Playwright with the system Chromium (Debian's ``chromium``; never a downloaded browser) and by
``gradio_client``.

Screenshots and the measured timings go to ``$KEYE_ARTIFACTS/demo`` (a pytest temporary folder unless set); their
paths are printed. Without Chromium the browser test is skipped, except under CI, where it fails (install it with
``apt-get install -y chromium``; `conftest.require_system_tool`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
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


def _start(args: list[str], log: Path, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`keye demo ARGS` on a free port, as a user starts it; returns the process and its URL once it serves."""
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    cmd = [sys.executable, "-m", "keye.demo.cli", "demo", "--port", str(port), "--max-duration", "60", *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180  # the first use of keye-tiny builds it (~20 s; more on busy cores)
    while True:
        if proc.poll() is not None:
            pytest.fail(f"keye demo exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if f"running on {url}" in log.read_text():
            break
        if time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"keye demo did not start in 180 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
    return proc, url


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM, as `kill` or a service manager sends; returns the exit status."""
    proc.terminate()
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    """`keye demo` with keye-tiny; yields its URL and stops it afterwards."""
    log = tmp_path_factory.mktemp("demo") / "server.log"
    proc, url = _start([], log)
    try:
        yield url
    finally:
        _stop(proc)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def clips(media_dir):
    from keye.synthetic import make_demo_video

    video = media_dir / "demo-clip.mp4"
    sample = make_demo_video(video, seed=5, duration=4.0, size=(180, 320), fps=8)
    corrupt = media_dir / "corrupt.mp4"
    corrupt.write_bytes(video.read_bytes()[:3000])  # a truncated container
    return video, corrupt, sample


def test_api_through_gradio_client(demo_url, clips, tmp_path):
    from gradio_client import Client, handle_file

    video, corrupt, _ = clips
    client = Client(demo_url, verbose=False, download_files=str(tmp_path))
    assert {"/load_media", "/example", "/chat", "/stop", "/clear"} <= set(
        client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    )
    _, history, strip, tokens, player, *_ = client.predict(
        handle_file(str(video)), 2.0, 16, 1024, "none", api_name="/load_media"
    )
    total = int(re.search(r"\*\*(\d+) vision tokens\*\*", tokens).group(1))
    assert history == [] and Path(strip["value"]).is_file() and total > 0
    assert Path(player["value"]).stat().st_size == video.stat().st_size  # the clip, as uploaded

    job = client.submit(QUESTION, "auto", False, "none", 16, api_name="/chat")
    outputs = list(job)
    history, prompt_box, stats = outputs[-1][:3]
    answers = [o[0][-1]["content"][0]["text"] for o in outputs if o[0] and o[0][-1]["role"] == "assistant"]
    assert len(answers) >= 2 and answers[-1].startswith(answers[0])  # streamed: the answer grew
    assert history[0]["content"][0]["text"] == f"*[{video.name}]*\n\n{QUESTION}"
    first = re.search(r"(\d+) new tokens in [\d.]+ s · prompt (\d+) tokens \((\d+) vision\)", stats)
    assert first and int(first.group(2)) > total == int(first.group(3))  # the prompt holds the video's tokens

    history, _, stats, *_ = client.predict("And then?", "off", False, "none", 8, api_name="/chat")
    second = re.search(r"(\d+) new tokens in [\d.]+ s · prompt (\d+) tokens", stats)
    assert int(second.group(2)) > int(first.group(2)) + int(first.group(1)), stats  # the conversation goes on
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]

    box, history, strip, tokens, *_ = client.predict(
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


def test_queue_runs_one_generation_at_a_time(demo_url, tmp_path):
    """Two users at once: with ``--concurrency 1`` (the default) the second answer starts after the first ends."""
    import threading

    from gradio_client import Client

    times: dict[str, list[float]] = {"a": [], "b": []}

    def ask(name: str) -> None:
        job = Client(demo_url, verbose=False, download_files=str(tmp_path)).submit(
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


@contextlib.contextmanager
def _page(url: str, profile: Path):
    """A page of the system Chromium (profile under a pytest folder) opened on ``url``, the app loaded, the
    answer length set low and the timing recorder installed."""
    chromium = require_system_tool("chromium", "apt-get install -y chromium (make setup does)")
    from playwright.sync_api import sync_playwright  # a dev dependency: its absence is an error

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("#prompt textarea")
            page.evaluate(TIMING_JS)
            page.locator("#max-new input[type=number]").fill("24")  # keep the tests short
            page.locator("#max-new input[type=number]").press("Enter")
            yield page
        finally:
            browser.close()


def _screenshot(page, name: str) -> Path:
    path = _artifacts() / name
    page.screenshot(path=path, full_page=True)
    print(f"\n[demo] screenshot: {path}")
    return path


def test_browser_upload_ask_stream_and_bad_file(demo_url, clips, capsys, tmp_path):
    video, corrupt, sample = clips
    out = _artifacts()
    shots = []
    with _page(demo_url, tmp_path / "chromium") as page:
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
        # Any file reaches the app (no browser pop-up): one it cannot use is explained in the chat like the rest.
        notes = corrupt.with_name("notes.txt")
        notes.write_text("hello")
        page.locator("#media input[type=file]").set_input_files(str(notes))
        page.locator('#chat [data-testid="bot"]', has_text="notes.txt").wait_for(timeout=30_000)
        assert "unsupported file type" in _bots(page)[-1]
        shots.append(out / "2-corrupt-file.png")
        page.screenshot(path=shots[-1], full_page=True)

    timings = {"first_turn": first, "follow_up": follow_up, "video": sample.caption}
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    with capsys.disabled():
        print(f"\n[demo] screenshots: {', '.join(map(str, shots))}")
        for name, t in (("first turn", first), ("follow-up", follow_up)):
            print(f"[demo] {name}: TTFT {t['ttft_s']} s, {t['tokens_per_s']} tokens/s ({t['tokens']} tokens)")
        print(f"[demo] timings: {out / 'timings.json'}")


def _bots(page) -> list[str]:
    return [t.strip() for t in page.locator('#chat [data-testid="bot"]').all_inner_texts()]


def test_browser_example_keeps_the_truth_beside_the_answer(demo_url, tmp_path, capsys):
    """A generated example: the clip plays, its questions and expected answers stay on the page after Send, and the
    answer is marked right or wrong."""
    with _page(demo_url, tmp_path / "chromium") as page:
        page.locator("#example").click()
        truth = page.locator("#truth")
        truth.get_by_text("Generated example").wait_for(timeout=60_000)
        rows = truth.locator("tbody tr")
        expected = rows.first.locator("td").nth(1).inner_text().strip()
        question = rows.first.locator("td").first.inner_text().strip()
        assert expected and page.locator("#prompt textarea").input_value() == question
        assert rows.count() == page.locator("#presets label").count() >= 3  # preset questions to pick from
        page.wait_for_function(
            "document.querySelector('#player video') && document.querySelector('#player video').readyState >= 1",
            timeout=30_000,
        )
        duration = page.locator("#player video").evaluate("v => v.duration")
        assert 5.5 < duration < 6.5  # the 6 s clip loaded in the page's player

        _ask(page, question)
        mark = _bots(page)[-1]
        assert re.fullmatch(rf"[✓✗] (Right|Wrong): the expected answer is {re.escape(expected)}\.", mark), (
            mark
        )
        answer = _bots(page)[-2]
        cell = rows.first.locator("td").nth(2).inner_text().strip()
        assert cell == f"{answer} {mark[0]}"  # the panel records the answer and the mark
        assert page.locator("#truth").inner_text().count(expected) >= 1  # still there after Send
        with capsys.disabled():
            _screenshot(page, "3-example-marked.png")

        # A second preset question, picked from the list, fills the prompt.
        page.locator("#presets label").nth(1).click()
        second = rows.nth(1).locator("td").first.inner_text().strip()
        page.wait_for_function(
            "q => document.querySelector('#prompt textarea').value === q", arg=second, timeout=10_000
        )


def test_browser_toggles_the_model_cannot_use_are_disabled_with_the_reason(demo_url, tmp_path, capsys):
    with _page(demo_url, tmp_path / "chromium") as page:
        assert page.locator("#think input[type=radio]").count() == 3
        for radio in page.locator("#think input[type=radio]").all():
            assert radio.is_disabled()
        assert page.locator("#think").get_by_text("not trained to reason step by step").is_visible()
        assert page.locator("#tools input[type=checkbox]").is_disabled()
        assert page.locator("#tools").get_by_text("has not learned to write code for the tools").is_visible()
        assert page.locator("#header").get_by_text("Answers: one word or number").is_visible()
        # Clapper without a trained module: said on the page, not only in the server log.
        assert page.locator("#compress").get_by_text("no trained Clapper").is_visible()

        # Nothing loaded: the question is answered as text-only chat, and the page says so.
        _ask(page, "What is in the video?")
        note = page.locator('#chat [data-testid="bot"]', has_text="No video or image in this conversation")
        assert note.count() == 1 and len(_bots(page)) == 2
        with capsys.disabled():
            _screenshot(page, "4-toggles-and-text-only-note.png")


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory, keye_tiny) -> Path:
    """keye-tiny's folder with a card that claims tools (weights linked, not copied): the tools toggle is live."""
    from keye.pretrained import resolve

    source = resolve("keye-tiny")
    folder = tmp_path_factory.mktemp("keye-tiny-tools")
    for f in source.iterdir():
        (folder / f.name).symlink_to(f) if f.suffix == ".safetensors" else (folder / f.name).write_bytes(
            f.read_bytes()
        )
    config = json.loads((folder / "config.json").read_text())
    config["model_card"] = {**config["model_card"], "tools": True}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_browser_tools_then_no_tools_sends_the_image_again(tools_model, tmp_path, capsys, bwrap):
    """Also the server's lifecycle: with TMPDIR pointing at an empty folder, everything it writes (the upload, the
    tool loop's folder) lives in one keye-demo-* folder, gone after SIGTERM."""
    from PIL import Image

    image = tmp_path / "sign.png"
    Image.new("RGB", (320, 240), (30, 120, 200)).save(image)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc, url = _start(["--model", str(tools_model)], tmp_path / "server.log", env={"TMPDIR": str(tmp)})
    try:
        with _page(url, tmp_path / "chromium") as page:
            page.locator("#media input[type=file]").set_input_files(str(image))
            page.locator("#tokens", has_text="vision tokens").wait_for(timeout=30_000)
            vision = int(re.search(r"\*?(\d+) vision tokens", page.locator("#tokens").inner_text()).group(1))
            assert vision > 0
            page.locator("#tools input[type=checkbox]").check()
            page.locator("#prompt textarea").fill("What number is on the sign?")
            page.locator("#send").click()
            page.locator("#stats", has_text="model turns").wait_for(timeout=120_000)
            page.locator("#tools input[type=checkbox]").uncheck()
            stats = _ask(page, "What colour is the sign?")["server_stats"]
            shown = re.search(r"prompt (\d+) tokens \((\d+) vision\)", stats)
            assert int(shown.group(2)) == vision and int(shown.group(1)) > vision  # the image went with it
            assert "sign.png" in page.locator('#chat [data-testid="user"]').last.inner_text()
            bots = " ".join(_bots(page))
            assert "no_action" not in bots and "max_rounds" not in bots  # no internal status words
            with capsys.disabled():
                _screenshot(page, "5-tools-then-chat.png")
        (work,) = tmp.iterdir()
        assert (
            work.name.startswith("keye-demo-") and any(work.rglob("sign.png")) and any(work.glob("tools-*"))
        )
    finally:
        status = _stop(proc)
    assert status == 0 and list(tmp.iterdir()) == []


def test_browser_tool_task_example_runs_the_tool_loop(tools_model, tmp_path, capsys, bwrap):
    """The tool-task button: the generated image with its question and expected answer, Tools switched on, and after
    Send the tool loop's rounds in the chat. ``KEYE_DEMO_TOOL_MODEL`` names a model trained to use the tools
    (`configs/posttrain/thyme-sft-tiny.yaml`'s export: the README's screenshot), whose code round and marked answer
    are checked; by default keye-tiny with a card that claims tools, which writes no code."""
    model = os.environ.get("KEYE_DEMO_TOOL_MODEL") or str(tools_model)
    proc, url = _start(["--model", model], tmp_path / "server.log")
    try:
        with _page(url, tmp_path / "chromium") as page:
            page.locator("#tool-example").click()
            truth = page.locator("#truth")
            truth.get_by_text("Generated example").wait_for(timeout=60_000)
            question = truth.locator("tbody tr").first.locator("td").first.inner_text().strip()
            expected = truth.locator("tbody tr").first.locator("td").nth(1).inner_text().strip()
            assert "corner" in question and page.locator("#prompt textarea").input_value() == question
            assert page.locator("#tools input[type=checkbox]").is_checked()
            page.locator("#max-new input[type=number]").fill("256")  # a code turn is ~130 tokens
            page.locator("#max-new input[type=number]").press("Enter")
            page.locator("#send").click()
            page.locator("#stats", has_text="model turns").wait_for(timeout=180_000)
            if os.environ.get("KEYE_DEMO_TOOL_MODEL"):  # a tool-trained model crops the corner, then answers
                page.locator("#chat", has_text="Round 1: code").wait_for(timeout=10_000)
                page.locator('#chat [data-testid="bot"]', has_text="expected answer is").wait_for(
                    timeout=30_000
                )
                mark = _bots(page)[-1]
                assert re.fullmatch(
                    rf"[✓✗] (Right|Wrong): the expected answer is {re.escape(expected)}\.", mark
                )
            with capsys.disabled():
                _screenshot(page, "6-tool-example.png")
    finally:
        _stop(proc)


def test_failed_starts_are_one_line_and_leave_nothing(tmp_path):
    """A busy port (checked before the model loads) and a missing model (after the work folder was made): one line
    each, and with TMPDIR pointing at an empty folder, nothing left in it."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "keye.cli", "demo", "--port", str(port)],
            capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
        )  # fmt: skip
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (
        f"keye demo: cannot listen on 127.0.0.1:{port} (in use); choose another: make demo PORT={port + 1} "
        f"(or keye demo --port {port + 1})\n"
    )
    assert list(tmp_path.iterdir()) == []
    missing = ROOT / "no-such-model"
    r = subprocess.run(
        [sys.executable, "-m", "keye.cli", "demo", "--model", str(missing), "--port", str(_free_port())],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr == (
        f"keye: error: {missing}: not a keye model folder (no config.json); use keye-tiny or a saved folder\n"
    )
    assert list(tmp_path.iterdir()) == []
