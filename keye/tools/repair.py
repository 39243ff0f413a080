"""Repair common slips in model-written snippets before they run, as Thyme does, and say what changed.

Repairs, each reported as one human-readable line:

- indentation: a block indented as a whole (or a first line indented unlike the rest) is dedented;
- missing imports: ``np``, ``numpy``, ``Image`` / ``ImageOps`` / ``ImageEnhance`` / ... , ``PIL.X``, ``math``,
  ``cv2``, ``os`` and ``plt`` used but never bound get their usual import at the top;
- wrong image path: the sandbox gives the inputs as ``image_path`` / ``image_paths``. A string literal opened as
  an image (``Image.open("image.jpg")``, ``cv2.imread("input.png")``, or a variable assigned such a literal),
  an ``image_path = "..."`` assignment that would hide the real path, or an opened variable that is never set
  (``img_path``) are mapped to the sandbox's path. A literal whose file name matches an input image maps to that
  image; anything else maps to the first image. Paths the snippet itself saves (``.save("crop.png")``) are left
  alone, so reopening a saved crop keeps working.

Edits are spliced into the original text at the AST node positions, so everything else (comments, formatting)
is kept. Code that does not parse is returned unchanged: the sandbox reports the SyntaxError to the model.
This module is not a security boundary; the sandbox is.
"""

from __future__ import annotations

import ast
import os
import textwrap
from collections.abc import Sequence

__all__ = ["IMPORT_FIXES", "repair_code"]

# Name used but never bound -> the import that binds it.
IMPORT_FIXES: dict[str, str] = {
    "np": "import numpy as np",
    "numpy": "import numpy",
    "Image": "from PIL import Image",
    "ImageOps": "from PIL import ImageOps",
    "ImageEnhance": "from PIL import ImageEnhance",
    "ImageFilter": "from PIL import ImageFilter",
    "ImageDraw": "from PIL import ImageDraw",
    "ImageFont": "from PIL import ImageFont",
    "ImageChops": "from PIL import ImageChops",
    "ImageStat": "from PIL import ImageStat",
    "ImageColor": "from PIL import ImageColor",
    "math": "import math",
    "cv2": "import cv2",
    "os": "import os",
    "plt": "import matplotlib.pyplot as plt",
}
# Globals the sandbox defines for every snippet.
SANDBOX_GLOBALS = frozenset({"image_path", "image_paths", "temp_output_dir"})
_READERS = {"open", "imread"}  # Image.open(path), cv2/plt/imageio.imread(path)
_WRITERS = {"save", "imwrite", "imsave", "savefig"}
_PATH_KEYWORDS = {"fp", "filename", "fname", "uri", "path"}


def _fix_indentation(code: str) -> tuple[str, str | None]:
    """Code that parses, and a repair note if it had to be dedented (else the input and None)."""
    try:
        ast.parse(code)
        return code, None
    except SyntaxError:
        pass
    candidates = [textwrap.dedent(code)]
    lines = code.splitlines(keepends=True)
    nonblank = [i for i, line in enumerate(lines) if line.strip()]
    if len(nonblank) >= 2:  # first line indented unlike the second (Thyme's align_first_line_to_second case)
        first, second = lines[nonblank[0]], lines[nonblank[1]]
        indent = second[: len(second) - len(second.lstrip())]
        fixed = list(lines)
        fixed[nonblank[0]] = indent + first.lstrip()
        candidates.append(textwrap.dedent("".join(fixed)))
    for candidate in candidates:
        try:
            ast.parse(candidate)
        except SyntaxError:
            continue
        return candidate, "fixed the indentation of the code block"
    return code, None


def _path_arg(call: ast.Call) -> ast.expr | None:
    if call.args:
        return call.args[0]
    for kw in call.keywords:
        if kw.arg in _PATH_KEYWORDS:
            return kw.value
    return None


