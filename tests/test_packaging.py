"""The package builds as a user's pip builds it: no setuptools warnings, keye-tiny's weights inside the wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_wheel_builds_without_warnings_and_ships_keye_tiny(tmp_path):
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info/ next to the sources
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", str(source),
         "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in (r.stdout + r.stderr).splitlines() if "Warning" in line]
    assert warnings == []
    (wheel,) = (tmp_path / "dist").glob("keye-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "keye/assets/keye-tiny.safetensors" in names
    assert {"keye/encoders/video.py", "keye/demo/app.py", "keye/serve/engine.py"} <= set(names)
