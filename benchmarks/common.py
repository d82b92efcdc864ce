"""Timing, table and plot helpers shared by the benchmark scripts (not a test: it prints and writes files)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, *, device: str = "cpu", min_reps: int = 3, budget_s: float = 2.0, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds: ``warmup`` untimed calls, then at least ``min_reps`` timed
    calls and more while the total stays under ``budget_s``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def matmul_gflops(device: str = "cpu", n: int = 2048) -> float:
    """Measured fp32 ``torch.mm`` throughput of this machine (GFLOP/s) on n x n matrices."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    ms = timeit(lambda: a @ b, device=device, min_reps=5, budget_s=1.0)
    return 2 * n**3 / (ms * 1e-3) / 1e9


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_description() -> str:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
