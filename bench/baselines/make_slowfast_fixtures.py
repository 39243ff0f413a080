"""Write ``tests/fixtures/slowfast/*.json``: the reference's Slow-Fast labels on generated videos.

Each fixture holds a video spec (``slowfast_videos.py``), so the test regenerates the same video, and what
keye-vl-utils 1.5.2 made of it: sampled frame indices and times, slow/fast labels, slow and fast frame sizes.
``video_sha256`` is informative only: x264 does not always give byte-identical files, so the test compares labels
(all identical), never bytes.
Run from the repository root with the main venv; the reference runs in ``.venv-baselines``:

    .venv/bin/python bench/baselines/make_slowfast_fixtures.py
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = ROOT / "tests" / "fixtures" / "slowfast"
BASELINE_PY = ROOT / ".venv-baselines" / "bin" / "python"
sys.path.insert(0, str(HERE))

import slowfast_videos  # noqa: E402

SPECS: dict[str, dict] = {
    # hard cuts between static block scenes, a small square moving inside them
    "cuts_blocks": {
        "height": 240,
        "width": 320,
        "fps": 25,
        "seed": 1,
        "scenes": [
            {"type": "blocks", "duration": 3.3, "square": 24, "speed": 30.0},
            {"type": "blocks", "duration": 4.1, "square": 24, "speed": 30.0},
            {"type": "blocks", "duration": 2.9},
            {"type": "blocks", "duration": 3.7, "square": 24, "speed": 30.0},
        ],
    },
    # a moving texture: slow frames every few samples, where similarities cross the thresholds
    "pan": {
        "height": 240,
        "width": 320,
        "fps": 30,
        "seed": 2,
        "scenes": [
            {"type": "pan", "duration": 12.0, "speed": 20.0},
            {"type": "blocks", "duration": 4.0},
        ],
    },
    # fade to black, black frames (black in both compared frames: excluded; all black: the reference's 0/0), fade in
    "fade_black": {
        "height": 180,
        "width": 320,
        "fps": 24,
        "seed": 3,
        "scenes": [
            {"type": "blocks", "duration": 3.0},
            {"type": "fade", "duration": 2.0, "direction": "out"},
            {"type": "black", "duration": 2.0},
            {"type": "fade", "duration": 2.0, "direction": "in"},
            {"type": "blocks", "duration": 3.0},
        ],
    },
    # portrait, sides not multiples of 28
    "portrait_odd": {
        "height": 330,
        "width": 186,
        "fps": 20,
        "seed": 4,
        "scenes": [
            {"type": "blocks", "duration": 4.0, "square": 20, "speed": 25.0},
            {"type": "pan", "duration": 6.0, "speed": 15.0},
            {"type": "blocks", "duration": 4.0},
        ],
    },
    # a slow pan: similarities drift close to the thresholds for many frames
    "slow_pan": {
        "height": 144,
        "width": 256,
        "fps": 30,
        "seed": 5,
        "scenes": [
            {"type": "pan", "duration": 20.0, "speed": 6.0},
        ],
    },
}


def main() -> None:
    if not BASELINE_PY.exists():
        sys.exit(f"{BASELINE_PY} missing: create .venv-baselines first (see bench/bench_encoders.py)")
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, spec in SPECS.items():
            paths[name] = slowfast_videos.write(spec, Path(tmp) / f"{name}.mp4")
        out = subprocess.run(
            [str(BASELINE_PY), str(HERE / "run_reference.py"), *map(str, paths.values())],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        for (name, spec), ref in zip(SPECS.items(), results):
            fixture = {
                "name": name,
                "reference": "keye-vl-utils==1.5.2 process_vision_info",
                "generator_version": slowfast_videos.GENERATOR_VERSION,
                "spec": spec,
                "cut_frames": slowfast_videos.cut_frames(spec),
                "video_sha256": hashlib.sha256(paths[name].read_bytes()).hexdigest(),
                "indices": ref["indices"],
                "times": ref["times"],
                "labels": ref["labels"],
                "slow_hw": ref["slow_hw"],
                "fast_hw": ref["fast_hw"],
            }
            (OUT / f"{name}.json").write_text(json.dumps(fixture, indent=1) + "\n")
            print(
                f"{name}: {len(ref['labels'])} frames, {sum(ref['labels'])} slow, slow {ref['slow_hw']}, "
                f"fast {ref['fast_hw']}"
            )


if __name__ == "__main__":
    main()
