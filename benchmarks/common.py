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


def sdpa_causal(q, k, v, beta=None, g=None):
    """Causal softmax attention on ``[B, T, H, D]`` inputs (the FlashAttention / SDPA peer)."""
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)


def op_methods(family: str, backends: dict[str, str]) -> dict:
    """``name -> fn(q, k, v, beta, g) -> o`` for our op with each ``{name: backend}``, then the peers:
    transformers' pure-torch Gated DeltaNet (delta family only) and causal SDPA."""
    import logging

    from hf_fwp.ops import delta_rule, linear_attention

    methods = {}
    for name, backend in backends.items():
        if family == "delta":
            methods[name] = lambda q, k, v, b, g, be=backend: delta_rule(q, k, v, b, g=g, backend=be)[0]
        else:
            methods[name] = lambda q, k, v, b, g, be=backend: linear_attention(q, k, v, g=g, backend=be)[0]
    if family == "delta":
        from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

        logging.getLogger("transformers").setLevel(logging.ERROR)  # its "fla is not installed" notice
        methods["transformers GDN"] = lambda q, k, v, b, g: torch_chunk_gated_delta_rule(q, k, v, g, b)[0]
    methods["SDPA causal"] = sdpa_causal
    return methods
