"""Data-parallel evaluation: two CPU processes (torchrun + accelerate's PartialState over gloo) shard the videos, each
writes its own log, process 0 merges them without duplicates; the result equals a single-process run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from keye.eval.runner import run
from keye.eval.testing import ScriptedPredictor, write_test_videos
from keye.eval.videomme import VideoMME

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def test_two_processes_merge_without_duplicates(tmp_path):
    data = tmp_path / "videomme"
    shutil.copytree(FIXTURES / "videomme", data)
    write_test_videos(data, ["data/fFjv93ACGo8.mp4", "data/Wb7IO5GcxQ4.mp4"])
    (data / "data" / "corrupt0001.mp4").write_bytes(b"not a video")

    single = run(VideoMME(data), ScriptedPredictor(), tmp_path / "single", progress=False, report=False)

    out = tmp_path / "two"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "keye.eval.testing",
        str(data),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["processes"] == 2
    per_process = results["timing"]["per_process"]
    assert sorted(p["rank"] for p in per_process) == [0, 1]
    assert [p["videos"] for p in per_process] == [2, 2]  # videos 001, 003 on rank 0; 002, 004 on rank 1
    assert results["timing"]["prepare_calls"] == 4  # each video prepared once, in one process
    assert results["metrics"] == single["metrics"] and results["counts"] == single["counts"]

    ids = [json.loads(line)["question_id"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert ids == [f"00{v}-{k}" for v in range(1, 5) for k in range(1, 4)]  # each once, benchmark order
    assert not list(out.glob("samples.rank*.jsonl")) and not list(out.glob("timing.rank*.json"))
