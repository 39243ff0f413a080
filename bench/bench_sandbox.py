"""Per-snippet cost of the sandbox vs a plain `python -c` of the same snippet, side by side in one run.

    .venv/bin/python bench/bench_sandbox.py [--runs 20]

The snippet imports numpy and PIL, crops a generated 640x480 image and saves the crop: a typical Thyme tool call.
Both variants start a fresh interpreter per snippet; they are interleaved so that machine load hits both alike.
Goal: sandbox overhead (median sandbox - median plain) <= 150 ms, interpreter start and imports included.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from keye.tools import SandboxConfig, isolation_report, repair_code, run_snippet

SNIPPET = """
import numpy as np
from PIL import Image
img = Image.open(image_path)
crop = img.crop((100, 80, 420, 320))
crop.save("crop.png")
print(crop.size, float(np.asarray(crop).mean()))
"""


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
        f"load average {load:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="keye-bench-"))
    image = work / "scene.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(image)
    plain_code = f"image_path = {str(image)!r}\nimport os\nos.chdir({str(work)!r})\n" + SNIPPET
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    config = SandboxConfig(repair=False)
    report = isolation_report(config)

    def plain() -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", plain_code], check=True, capture_output=True, env=env)
        return time.perf_counter() - t

    def sandboxed() -> float:
        t = time.perf_counter()
        r = run_snippet(SNIPPET, [image], config=config, out_dir=work / "out")
        assert r.ok, r.stderr
        return time.perf_counter() - t

    variants = {"plain python -c": plain, "sandbox": sandboxed}
    for fn in variants.values():  # warm the page cache and the isolation probe
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name, fn in variants.items():
            times[name].append(fn())

    print(f"machine:   {_machine()}")
    print(f"isolation: {report['summary']}")
    print(
        f"snippet:   numpy + PIL import, crop 640x480 -> 320x240, save PNG; {args.runs} runs each, interleaved"
    )
    base = statistics.median(times["plain python -c"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:18s} median {med * 1000:7.1f} ms   p90 {sorted(ts)[int(0.9 * (len(ts) - 1))] * 1000:7.1f} ms   "
            f"ratio {med / base:5.2f}x   overhead {(med - base) * 1000:+7.1f} ms"
        )
    overhead = (statistics.median(times["sandbox"]) - base) * 1000
    print(
        f"sandbox overhead {overhead:.1f} ms per snippet (goal <= 150 ms): {'met' if overhead <= 150 else 'NOT met'}"
    )
    t = time.perf_counter()
    for _ in range(200):
        repair_code(SNIPPET, ["scene.png"])
    print(
        f"repair_code on this snippet: {(time.perf_counter() - t) / 200 * 1000:.2f} ms (in the caller, before the run)"
    )
    print("warm pool: none (every snippet gets a fresh sandbox; see keye/tools/sandbox.py)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
