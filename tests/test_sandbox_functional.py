"""What Thyme-style snippets do, through the sandbox: exact pixels and numbers on a generated image.

Also: repairs applied and reported, output-image caps, the CLI's exit codes and JSON, thread safety, and that
`keye.tools` stays free of torch/transformers. Needs bubblewrap, like the security tests.
"""

from __future__ import annotations

import ast
import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from keye.tools import SandboxConfig, format_sandbox_output, isolation_report, run_snippet

REPORT = isolation_report()
# Without bubblewrap: skipped, or failed under CI (conftest.require_system_tool); an installed but failing bwrap
# makes these tests fail.
pytestmark = pytest.mark.usefixtures("bwrap")
H, W = 48, 64


def _pattern() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x * 4, y * 5, (x * 7 + y * 3) % 256], axis=-1).astype(np.uint8)  # (H, W, 3)


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "scene.png"
    Image.fromarray(_pattern()).save(path)
    return path


def _run(code: str, images, tmp_path: Path, **cfg):
    return run_snippet(code, images, config=SandboxConfig(**cfg), out_dir=tmp_path / "out")


def _load(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_crop(image, tmp_path):
    code = """
from PIL import Image
img = Image.open(image_path)
crop = img.crop((10, 5, 30, 25))
crop.save("crop.png")
print("size", crop.size)
"""
    r = _run(code, [image], tmp_path)
    assert r.ok, r.stderr
    assert r.stdout.strip() == "size (20, 20)"
    assert [Path(p).name for p in r.images] == ["crop.png"]
    np.testing.assert_array_equal(_load(r.images[0]), _pattern()[5:25, 10:30])


def test_rotate(image, tmp_path):
    code = "from PIL import Image\nImage.open(image_path).rotate(90, expand=True).save('rot.png')\n"
    r = _run(code, [image], tmp_path)
    assert r.ok, r.stderr
    np.testing.assert_array_equal(_load(r.images[0]), np.rot90(_pattern()))  # both counter-clockwise


def test_contrast(image, tmp_path):
    code = """
from PIL import Image, ImageEnhance
ImageEnhance.Contrast(Image.open(image_path)).enhance(1.8).save("contrast.png")
import numpy as np
a = np.asarray(Image.open(image_path)).astype(np.float32)
np.save("unused.npy", a)  # non-image files are not returned
stretched = np.clip((a - a.mean()) * 2 + a.mean(), 0, 255).astype(np.uint8)
Image.fromarray(stretched).save("stretched.png")
"""
    r = _run(code, [image], tmp_path)
    assert r.ok, r.stderr
    names = [Path(p).name for p in r.images]
    assert names == ["contrast.png", "stretched.png"]
    expected = np.asarray(ImageEnhance.Contrast(Image.fromarray(_pattern())).enhance(1.8))
    np.testing.assert_array_equal(_load(r.images[0]), expected)
    a = _pattern().astype(np.float32)
    np.testing.assert_array_equal(
        _load(r.images[1]), np.clip((a - a.mean()) * 2 + a.mean(), 0, 255).astype(np.uint8)
    )


def test_zoom(image, tmp_path):
    code = """
from PIL import Image
img = Image.open(image_path)
region = img.crop((8, 8, 24, 20))
region.resize((region.width * 4, region.height * 4), Image.NEAREST).save("zoom.jpg", quality=100)
region.resize((region.width * 4, region.height * 4), Image.NEAREST).save("zoom.png")
"""
    r = _run(code, [image], tmp_path)
    assert r.ok, r.stderr
    zoom_jpg, zoom_png = sorted(r.images)
    expected = np.repeat(np.repeat(_pattern()[8:20, 8:24], 4, axis=0), 4, axis=1)
    np.testing.assert_array_equal(_load(zoom_png), expected)
    assert _load(zoom_jpg).shape == expected.shape  # JPEG is lossy: shape only


def test_numeric_computation(image, tmp_path):
    code = """
import numpy as np
from PIL import Image
a = np.asarray(Image.open(image_path)).astype(np.int64)
print(int(a[..., 0].sum()), int((a[..., 1] > 100).sum()), round(float(a[..., 2].mean()), 6))
print(sum(i * i for i in range(1000)))
"""
    r = _run(code, [image], tmp_path)
    assert r.ok, r.stderr
    a = _pattern().astype(np.int64)
    first, second = r.stdout.splitlines()
    assert (
        first == f"{int(a[..., 0].sum())} {int((a[..., 1] > 100).sum())} {round(float(a[..., 2].mean()), 6)}"
    )
    assert int(second) == sum(i * i for i in range(1000))
    assert r.images == [] and r.error is None and r.killed_by is None


def test_several_inputs_and_thyme_output_dir(image, tmp_path):
    second = tmp_path / "other.jpg"
    Image.new("RGB", (10, 6), (0, 0, 255)).save(second)
    code = """
from PIL import Image
print(len(image_paths), image_paths[0] == image_path)
print(Image.open(image_paths[1]).size)
Image.open(image_paths[1]).save("/mnt/data/temp_processed_images/processed.png")
Image.open(image_path).save("/tmp/from_tmp.png")
"""
    r = _run(code, [image, second], tmp_path)
    assert r.ok, r.stderr
    assert r.stdout.splitlines() == ["2 True", "(10, 6)"]
    assert sorted(Path(p).name for p in r.images) == ["from_tmp.png", "processed.png"]


def test_repairs_are_applied_and_reported(image, tmp_path):
    code = """
img = Image.open(img_path)
arr = np.array(img)
print(arr.shape, round(math.sqrt(16)))
other = Image.open("input.png")
image_path = "/path/to/your/image.jpg"
ImageOps.mirror(Image.open(image_path)).save("mirror.png")
"""
    r = _run(code, [image], tmp_path)
    assert r.ok, (r.stderr, r.code)
    assert r.stdout.strip() == f"({H}, {W}, 3) 4"
    text = "\n".join(r.repairs)
    for expected in ("import numpy as np", "from PIL import Image", "import math", "from PIL import ImageOps",
                     "img_path = image_path", "'input.png' -> image_path", "'/path/to/your/image.jpg'"):  # fmt: skip
        assert expected in text, text
    np.testing.assert_array_equal(_load(r.images[0]), _pattern()[:, ::-1])
    # With repair off, the same code fails on the first missing name.
    r = _run(code, [image], tmp_path, repair=False)
    assert not r.ok and r.error.startswith("NameError") and r.repairs == []


def test_cv2_is_missing_with_a_clear_error(image, tmp_path):
    r = _run("import cv2\nimg = cv2.imread(image_path)\n", [image], tmp_path)
    assert not r.ok
    assert r.error.startswith("ModuleNotFoundError") and "OpenCV is not installed" in r.error
    assert r.killed_by is None


def test_errors_are_reported_with_their_line(image, tmp_path):
    r = _run("x = 1\ny = (\n", [image], tmp_path, repair=False)
    assert not r.ok and r.error.startswith("SyntaxError") and "(line 2)" in r.error
    r = _run("a = 1\nb = [1, 2][5]\n", [image], tmp_path)
    assert r.error == "IndexError: list index out of range (line 2)"
    assert 'File "<snippet>", line 2' in r.stderr and "b = [1, 2][5]" in r.stderr
    r = _run("import sys\nprint('partial')\nsys.exit(3)\n", [image], tmp_path)
    assert r.error == "SystemExit: 3" and r.stdout == "partial\n"
    r = _run("import sys\nsys.exit(0)\n", [image], tmp_path)
    assert r.ok


def test_output_image_caps(image, tmp_path):
    code = """
from PIL import Image
import time
for i in range(10):
    Image.new("RGB", (8, 8), (i, 0, 0)).save(f"img{i}.png")
    time.sleep(0.01)
Image.new("L", (5000, 10)).save("wide.png")
"""
    r = _run(code, [image], tmp_path)
    assert r.ok, r.stderr
    assert [Path(p).name for p in r.images] == [f"img{i}.png" for i in range(8)]  # in save order
    assert sum("more than 8 images" in w for w in r.warnings) == 2
    assert any(w.startswith("wide.png: 5000x10") for w in r.warnings)
    r = _run(code, [image], tmp_path, max_images=2, max_image_side=6000)
    assert len(r.images) == 2


def test_stdout_is_truncated_not_killed(image, tmp_path):
    r = _run("print('y' * 200_000)\nprint('done')\n", [image], tmp_path)
    assert r.ok and r.killed_by is None
    assert r.stdout_truncated and len(r.stdout) == 64 << 10
    assert any(w.startswith("stdout: kept the first 65536") for w in r.warnings)
    reply = format_sandbox_output(r)
    assert reply.startswith("<sandbox_output>") and "characters cut" in reply


def test_images_outlive_the_call_and_never_overwrite(image, tmp_path):
    code = "from PIL import Image\nImage.open(image_path).save('same.png')\n"
    first = _run(code, [image], tmp_path)
    second = _run(code, [image], tmp_path)
    assert [Path(p).name for p in first.images + second.images] == ["same.png", "same-1.png"]
    assert all(Path(p).is_file() for p in first.images + second.images)
    r = run_snippet(code, [image])  # no out_dir: a fresh temporary folder that stays
    assert Path(r.images[0]).is_file() and Path(r.images[0]).parent.name.startswith("keye-tools-out-")
    Path(r.images[0]).unlink()
    Path(r.images[0]).parent.rmdir()


def test_missing_input_image_names_the_file(tmp_path):
    from keye.errors import ImageLoadError

    with pytest.raises(ImageLoadError, match="nope.png: no such file"):
        run_snippet("print(1)", [tmp_path / "nope.png"])


def test_concurrent_calls_from_threads(image, tmp_path):
    code = "import numpy as np\nfrom PIL import Image\nprint(np.asarray(Image.open(image_path)).shape)\n"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: run_snippet(code, [image]), range(6)))
    assert all(r.ok and r.stdout.strip() == f"({H}, {W}, 3)" for r in results)


