"""`make bench`: every benchmark, each printing ratios measured side by side in this one run."""

from __future__ import annotations

import importlib
import os
import platform
import sys

import torch

BENCHES = [
    "bench.bench_core",
    "bench.bench_compression",
    "bench.bench_encoders",
    "bench.bench_sandbox",
    "bench.bench_serve",
    "bench.bench_thyme",
    "bench.bench_training",
]


def main(argv: list[str]) -> int:
    names = [f"bench.bench_{a}" for a in argv] or BENCHES
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"cuda {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}"
    )
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        importlib.import_module(name).main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
