"""The `keye` command line as a user runs it: answers on a generated video, clear errors on bad input."""

from __future__ import annotations

import json

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


@pytest.mark.slow
def test_chat_answers_about_a_generated_video(sample_video):
    r = run_keye(
        "chat", "--video", str(sample_video), "--prompt", "What is in the video?", "--max-new-tokens", "12"
    )
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "kind,flag,expect",
    [
        ("missing", "--video", "no such file"),
        ("not_a_video", "--video", ""),
        ("empty", "--video", "empty"),
        ("truncated", "--video", ""),
        ("audio_only", "--video", "no video stream"),
        ("bad_image", "--image", ""),
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
    }
    assert report["frames"][0]["kind"] == "slow" and set(report["frames"][0]) == {
        "index",
        "time",
        "kind",
        "tokens",
    }
    assert report["total_tokens"] == sum(f["tokens"] for f in report["frames"]) <= report["budget"]
    assert report["tokens_after_compression"] == report["total_tokens"] and report["compress"] == "none"
    assert (tmp_path / "strip.png").stat().st_size > 1000


def test_frames_bad_input_exits_2(bad_inputs):
    r = run_keye("frames", str(bad_inputs["audio_only"]))
    assert r.returncode == 2 and "audio_only.m4a" in r.stderr


@pytest.mark.slow
def test_frames_dyntok_reports_fewer_tokens(sample_video):
    r = run_keye("frames", str(sample_video), "--json", "--compress", "dyntok")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["compress"] == "dyntok" and 0 < report["tokens_after_compression"] < report["total_tokens"]
