"""Shared fixtures: tiny random Keye models, the embedded keye-tiny, generated media."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(
    qk_norm: bool = True, tie: bool = False, packing: int = 0, vocab: int = 256, tps: float | None = 2.0
):
    """A random-weight Keye config small enough for unit tests (`keye.training.testing.tiny_config`)."""
    from keye.training.testing import tiny_config as make

    return make(vocab, qk_norm=qk_norm, tie=tie, packing=packing, tokens_per_second=tps)


def true_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` of every run of True in a 1D boolean tensor."""
    runs, start = [], None
    for i, on in enumerate([*mask.tolist(), False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    return runs


def checkout_status() -> set[str]:
    """Every file ``git status`` lists in the checkout, ignored ones included (``outputs/...``, ``artifacts/...``),
    except the virtual environments, tool caches (ruff, pytest) and Python's bytecode; empty outside a checkout."""
    import subprocess

    excluded = [f":(exclude){p}" for p in (".venv", ".venv-*", ".ruff_cache", ".pytest_cache")]
    command = ["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "--", ".", *excluded]
    try:
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {line for line in out.splitlines() if "__pycache__" not in line and not line.endswith(".pyc")}


def pytest_sessionstart(session):
    session.config._keye_checkout = checkout_status()


def pytest_sessionfinish(session, exitstatus):
    """The suite leaves the checkout as it found it: every output goes under pytest's temporary folders. A file
    or folder that appeared (or changed) during the run fails the run, named."""
    before = getattr(session.config, "_keye_checkout", None)
    if before is None:
        return
    new = sorted(checkout_status() - before)
    if new:
        print(f"\nthe test run wrote into the checkout {ROOT}: {', '.join(new)}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_system_tool(name: str, hint: str) -> str:
    """The path of system program ``name``. One rule for every such tool a test needs (bubblewrap, Chromium): when
    it is missing the test fails under CI (``CI=true``: `make setup` must have installed it) and is skipped elsewhere,
    with the reason (``pytest -ra`` prints it)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed: {hint}"
        if under_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture
def bwrap() -> str:
    """bubblewrap, which the Thyme sandbox isolates snippets with."""
    return require_system_tool("bwrap", "apt-get install -y bubblewrap (make setup does)")


@pytest.fixture(scope="session", autouse=True)
def keye_home(tmp_path_factory) -> Path:
    """Every test's outputs stay under pytest's temporary folders: keye-tiny's cache ($KEYE_HOME, built once per
    session), the browser test's screenshots ($KEYE_ARTIFACTS), and every other temporary file ($TMPDIR: torchrun's
    rendezvous folders, gradio_client's downloads, ``tempfile`` in tests and servers). Torch's persistent compile
    cache, which importing transformers' models creates as ``$TMPDIR/torchinductor_<user>``, gets a folder of its own
    ($TORCHINDUCTOR_CACHE_DIR), so a test that watches a temporary folder sees only what keye leaves there, whatever
    ran before it. Subprocesses inherit all of them."""
    import tempfile

    home = tmp_path_factory.mktemp("keye-home")
    names = ("KEYE_HOME", "KEYE_ARTIFACTS", "TMPDIR", "TORCHINDUCTOR_CACHE_DIR")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["KEYE_HOME"] = str(home)
    os.environ["KEYE_ARTIFACTS"] = str(tmp_path_factory.mktemp("artifacts"))
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmp"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("torchinductor"))
    tempfile.tempdir = None  # read TMPDIR again
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    tempfile.tempdir = None


@pytest.fixture
def tiny_model():
    from keye.modeling import KeyeForConditionalGeneration

    def make(**kw):
        torch.manual_seed(0)
        return KeyeForConditionalGeneration(tiny_config(**kw)).eval()

    return make


@pytest.fixture(scope="session")
def keye_tiny():
    """The embedded default model (built once into $KEYE_HOME, then loaded from there)."""
    from keye import load_pretrained

    return load_pretrained("keye-tiny")


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def sample_video(media_dir) -> Path:
    """A 4 s, 112x160 synthetic clip with moving shapes and scene cuts."""
    from keye.synthetic import make_demo_video

    path = media_dir / "sample.mp4"
    make_demo_video(path, seed=3, duration=4.0, size=(112, 160), fps=8, scene_seconds=2.0)
    return path


def run_keye(*args: str, timeout: float = 300, env: dict | None = None, stdin: str | None = None):
    """Run the `keye` CLI in a subprocess (as a user would, ``stdin`` typed in); returns the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "keye.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
