"""Import contract: the model stack (torch, transformers) loads only where a command needs it.

Each check runs a fresh interpreter, as a user's command does, and reads ``sys.modules`` at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

HEAVY = ("torch", "transformers")


def loaded_after(code: str) -> dict[str, bool]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import keye",
        "import keye.encoders",
        "from keye.encoders import COMPRESSIONS",
        "import sys; sys.argv = ['keye', '--help']\nfrom keye.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass",
    ],
    ids=["keye", "keye.encoders", "compressions", "keye --help"],
)
def test_light_imports_load_no_model_stack(code):
    assert loaded_after(code) == {m: False for m in HEAVY}


def _cli(*argv: str) -> str:
    """Code that runs ``keye ARGV...`` in-process (exit status ignored: the imports are what is checked)."""
    return f"import sys; sys.argv = ['keye', *{list(argv)!r}]\nfrom keye.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass"


def test_decoding_planning_and_tools_load_no_model_stack(tmp_path):
    import numpy as np
    from PIL import Image

    from keye.encoders.video import write_video

    clip = write_video(
        tmp_path / "clip.mp4", [np.full((56, 84, 3), 10 * i, np.uint8) for i in range(20)], fps=10
    )
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "snippet.py").write_text("print(image_path)\n")
    for code in (
        "import keye.encoders.video, keye.encoders.slowfast, keye.encoders.image, keye.settings, keye.errors",
        f"from keye.encoders.slowfast import plan_video\nplan_video({str(clip)!r})",
        _cli("frames", str(clip), "--json"),
        _cli("frames", str(clip), "--model", "keye-tiny", "--plot", str(tmp_path / "strip.png")),
        _cli("tools", "run", "--code", str(tmp_path / "snippet.py"), "--image", str(tmp_path / "red.png")),
    ):
        assert loaded_after(code) == {m: False for m in HEAVY}, code
    assert (tmp_path / "strip.png").stat().st_size > 0  # the commands above really ran


def test_the_public_names_load_the_model_stack_and_register_auto_classes():
    loaded = loaded_after(
        "import keye\nfrom transformers import AutoConfig\n"
        "config_class = keye.KeyeConfig  # first use: loads keye.configuration, which registers it\n"
        "assert type(AutoConfig.for_model('keye')) is config_class"
    )
    assert loaded == {m: True for m in HEAVY}  # the probe itself is not vacuous