def _call_kind(call: ast.Call) -> str | None:
    """'read' for Image.open / *.imread, 'write' for *.save / imwrite / imsave / savefig, else None."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name in _WRITERS:
        return "write"
    if name == "imread":
        return "read"
    if name == "open" and isinstance(func, ast.Attribute):  # Image.open or PIL.Image.open, not builtins.open
        base = func.value
        if (isinstance(base, ast.Name) and base.id == "Image") or (
            isinstance(base, ast.Attribute) and base.attr == "Image"
        ):
            return "read"
    return None


def _is_str(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def repair_code(code: str, image_names: Sequence[str] = ()) -> tuple[str, list[str]]:
    """Return ``(repaired_code, repairs)``; `repairs` lists what changed, empty when nothing did.

    `image_names` are the file names of the sandbox's input images, in order (``image_paths[k]`` ends with
    ``image_names[k]``); with no images the image-path repairs are skipped.
    """
    repairs: list[str] = []
    code, note = _fix_indentation(code)
    if note:
        repairs.append(note)
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code, repairs

    bound: set[str] = set()
    used: set[str] = set()
    pil_attrs: set[str] = set()
    star_import = False
    assigns: dict[str, list[ast.Constant]] = {}
    calls: list[tuple[str, ast.Call]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.Import):
            bound.update(a.asname or a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            star_import |= any(a.name == "*" for a in node.names)
            bound.update(a.asname or a.name for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "PIL":
            pil_attrs.add(node.attr)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and _is_str(node.value):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    assigns.setdefault(t.id, []).append(node.value)  # type: ignore[arg-type]
        elif isinstance(node, ast.Call):
            kind = _call_kind(node)
            if kind:
                calls.append((kind, node))

    # --- missing imports --------------------------------------------------------------------------------------
    header: list[str] = []
    if not star_import:
        for name, line in IMPORT_FIXES.items():
            if name in used and name not in bound:
                header.append(line)
                repairs.append(f"added `{line}` ({name} was used but never imported)")
        if "PIL" in used and "PIL" not in bound:
            subs = sorted(a for a in pil_attrs if a.startswith("Image"))
            for line in [f"import PIL.{a}" for a in subs] or ["import PIL"]:
                header.append(line)
                repairs.append(f"added `{line}` (PIL was used but never imported)")

    # --- image paths ------------------------------------------------------------------------------------------
    edits: dict[int, tuple[ast.AST, str]] = {}  # id(node) -> (node, replacement source)
    if image_names:
        inputs = {f"/inputs/{n}" for n in image_names}

        def ref(literal: str, *, first_by_index: bool) -> str:
            base = os.path.basename(literal)
            k = image_names.index(base) if base in image_names else 0
            return f"image_paths[{k}]" if (k or first_by_index) else "image_path"

        outputs: set[str] = set()
        for kind, call in calls:
            arg = _path_arg(call)
            if kind == "write" and _is_str(arg):
                outputs.add(arg.value)  # type: ignore[union-attr]
            elif kind == "write" and isinstance(arg, ast.Name):
                outputs.update(c.value for c in assigns.get(arg.id, []))

        def replace(const: ast.Constant, replacement: str, why: str) -> None:
            if id(const) not in edits:
                edits[id(const)] = (const, replacement)
                repairs.append(f"line {const.lineno}: {why} {const.value!r} -> {replacement}")

        def wrong(literal: str) -> bool:
            return literal not in outputs and literal not in inputs

        aliases: list[str] = []
        for kind, call in calls:
            arg = _path_arg(call)
            if kind != "read" or arg is None:
                continue
            if _is_str(arg) and wrong(arg.value):  # type: ignore[union-attr]
                replace(arg, ref(arg.value, first_by_index=False), "opened a path the sandbox does not have:")  # type: ignore[arg-type,union-attr]
            elif isinstance(arg, ast.Name) and arg.id not in SANDBOX_GLOBALS:
                if arg.id not in bound and arg.id not in aliases and arg.id not in IMPORT_FIXES:
                    aliases.append(arg.id)
                for const in assigns.get(arg.id, []):
                    if wrong(const.value):
                        replace(const, ref(const.value, first_by_index=False), f"{arg.id} was set to")
        for const in assigns.get("image_path", []):
            if wrong(const.value):
                replace(const, ref(const.value, first_by_index=True), "image_path was overwritten with")
        for name in aliases:
            header.append(f"{name} = image_path")
            repairs.append(f"{name} was opened as an image but never set; set {name} = image_path")

    if not header and not edits:
        return code, repairs
    return _splice(code, tree, header, list(edits.values())), repairs


def _splice(code: str, tree: ast.Module, header: list[str], edits: list[tuple[ast.AST, str]]) -> str:
    """Apply node replacements and insert `header` lines before the first statement (after __future__)."""
    data = code.encode("utf-8")
    starts = [0]  # byte offset of each line (AST columns are UTF-8 byte offsets)
    for line in data.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def offset(lineno: int, col: int) -> int:
        return starts[lineno - 1] + col

    spans: list[tuple[int, int, bytes]] = []
    for node, text in edits:
        spans.append(
            (
                offset(node.lineno, node.col_offset),
                offset(node.end_lineno, node.end_col_offset),
                text.encode(),
            )  # type: ignore[arg-type]
        )
    if header:
        body = tree.body
        i = 0
        if body and isinstance(body[0], ast.Expr) and _is_str(body[0].value):  # module docstring
            i = 1
        while i < len(body) and isinstance(body[i], ast.ImportFrom) and body[i].module == "__future__":  # type: ignore[union-attr]
            i += 1
        if i < len(body):
            at = offset(body[i].lineno, 0)
        else:  # only a docstring / __future__ imports: append
            at = len(data)
        block = "\n".join(header) + "\n"
        if at == len(data) and data and not data.endswith(b"\n"):
            block = "\n" + block
        spans.append((at, at, block.encode()))
    for start, end, text in sorted(spans, key=lambda s: (s[0], s[1]), reverse=True):
        data = data[:start] + text + data[end:]
    return data.decode("utf-8")
