"""Encoders benchmark: Slow-Fast planning vs keye-vl-utils 1.5.2, decoding vs raw decord, token counts.

Everything is measured side by side in this one run, on the same generated videos (``bench/baselines/
slowfast_videos.py``; cached under ``artifacts/bench/``):

1. Slow-Fast preprocessing of a 10-minute 720p 30 fps video: wall time and peak RSS of a fresh process running
   ``plan_video`` vs one running ``keye_vl_utils.process_vision_info``, and the share of identical slow/fast labels
   (goals: <= 1/3 time, <= 1/4 peak memory, >= 95% identical). Runs interleaved ours, reference, ours.
2. Decoding the same sampled frames at native size: our streaming PyAV decoder vs ``decord.VideoReader.get_batch``
   (goal <= 1.2x), interleaved, median of ``--repeat``.
3. Vision tokens of a 64 s 360p ``keye.synthetic`` demo video at 32 / 64 / 128 frames: uniform, Slow-Fast, + DynTok, + Clapper (goals:
   DynTok keeps <= 45%, Clapper <= 61 tokens per frame). DynTok groups by pixel-patch similarity here (a proxy: the
   tokens the vision tower would see; keye-tiny's tower is not trained). Prefill latency needs the model wiring.

The reference lives in its own environment (it needs torchvision, which keye avoids)::

    python3 -m venv .venv-baselines
    .venv-baselines/bin/pip install torch==2.14.1 torchvision==0.29.1
    .venv-baselines/bin/pip install keye-vl-utils==1.5.2 qwen-vl-utils decord av opencv-python-headless einops psutil

Without it the reference rows print "baseline missing". Run: ``python -m bench.bench_encoders [--minutes 10]``.
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
# Child processes (a fresh process each, so peak RSS is the run's own)


def child_plan(video: str) -> dict:
    import resource

    from keye.encoders.slowfast import plan_video

    t = time.perf_counter()
    plan, frames = plan_video(video)
    seconds = time.perf_counter() - t
    slow = next(f for f in plan.frames if f.kind == "slow")
    fast = next((f for f in plan.frames if f.kind == "fast"), slow)
    return {
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "labels": [int(f.kind == "slow") for f in plan.frames],
        "indices": [f.index for f in plan.frames],
        "slow_hw": [slow.height, slow.width],
        "fast_hw": [fast.height, fast.width],
        "total_tokens": plan.total_tokens,
        "frames_mb": sum(f.nbytes for f in frames) / 2**20,
    }


def _run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def run_ours(video: Path) -> dict:
    return _run_json([sys.executable, "-m", "bench.bench_encoders", "--child-plan", str(video)])


def run_reference(video: Path, mode: str = "keye") -> dict | None:
    if not BASELINE_PY.exists():
        return None
    return _run_json(
        [str(BASELINE_PY), str(ROOT / "bench" / "baselines" / "run_reference.py"), "--mode", mode, str(video)]
    )


# ---------------------------------------------------------------------------------------------------------------------
# 1. Slow-Fast vs keye-vl-utils


def bench_slowfast(minutes: float) -> dict:
    video = video_for(slowfast_videos.bench_spec(minutes), f"slowfast_{minutes:g}min_720p")
    ours1 = run_ours(video)
    ref = run_reference(video)
    ours2 = run_ours(video)
    seconds = statistics.mean([ours1["seconds"], ours2["seconds"]])
    rss = max(ours1["peak_rss_mb"], ours2["peak_rss_mb"])
    print(
        f"Slow-Fast planning, {minutes:g}-minute 1280x720 30 fps video ({video.name}), "
        f"{len(ours1['labels'])} sampled frames"
    )
    print(
        f"  ours: {seconds:6.1f} s (runs {ours1['seconds']:.1f}, {ours2['seconds']:.1f}), peak RSS {rss:6.0f} MB, "
        f"{sum(ours1['labels'])} slow, slow {ours1['slow_hw']} fast {ours1['fast_hw']}, "
        f"{ours1['total_tokens']} tokens, frames returned {ours1['frames_mb']:.0f} MB"
    )
    result = {"ours_s": seconds, "ours_rss_mb": rss}
    if ref is None:
        print("  keye-vl-utils 1.5.2: baseline missing (create .venv-baselines, see this file's docstring)")
        return result
    same = sum(a == b for a, b in zip(ours1["labels"], ref["labels"])) / max(len(ref["labels"]), 1)
    print(
        f"  keye-vl-utils 1.5.2: {ref['seconds']:6.1f} s, peak RSS {ref['peak_rss_mb']:6.0f} MB, "
        f"{sum(ref['labels'])} slow, slow {ref['slow_hw']} fast {ref['fast_hw']}"
    )
    print(
        f"  time ratio {seconds / ref['seconds']:.3f} (goal <= 0.333)   peak memory ratio "
        f"{rss / ref['peak_rss_mb']:.3f} (goal <= 0.25)   identical labels {same:.1%} (goal >= 95%), "
        f"same frames sampled: {ours1['indices'] == ref['indices']}"
    )
    result.update(
        ref_s=ref["seconds"],
        ref_rss_mb=ref["peak_rss_mb"],
        time_ratio=seconds / ref["seconds"],
        memory_ratio=rss / ref["peak_rss_mb"],
        identical_labels=same,
    )
    return result


# ---------------------------------------------------------------------------------------------------------------------
# 2. Decoding vs raw decord


def _decode_ours(video: Path) -> tuple[float, int]:
    from keye.encoders import slowfast as sf

    t = time.perf_counter()
    index = sf._index_pyav(str(video))
    cfg = sf.SlowFastConfig()
    duration = float(index.duration)
    positions = sf.sample_positions(
        index.pts, sf._frame_count(duration, min(cfg.fps, len(index.pts) / duration), cfg)
    )
    n = sum(1 for _ in sf._threaded(sf._decode_pyav(str(video), index, positions), maxsize=8))
    return time.perf_counter() - t, n


def _decode_decord(video: Path) -> tuple[float, int] | None:
    try:
        import decord
    except ImportError:
        return None
    from keye.encoders import slowfast as sf

    t = time.perf_counter()
    vr = decord.VideoReader(str(video))
    total = len(vr)
    n_frames = int(total / vr.get_avg_fps() * min(2.0, vr.get_avg_fps()))
    indices = sf.sample_positions(np.arange(total), min(n_frames, 1365)).tolist()
    n = 0
    for s in range(0, len(indices), 16):  # same chunking as ours, so memory is not what differs
        n += len(vr.get_batch(indices[s : s + 16]).asnumpy())
    return time.perf_counter() - t, n


def bench_decode(minutes: float, repeat: int) -> dict:
    video = video_for(slowfast_videos.bench_spec(minutes), f"slowfast_{minutes:g}min_720p")
    ours, raw = [], []
    for _ in range(repeat):  # interleaved, so both see the same machine load
        ours.append(_decode_ours(video))
        d = _decode_decord(video)
        if d is not None:
            raw.append(d)
    t_ours = statistics.median(t for t, _ in ours)
    print(f"Decoding the {ours[0][1]} sampled frames at native 1280x720 (median of {repeat})")
    print(f"  ours (PyAV, index + streaming decode, skips unreferenced frames): {t_ours:6.2f} s")
    if not raw:
        print("  raw decord: decord not installed in this environment")
        return {"decode_ours_s": t_ours}
    t_raw = statistics.median(t for t, _ in raw)
    print(f"  raw decord VideoReader.get_batch:                                {t_raw:6.2f} s")
    print(f"  ratio ours / decord {t_ours / t_raw:.3f} (goal <= 1.2)")
    return {"decode_ours_s": t_ours, "decode_decord_s": t_raw, "decode_ratio": t_ours / t_raw}


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
    p.add_argument("--minutes", type=float, default=float(os.environ.get("KEYE_BENCH_MINUTES", 10)))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--child-plan", help=argparse.SUPPRESS)
    args = p.parse_args([] if argv is None else argv)
    if args.child_plan:
        print(json.dumps(child_plan(args.child_plan)))
        return {}
    print(f"machine: {machine()}")
    results = {}
    results.update(bench_slowfast(args.minutes))
    results.update(bench_decode(args.minutes, args.repeat))
    results["tokens"] = bench_tokens()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