def test_json_result_fields(image, tmp_path):
    r = _run("print('hi')", [image], tmp_path)
    d = json.loads(json.dumps(r.to_dict()))
    assert {"ok", "stdout", "stderr", "images", "error", "elapsed_s", "killed_by"} <= set(d)
    assert d["ok"] is True and d["killed_by"] is None and d["isolation"].startswith("bwrap")


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from keye.tools.cli import main

    code = main(["tools", "run", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_exit_codes_and_json(image, tmp_path, capsys):
    good = tmp_path / "good.py"
    good.write_text(
        "from PIL import Image\nImage.open(image_path).crop((0, 0, 4, 4)).save('c.png')\nprint('ok')\n"
    )
    rc, out, _ = _cli(
        capsys, "--code", str(good), "--image", str(image), "--out", str(tmp_path / "o"), "--json"
    )
    assert rc == 0
    d = json.loads(out)
    assert d["ok"] and d["stdout"] == "ok\n" and Path(d["images"][0]).parent == tmp_path / "o"

    turn = tmp_path / "turn.txt"  # a model turn: its first code block runs
    turn.write_text("<think>crop it</think>\n<code>\n```python\nprint(1 + 1)\n```\n</code>")
    rc, out, _ = _cli(capsys, "--code", str(turn), "--image", str(image))
    assert rc == 0 and "--- stdout ---\n2\n" in out, out

    bad = tmp_path / "bad.py"
    bad.write_text("raise ValueError('boom')\n")
    rc, out, _ = _cli(capsys, "--code", str(bad), "--image", str(image), "--timeout", "5")
    assert rc == 1 and "FAILED: ValueError: boom (line 1)" in out

    rc, out, err = _cli(capsys, "--code", str(tmp_path / "missing.py"), "--image", str(image))
    assert rc == 2 and out == "" and err.strip().endswith("missing.py: no such file")
    assert len(err.strip().splitlines()) == 1
    rc, _, err = _cli(capsys, "--code", str(good), "--image", str(tmp_path / "missing.png"))
    assert rc == 2 and "missing.png: no such file" in err
    rc, _, err = _cli(capsys, "--code", str(good), "--image", str(image), "--timeout", "-1")
    assert rc == 2 and "timeout_s" in err


def test_add_parser_wires_into_a_parent_cli(image, tmp_path, capsys):
    import argparse

    from keye.tools.cli import add_parser

    parser = argparse.ArgumentParser(prog="keye")
    add_parser(parser.add_subparsers(dest="command"))
    code = tmp_path / "c.py"
    code.write_text("print(40 + 2)\n")
    args = parser.parse_args(["tools", "run", "--code", str(code), "--image", str(image), "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["stdout"] == "42\n"


def test_tools_package_does_not_import_torch():
    # Statically: no import of torch/transformers anywhere in keye/tools (PIL only inside functions).
    import keye.tools

    for path in Path(keye.tools.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in {"torch", "transformers"} for n in names), path
        for node in tree.body:  # module level
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert (mod or "").split(".")[0] not in {"PIL", "numpy"}, path
    # At run time: importing keye.tools adds none of them (whatever `import keye` itself loads).
    code = (
        "import sys, keye; before = set(sys.modules)\n"
        "import keye.tools, keye.tools.cli, keye.tools.sandbox, keye.tools.protocol, keye.tools.repair\n"
        "new = set(sys.modules) - before\n"
        "print(sorted(m for m in new if m.split('.')[0] in {'torch', 'transformers', 'numpy', 'PIL'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
