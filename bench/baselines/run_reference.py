"""Run the released Slow-Fast reference (keye-vl-utils 1.5.2) on videos; print one JSON object per video.

Runs in ``.venv-baselines`` (keye-vl-utils needs torchvision, which keye avoids), called by
``make_slowfast_fixtures.py`` and ``bench/bench_encoders.py``:

    .venv-baselines/bin/python bench/baselines/run_reference.py [--mode keye|decord] VIDEO...

``--mode keye``: ``process_vision_info`` on each video; prints its slow/fast labels, the sampled frame indices
(recomputed exactly as the reference picks them), timestamps, frame sizes, wall time and this process's peak RSS.
``--mode decord``: raw decord, ``VideoReader(path, num_threads=--threads).get_batch(indices)`` of the same frames at
native size (the decode the reference does, single-threaded with ``--threads 1``): the decoding floor that
``bench/bench_encoders.py`` compares ``keye frames`` with.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def _indices(path: str) -> list[int]:
    import decord
    import torch
    from keye_vl_utils.vision_process import smart_nframes

    vr = decord.VideoReader(path)
    n = smart_nframes({"video": path}, total_frames=len(vr), video_fps=vr.get_avg_fps())
    return torch.linspace(0, len(vr) - 1, n).round().long().tolist()


def run_keye(path: str) -> dict:
    from keye_vl_utils import process_vision_info

    t = time.perf_counter()
    _, videos, kw = process_vision_info(vision_infos=[{"type": "video", "video": path}])
    seconds = time.perf_counter() - t
    types = kw["frame_types"][0].tolist()  # 0 = slow, 1 = fast
    return {
        "video": path,
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "labels": [int(x == 0) for x in types],  # 1 = slow
        "indices": _indices(path),
        "times": [round(float(x), 6) for x in kw["timestamps"][0]],
        "slow_hw": [int(kw["height"][0]), int(kw["width"][0])],
        "fast_hw": [int(kw["fast_height"][0]), int(kw["fast_width"][0])],
        "frames_shape": list(videos[0].shape),
    }


def run_decord(path: str, threads: int = 0) -> dict:
    import decord

    indices = _indices(path)
    t = time.perf_counter()
    vr = decord.VideoReader(path, num_threads=threads)
    n = 0
    for s in range(0, len(indices), 32):  # chunked, so memory is not what is measured here
        n += len(vr.get_batch(indices[s : s + 32]).asnumpy())
    return {
        "video": path,
        "seconds": time.perf_counter() - t,
        "frames": n,
        "indices": indices,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("videos", nargs="+")
    p.add_argument("--mode", choices=("keye", "decord"), default="keye")
    p.add_argument("--threads", type=int, default=0, help="decord's decoding threads (0: its default)")
    args = p.parse_args()
    for v in args.videos:
        print(json.dumps(run_keye(v) if args.mode == "keye" else run_decord(v, args.threads)), flush=True)


if __name__ == "__main__":
    main()
