"""CPU benchmark of the FWP ops: naive vs chunk, beside transformers' pure-torch Gated DeltaNet and causal SDPA.

    python benchmarks/ops_cpu.py            # B=1, H=8, K=V=64, T in {512, 2048, 8192}
    python benchmarks/ops_cpu.py --quick    # a smoke run at small T

Prints a markdown table (times in ms, speed-ups of our chunk path over the peers, achieved GFLOP/s of the chunk
path beside this machine's measured torch.mm throughput) and writes ``results/ops_cpu.md`` and ``ops_cpu.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_description, markdown_table, matmul_gflops, op_methods, timeit  # noqa: E402



def chunk_flops(family: str, T: int, H: int, K: int, V: int, C: int = 64) -> float:
    """Forward FLOPs of our chunk algorithm (matmuls and the triangular solve; elementwise work not counted)."""
    n = -(-T // C) * H
    if family == "delta":
        per = 2 * C * C * K * 2 + C * C * (V + K) + 2 * C * C * (V + K) + 2 * K * C * (V + K) + 2 * K * K * V + 2 * C * K * V
    else:
        per = 2 * C * C * K + 2 * C * C * V + 2 * K * C * V + 2 * C * K * V
    return float(n * per)


def make(T, H, K, V, grad):
    q = torch.randn(1, T, H, K)
    k = F.normalize(torch.randn(1, T, H, K), dim=-1)
    v = torch.randn(1, T, H, V)
    beta = torch.rand(1, T, H)
    g = F.logsigmoid(torch.randn(1, T, H)) * 0.1
    return [t.requires_grad_(grad) for t in (q, k, v, beta, g)]


def methods(family):
    """name -> callable(q, k, v, beta, g) returning the output tensor."""
    return op_methods(family, {"naive": "naive", "chunk": "chunk"})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--naive-max-len", type=int, default=8192, help="skip the token loop above this T")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of repeats per measurement")
    ap.add_argument("--quick", action="store_true", help="small smoke run (T = 128, 256)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.budget = [128, 256], 0.2
    H, K = args.heads, args.dim
    peak = matmul_gflops()
    print(f"machine: {machine_description()}; torch.mm fp32: {peak:.0f} GFLOP/s\n")
    results = {}  # (family, mode, method, T) -> ms
    rows = []
    for family in ("delta", "linear"):
        for mode in ("fwd", "fwd+bwd"):
            for T in args.lengths:
                inputs = make(T, H, K, K, grad=mode != "fwd")
                for name, fn in methods(family).items():
                    if name == "naive" and T > args.naive_max_len:
                        continue
                    if mode == "fwd":
                        def run(fn=fn):
                            with torch.no_grad():
                                fn(*inputs)
                    else:
                        def run(fn=fn):
                            fn(*inputs).sum().backward()
                    budget = args.budget if name != "naive" else 0.0
                    ms = timeit(run, min_reps=1 if name == "naive" else 3, budget_s=budget,
                                warmup=0 if name == "naive" else 1)
                    results[(family, mode, name, T)] = ms
                chunk = results[(family, mode, "chunk", T)]
                flops = chunk_flops(family, T, H, K, K) * (3 if mode == "fwd+bwd" else 1)
                cells = []
                for name in methods(family):
                    ms = results.get((family, mode, name, T))
                    cells.append("-" if ms is None else f"{ms:.1f}")
                speedups = [f"{results[(family, mode, p, T)] / chunk:.2f}x" for p in methods(family)
                            if p not in ("naive", "chunk")]
                gflops = flops / (chunk * 1e-3) / 1e9
                rows.append([family, mode, T, *cells, *speedups, f"{gflops:.0f} ({100 * gflops / peak:.0f}%)"])
                print(" ".join(str(c) for c in rows[-1]), flush=True)
    header_delta = ["family", "mode", "T", "naive ms", "chunk ms", "transformers GDN ms", "SDPA ms",
                    "chunk vs GDN", "chunk vs SDPA", "chunk GFLOP/s (% of mm)"]
    delta_rows = [r for r in rows if r[0] == "delta"]
    linear_rows = [r[:5] + ["-"] + r[5:6] + ["-"] + r[6:] for r in rows if r[0] == "linear"]
    table = markdown_table(header_delta, delta_rows + linear_rows)
    note = (f"B=1, H={H}, K=V={K}, fp32, chunk size 64; {machine_description()}; torch.mm {peak:.0f} GFLOP/s. "
            "'chunk vs X' is X's time over ours (higher is better). GFLOP/s counts the chunk algorithm's matmul "
            "and solve FLOPs (3x the forward count for fwd+bwd). Linear rows have no transformers peer.")
    print("\n" + table + "\n\n" + note)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ops_cpu.md").write_text(table + "\n\n" + note + "\n")
    plot(results, args.lengths, args.out / "ops_cpu.png")
    print(f"\nwrote {args.out / 'ops_cpu.md'} and {args.out / 'ops_cpu.png'}")


def plot(results, lengths, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for i, family in enumerate(("delta", "linear")):
        for j, mode in enumerate(("fwd", "fwd+bwd")):
            ax = axes[i][j]
            for name in methods(family):
                pts = [(T, results[(family, mode, name, T)]) for T in lengths if (family, mode, name, T) in results]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set(xscale="log", yscale="log", title=f"{family} rule, {mode}", xlabel="T", ylabel="ms")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("FWP ops on CPU (B=1, H=8, K=V=64)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
