"""The suite's own guard (`conftest.pytest_sessionfinish`): a test run that leaves a file in the checkout fails,
naming it. Run here on a one-test session that writes into ``outputs/`` (ignored by git, so only a check that
includes ignored files sees it)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from conftest import ROOT


def test_a_run_that_writes_into_the_checkout_fails(tmp_path):
    probe = ROOT / "outputs" / f"guard-probe-{uuid.uuid4().hex[:8]}.txt"
    had_outputs = probe.parent.exists()
    test = tmp_path / "test_writes.py"
    test.write_text(
        "from pathlib import Path\n\n"
        "def test_writes():\n"
        f"    Path({str(probe)!r}).parent.mkdir(parents=True, exist_ok=True)\n"
        f"    Path({str(probe)!r}).write_text('x')\n"
    )
    clean = tmp_path / "test_clean.py"
    clean.write_text("def test_nothing():\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "conftest",
        "--rootdir",
        str(tmp_path),
    ]
    try:
        dirty = subprocess.run(
            [*command, str(test)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
        )
    finally:
        probe.unlink(missing_ok=True)
        if not had_outputs and probe.parent.exists():
            probe.parent.rmdir()
    assert dirty.returncode == 1, dirty.stdout + dirty.stderr
    assert "1 passed" in dirty.stdout  # the test itself passed; the guard failed the run
    assert f"the test run wrote into the checkout {ROOT}" in dirty.stderr
    assert str(probe.relative_to(ROOT)) in dirty.stderr
    ok = subprocess.run(
        [*command, str(clean)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
