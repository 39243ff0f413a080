"""The `keye` command line as a user runs it: answers on a generated video, clear errors on bad input."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from conftest import run_keye


@pytest.fixture(scope="module")
def bad_inputs(media_dir):
    """One file per kind of bad input, each named for what is wrong with it."""
    import av

    from keye.encoders.video import write_video

    good = write_video(
        media_dir / "good.mp4", [np.full((64, 64, 3), i * 20, np.uint8) for i in range(12)], fps=8
    )
    files = {}
    files["not_a_video"] = media_dir / "notes.mp4"
    files["not_a_video"].write_text("this is a text file, not a video\n" * 50)
    files["empty"] = media_dir / "empty.mp4"
    files["empty"].write_bytes(b"")
    files["truncated"] = media_dir / "truncated.mp4"
    files["truncated"].write_bytes(good.read_bytes()[:300])
    files["audio_only"] = media_dir / "audio_only.m4a"
    with av.open(str(files["audio_only"]), "w") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    files["bad_image"] = media_dir / "broken.png"
    files["bad_image"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return files


STATS = re.compile(
    r"\[first token after ([\d.]+) s · (?:[\d.]+ tokens/s · )?(\d+) new tokens in ([\d.]+) s · "
    r"prompt (\d+) tokens \((\d+) vision\)\]"
)


@pytest.mark.slow
def test_chat_answers_about_a_generated_video_with_stats(sample_video, keye_tiny):
    started = time.perf_counter()
    r = run_keye(
        "chat", "--video", str(sample_video), "--prompt", "What is in the video?", "--max-new-tokens", "12", "--stats"
    )  # fmt: skip
    wall = time.perf_counter() - started
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0
    assert "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    ttft, new, seconds, prompt, vision = STATS.fullmatch(line).groups()
    _, processor = keye_tiny
    assert int(vision) == processor.load_video(str(sample_video)).plan.total_tokens < int(prompt)
    assert 0 < float(ttft) <= float(seconds) < wall and 1 <= int(new) <= 12


@pytest.mark.slow
def test_interactive_chat_ends_with_the_session_totals(sample_video):
    r = run_keye(
        "chat", "--video", str(sample_video), "--max-new-tokens", "4", stdin="What is it?\nAnd then?\n\n"
    )
    assert r.returncode == 0, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"\[2 turns · median first token after [\d.]+ s · (?:[\d.]+ tokens/s · )?\d+ new tokens · "
        r"conversation \d+ tokens \(\d+ vision\)\]",
        last,
    ), last


@pytest.mark.parametrize(
    "kind,flag,expect",
    [
        ("missing", "--video", "no such file"),
        ("not_a_video", "--video", "cannot open as a video"),
        ("empty", "--video", "empty"),
        ("truncated", "--video", "cannot open as a video"),
        ("audio_only", "--video", "no video stream"),
        ("bad_image", "--image", "corrupt or truncated image"),
    ],
)
def test_bad_input_exits_2_naming_the_file(bad_inputs, media_dir, kind, flag, expect):
    path = media_dir / "does_not_exist.mp4" if kind == "missing" else bad_inputs[kind]
    r = run_keye("chat", flag, str(path), "--prompt", "hi")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert path.name in r.stderr and expect in r.stderr.lower()
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback(media_dir):
    r = run_keye("--debug", "chat", "--video", str(media_dir / "nope.mp4"), "--prompt", "hi")
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.slow
def test_over_long_prompt_exits_2(sample_video):
    r = run_keye("chat", "--video", str(sample_video), "--prompt", "word " * 9000)
    assert r.returncode == 2 and "sample.mp4" in r.stderr and "context" in r.stderr


def test_info_reports_environment():
    r = run_keye("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["attention"] in ("sdpa", "flash_attention_2")
    assert info["default_model"] == "keye-tiny" and "keye-tiny" in info["keye_tiny_cache"]


def test_help_lists_subcommands():
    r = run_keye("--help")
    assert r.returncode == 0
    for cmd in ("chat", "info", "convert"):
        assert cmd in r.stdout


def test_frames_json_contract(sample_video, tmp_path):
    r = run_keye("frames", str(sample_video), "--json", "--plot", str(tmp_path / "strip.png"))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report) == {
        "video",
        "duration",
        "native_fps",
        "sample_fps",
        "frames",
        "slow_tokens_per_frame",
        "fast_tokens_per_frame",
        "total_tokens",
        "budget",
        "compress",
        "tokens_after_compression",
        "settings",
    }
    # without --model: Keye-VL-1.5's official settings, as keye-vl-utils applies them
    assert report["settings"]["source"] == "official" and report["settings"]["budget_rule"] == "reference"
    assert report["settings"]["token_budget"] == report["budget"] == 65536
    assert report["frames"][0]["kind"] == "slow" and set(report["frames"][0]) == {
        "index",
        "time",
        "kind",
        "tokens",
    }
    assert report["total_tokens"] == sum(f["tokens"] for f in report["frames"]) <= report["budget"]
    assert report["tokens_after_compression"] == report["total_tokens"] and report["compress"] == "none"
    assert (tmp_path / "strip.png").stat().st_size > 1000


def test_frames_model_shows_that_models_processor_plan(keye_tiny, sample_video):
    """`keye frames --model keye-tiny` is exactly the plan keye-tiny's processor makes for the same video."""
    _, processor = keye_tiny
    r = run_keye("frames", str(sample_video), "--model", "keye-tiny", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    settings = report.pop("settings")
    assert report == processor.load_video(str(sample_video)).plan.to_dict()
    assert (
        settings["source"] == "keye-tiny"
        and settings["max_frames"] == 16
        and settings["token_budget"] == 1024
    )
    official = json.loads(run_keye("frames", str(sample_video), "--json").stdout)
    assert official["budget"] == 65536 != report["budget"]  # the default is not keye-tiny's plan


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dyntok", "clapper"])
def test_frames_compress_a_video_longer_than_the_context(keye_tiny, long_video, method):
    """More vision tokens than keye-tiny's 8,192-token context: no prompt is built, so the report still works."""
    r = run_keye("frames", str(long_video), "--json", "--compress", method)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["total_tokens"] > keye_tiny[1].settings.max_length
    assert report["compress"] == method and 0 < report["tokens_after_compression"] < report["total_tokens"]


@pytest.fixture(scope="module")
def long_video(media_dir):
    """30 s of 448x448 panning texture: with the official settings, ~60 frames of up to 256 tokens."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location(
        "slowfast_videos", ROOT / "bench/baselines/slowfast_videos.py"
    )
    videos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(videos)
    scenes = [
        {"type": "pan", "duration": 15.0, "speed": 40.0},
        {"type": "blocks", "duration": 15.0, "square": 96},
    ]
    return videos.write(
        {"height": 448, "width": 448, "fps": 10, "seed": 1, "scenes": scenes}, media_dir / "long.mp4"
    )


@pytest.mark.parametrize(
    "kind,expect",
    [
        ("missing", "no such file"),
        ("not_a_video", "cannot open as a video"),
        ("empty", "empty file"),
        ("truncated", "cannot open as a video"),
        ("audio_only", "no video stream"),
        ("directory", "is a directory"),
    ],
)
@pytest.mark.parametrize("compress", ["none", "dyntok"])
def test_frames_bad_input_is_one_line_naming_the_file(bad_inputs, media_dir, kind, expect, compress):
    path = {"missing": media_dir / "does_not_exist.mp4", "directory": media_dir}.get(kind) or bad_inputs[kind]
    r = run_keye("frames", str(path), "--compress", compress)
    assert r.returncode == 2, (r.returncode, r.stderr)
    line = r.stderr.strip()
    assert line.startswith(f"keye: error: {path}: ") and expect in line
    assert "\n" not in line and len(line) < len(str(path)) + 120, line


@pytest.mark.slow
def test_frames_dyntok_reports_fewer_tokens(sample_video):
    r = run_keye("frames", str(sample_video), "--json", "--compress", "dyntok")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["compress"] == "dyntok" and 0 < report["tokens_after_compression"] < report["total_tokens"]


def test_frames_flags_come_from_the_slowfast_config(sample_video):
    """Every SlowFastConfig field is a flag of `keye frames` (generated, not re-listed); the ones given replace the
    settings in force and show in the JSON's ``settings``."""
    from dataclasses import fields

    from keye.cli import build_parser
    from keye.encoders.slowfast import SlowFastConfig

    help_text = build_parser()._subparsers._group_actions[0].choices["frames"].format_help()
    for f in fields(SlowFastConfig):
        flag = "--slowfast" if f.name == "enabled" else "--" + f.name.replace("_", "-")
        assert flag in help_text, flag
    r = run_keye(
        "frames", str(sample_video), "--json", "--no-slowfast", "--min-tokens", "16", "--model", "keye-tiny"
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["settings"]["enabled"] is False and report["settings"]["min_tokens"] == 16
    assert report["settings"]["max_frames"] == 16  # the rest: keye-tiny's own settings
    assert {f["kind"] for f in report["frames"]} == {"slow"}
