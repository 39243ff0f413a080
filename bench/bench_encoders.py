"""Encoders benchmark: `keye frames` against the decoding floor and keye-vl-utils 1.5.2, start-up, token counts.

Everything is measured side by side in this one run, on generated footage-like videos (``natural`` scenes of
``bench/baselines/slowfast_videos.py``: 1280x720 24 fps h264 with AAC, fractal texture, camera motion, grain, cuts;
cached under ``artifacts/bench/``). Times are whole processes (imports included) unless a row says otherwise.

1. `keye frames` on a 2-minute clip (Keye-VL-1.5's official settings, the default) vs the decoding floor, raw
   single-threaded decord decoding the same sampled frames (``get_batch``, decode time only), and vs keye-vl-utils
   1.5.2's ``process_vision_info`` (time and peak RSS); the share of identical slow/fast labels.
   Goals: <= 1.1x the floor, <= 1/4 of the reference's time, <= 1/5 of its peak RSS, 100% identical labels.
2. `keye frames --model keye-tiny` on a 10-minute clip: peak RSS (goal <= 300 MB).
3. Start-up: ``keye --help``, ``keye tools run`` of a trivial snippet (goals <= 0.5 s each), and whether
   ``import keye.encoders`` loads torch or transformers (goal: neither).
4. The decoder's two backends on the same frames (why ``auto`` is PyAV).
5. Vision tokens of a 64 s 360p ``keye.synthetic`` demo video: uniform, Slow-Fast, + DynTok, + Clapper.

The reference lives in its own environment (it needs torchvision, which keye avoids): ``make bench-baselines``.
Without it the reference rows print "baseline missing". Run: ``python -m bench.bench_encoders [--minutes 2]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASELINE_PY = ROOT / ".venv-baselines" / "bin" / "python"
CACHE = ROOT / "artifacts" / "bench"
sys.path.insert(0, str(ROOT / "bench" / "baselines"))

import slowfast_videos  # noqa: E402


def machine() -> str:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} cores, load average {load[0]:.1f}, python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def video_for(spec: dict, name: str) -> Path:
    """The encoded video of ``spec``, generated once and cached (keyed by the spec and generator version)."""
    key = hashlib.sha256(
        json.dumps([spec, slowfast_videos.GENERATOR_VERSION], sort_keys=True).encode()
    ).hexdigest()
    path = CACHE / f"{name}-{key[:10]}.mp4"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        print(f"  generating {path.name} ...", flush=True)
        slowfast_videos.write(spec, path.with_suffix(".tmp.mp4")).rename(path)
        print(f"  generated in {time.perf_counter() - t:.0f} s", flush=True)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Whole processes: wall time and the child's own peak RSS


KEYE = [sys.executable, "-m", "keye.cli"]


# Started in a small fresh interpreter: a child forked from this process (torch loaded) would count this process's
# pages in its own peak RSS until it execs. The launcher spawns the command and reports its rusage.
_LAUNCHER = (
    "import json, os, sys, time; t = time.perf_counter(); "
    "pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ); _, status, usage = os.wait4(pid, 0); "
    "print(json.dumps([time.perf_counter() - t, usage.ru_maxrss, os.waitstatus_to_exitcode(status)]), file=sys.stderr)"
)


def measured(cmd: list[str]) -> dict:
    """Run ``cmd``: its wall seconds, its own peak RSS (MB, the kernel's rusage of that process) and its stdout."""
    out = subprocess.run(
        [sys.executable, "-S", "-c", _LAUNCHER, *cmd], capture_output=True, text=True, cwd=ROOT
    )
    seconds, maxrss_kb, code = json.loads(out.stderr.strip().splitlines()[-1])
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({code}):\n{out.stderr[-2000:]}")
    return {"seconds": seconds, "peak_rss_mb": maxrss_kb / 1024, "stdout": out.stdout}


def _last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def reference(mode: str, video: Path, *extra: str) -> dict | None:
    if not BASELINE_PY.exists():
        return None
    script = str(ROOT / "bench" / "baselines" / "run_reference.py")
    run = measured([str(BASELINE_PY), script, "--mode", mode, *extra, str(video)])
    return {**_last_json(run["stdout"]), "wall_s": run["seconds"], "process_rss_mb": run["peak_rss_mb"]}


def _ratio(a: float, b: float, goal: str) -> str:
    return f"{a / b:.3f} (goal {goal})"


# ---------------------------------------------------------------------------------------------------------------------
# 1. keye frames vs the decoding floor and keye-vl-utils


def bench_frames(minutes: float) -> dict:
    video = video_for(slowfast_videos.natural_spec(minutes), f"natural_{minutes:g}min_720p")
    print(
        f"`keye frames` on a {minutes:g}-minute 1280x720 24 fps h264+aac clip ({video.name}), official settings"
    )
    ours = [measured([*KEYE, "frames", str(video), "--json"])]
    floor = reference("decord", video, "--threads", "1")
    ref = reference("keye", video)
    ours.append(measured([*KEYE, "frames", str(video), "--json"]))
    report = _last_json(ours[0]["stdout"])
    seconds = statistics.mean(r["seconds"] for r in ours)
    rss = max(r["peak_rss_mb"] for r in ours)
    labels = [int(f["kind"] == "slow") for f in report["frames"]]
    print(
        f"  keye frames (whole process):        {seconds:6.2f} s (runs {ours[0]['seconds']:.2f}, "
        f"{ours[1]['seconds']:.2f}), "
        f"peak RSS {rss:5.0f} MB, {len(labels)} frames, {sum(labels)} slow"
    )
    result = {"frames_s": seconds, "frames_rss_mb": rss}
    if floor is None or ref is None:
        print("  decord / keye-vl-utils 1.5.2: baseline missing (make bench-baselines)")
        return result
    indices = [f["index"] for f in report["frames"]]
    print(
        f"  raw decord, 1 thread (decode only): {floor['seconds']:6.2f} s, same frames: {floor['indices'] == indices}"
    )
    print(
        f"  keye-vl-utils 1.5.2 (whole process): {ref['wall_s']:5.2f} s ({ref['seconds']:.2f} s in process_vision_info), "
        f"peak RSS {ref['process_rss_mb']:5.0f} MB, {sum(ref['labels'])} slow"
    )
    same = sum(a == b for a, b in zip(labels, ref["labels"])) / max(len(ref["labels"]), 1)
    print(
        f"  ratios: vs decoding floor {_ratio(seconds, floor['seconds'], '<= 1.1')}   vs keye-vl-utils time "
        f"{_ratio(seconds, ref['wall_s'], '<= 0.25')}   peak RSS {_ratio(rss, ref['process_rss_mb'], '<= 0.2')}   "
        f"identical labels {same:.1%} (goal 100%), same frames sampled: {ref['indices'] == indices}"
    )
    result.update(
        floor_s=floor["seconds"],
        ref_s=ref["wall_s"],
        ref_rss_mb=ref["process_rss_mb"],
        floor_ratio=seconds / floor["seconds"],
        time_ratio=seconds / ref["wall_s"],
        memory_ratio=rss / ref["process_rss_mb"],
        identical_labels=same,
    )
    return result


# ---------------------------------------------------------------------------------------------------------------------
# 2. A 10-minute clip at keye-tiny's settings


def bench_long(minutes: float) -> dict:
    video = video_for(slowfast_videos.natural_spec(minutes, seed=1), f"natural_{minutes:g}min_720p")
    run = measured([*KEYE, "frames", str(video), "--model", "keye-tiny", "--json"])
    report = _last_json(run["stdout"])
    print(
        f"`keye frames --model keye-tiny` on a {minutes:g}-minute 720p clip: {run['seconds']:.2f} s, "
        f"peak RSS {run['peak_rss_mb']:.0f} MB (goal <= 300), {len(report['frames'])} frames"
    )
    return {"long_s": run["seconds"], "long_rss_mb": run["peak_rss_mb"]}


# ---------------------------------------------------------------------------------------------------------------------
# 3. Start-up


def bench_startup(repeat: int) -> dict:
    import tempfile

    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        image, code = Path(tmp) / "red.png", Path(tmp) / "snippet.py"
        Image.new("RGB", (64, 64), (200, 10, 10)).save(image)
        code.write_text("print(image_path)\n")
        help_s = statistics.median(measured([*KEYE, "--help"])["seconds"] for _ in range(repeat))
        tools = [
            measured([*KEYE, "tools", "run", "--code", str(code), "--image", str(image)])
            for _ in range(repeat)
        ]
        tools_s = statistics.median(r["seconds"] for r in tools)
    probe = (
        "import sys, keye.encoders; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    heavy = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    print(f"Start-up (median of {repeat} whole processes)")
    print(f"  keye --help {help_s:.3f} s (goal <= 0.5)   keye tools run {tools_s:.3f} s (goal <= 0.5)")
    print(f"  import keye.encoders loads {heavy} of torch, transformers (goal: [])")
    return {"help_s": help_s, "tools_run_s": tools_s, "encoders_heavy": heavy}


# ---------------------------------------------------------------------------------------------------------------------
# 4. The decoder's backends


def bench_backends(minutes: float, repeat: int) -> dict:
    from keye.encoders import video as video_io
    from keye.encoders.slowfast import SlowFastConfig, _frame_count, sample_positions

    try:
        import decord  # noqa: F401
    except ImportError:
        print("Decoder backends: decord not installed here")
        return {}
    path = video_for(slowfast_videos.natural_spec(minutes), f"natural_{minutes:g}min_720p")
    rows = {}
    for fps in (0.5, 2.0, 8.0):
        idx = video_io.index(path)
        positions = sample_positions(idx.pts, _frame_count(idx.duration, fps, SlowFastConfig(fps=fps)))
        times = {}
        for _ in range(repeat):  # interleaved, so both see the same machine load
            for backend in ("pyav", "decord"):
                t = time.perf_counter()
                n = sum(1 for _ in video_io.decode(path, positions, backend=backend))
                times.setdefault(backend, []).append(time.perf_counter() - t)
                assert n == len(positions)
        pyav, dec = statistics.median(times["pyav"]), statistics.median(times["decord"])
        rows[fps] = {"pyav_s": pyav, "decord_s": dec}
        print(
            f"  {len(positions):5d} frames ({fps:g} fps): pyav {pyav:6.2f} s   decord {dec:6.2f} s   pyav/decord {pyav / dec:.2f}"
        )
    return {"backends": rows}


# ---------------------------------------------------------------------------------------------------------------------
# 3. Token counts


def _pixel_patch_features(frame: np.ndarray, patch: int = 28) -> tuple[np.ndarray, tuple[int, int]]:
    h, w = frame.shape[0] // patch, frame.shape[1] // patch
    x = frame[: h * patch, : w * patch].reshape(h, patch, w, patch, 3).transpose(0, 2, 1, 3, 4)
    # centred, so that a flat grey patch is not "similar" to everything
    return x.reshape(h * w, -1).astype(np.float32) - 127.5, (h, w)


def bench_tokens() -> dict:
    import torch

    from keye.encoders.clapper import ClapperConfig, clapper_tokens
    from keye.encoders.dyntok import dyntok_frames
    from keye.encoders.slowfast import SlowFastConfig, plan_video
    from keye.synthetic import GENERATOR_VERSION, make_demo_video

    video = CACHE / f"tokens_demo_64s_360p-v{GENERATOR_VERSION}.mp4"
    if not video.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        make_demo_video(video, seed=7, duration=64.0, size=(360, 640), fps=24, scene_seconds=8.0)
    print("Vision tokens, 64 s 640x360 keye.synthetic demo video (moving shapes on flat backgrounds, cuts)")
    print(
        f"  {'frames':>6}  {'uniform':>8}  {'slow-fast':>9}  {'+dyntok':>8} {'kept':>6}  {'+clapper':>8} {'per frame':>9}"
    )
    rows = {}
    for n in (32, 64, 128):
        cfg = SlowFastConfig(fps=n / 64.0, max_frames=n)
        uniform, _ = plan_video(video, SlowFastConfig(fps=n / 64.0, max_frames=n, enabled=False))
        plan, frames = plan_video(video, cfg)
        feats, grids = zip(*(_pixel_patch_features(f) for f in frames))
        feats = torch.from_numpy(np.concatenate(feats))
        dyn = dyntok_frames(feats, feats, list(grids))
        clap = clapper_tokens(list(grids), ClapperConfig())
        rows[n] = dict(
            uniform=uniform.total_tokens,
            slowfast=plan.total_tokens,
            dyntok=dyn.tokens_after,
            dyntok_kept=dyn.kept_ratio,
            clapper=clap,
            clapper_per_frame=clap / len(frames),
        )
        print(
            f"  {len(frames):6d}  {uniform.total_tokens:8d}  {plan.total_tokens:9d}  {dyn.tokens_after:8d} "
            f"{dyn.kept_ratio:6.1%}  {clap:8d} {clap / len(frames):9.1f}"
        )
    print("  goals: DynTok keeps <= 45% (here on pixel patches), Clapper <= 61 tokens per frame")
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="encoders benchmark")
    p.add_argument("--minutes", type=float, default=float(os.environ.get("KEYE_BENCH_MINUTES", 2)))
    p.add_argument("--long-minutes", type=float, default=10.0)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args([] if argv is None else argv)
    print(f"machine: {machine()}")
    results = {}
    results.update(bench_frames(args.minutes))
    results.update(bench_long(args.long_minutes))
    results.update(bench_startup(max(args.repeat, 5)))
    print(f"Decoder backends on the {args.minutes:g}-minute clip (in process, median of {args.repeat})")
    results.update(bench_backends(args.minutes, args.repeat))
    results["tokens"] = bench_tokens()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
