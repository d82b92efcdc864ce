"""GPU benchmark of the FWP ops: Triton kernels vs our chunk path (torch on CUDA), transformers' pure-torch
Gated DeltaNet and causal SDPA (FlashAttention), forward and forward+backward, plus a correctness check of the
Triton kernels against the float32 token-by-token reference at realistic shapes.

    python benchmarks/ops_gpu.py                          # B=1, H=8, K=V=64, T in {512, 2048, 8192}
    python benchmarks/ops_gpu.py --batch 2 --heads 16 --dim 128 --lengths 2048 16384   # the fla anchor shape

Writes ``results/ops_gpu.md`` and ``results/ops_gpu.png`` (named after the card).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, op_methods, timeit  # noqa: E402

from hf_fwp.ops import delta_rule, linear_attention  # noqa: E402



def make(B, T, H, D, dtype, grad):
    dev = "cuda"
    q = torch.randn(B, T, H, D, device=dev, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, D, device=dev), dim=-1).to(dtype)
    v = torch.randn(B, T, H, D, device=dev, dtype=dtype)
    beta = torch.rand(B, T, H, device=dev, dtype=dtype)
    g = (F.logsigmoid(torch.randn(B, T, H, device=dev)) * 0.1).to(dtype)
    return [t.requires_grad_(grad) for t in (q, k, v, beta, g)]


def methods(family):
    """name -> callable(q, k, v, beta, g) returning the output tensor."""
    return op_methods(family, {"triton": "triton", "chunk (torch)": "chunk"})


def check_correctness(B, H, D, T=1024):
    """Max relative errors of Triton vs the naive fp32 recurrence (outputs, final state, all gradients)."""
    rows = []
    for family in ("delta", "linear"):
        for gated in (False, True):
            x = make(B, T, H, D, torch.float32, grad=True)
            res = {}
            for backend in ("naive", "triton"):
                leaves = [t.detach().clone().requires_grad_() for t in x]
                q, k, v, b, g = leaves
                g_ = g if gated else None
                if family == "delta":
                    o, S = delta_rule(q, k, v, b, g=g_, output_final_state=True, backend=backend)
                else:
                    o, S = linear_attention(q, k, v, g=g_, output_final_state=True, backend=backend)
                torch.manual_seed(0)
                ((o * torch.randn_like(o)).sum() + (S * torch.randn_like(S)).sum()).backward()
                res[backend] = [o, S] + [t.grad if t.grad is not None else torch.zeros(1, device="cuda")
                                         for t in leaves]
            errs = [((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
                    for a, b in zip(res["triton"], res["naive"])]
            rows.append([family, "gated" if gated else "plain", T, f"{max(errs):.1e}"])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--skip-torch-peers-above", type=int, default=8192,
                    help="skip the pure-torch paths above this T (they are slow and memory hungry)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ops_gpu.py needs a CUDA GPU; on CPU run benchmarks/ops_cpu.py instead.")
    card = torch.cuda.get_device_name()
    dtype = getattr(torch, args.dtype)
    B, H, D = args.batch, args.heads, args.dim
    print(f"device: {card}, dtype {args.dtype}, B={B}, H={H}, K=V={D}")
    corr = check_correctness(B, H, D)
    print(markdown_table(["family", "variant", "T", "max rel err vs naive (fp32, o/S/grads)"], corr))
    rows, results = [], {}
    for family in ("delta", "linear"):
        for mode in ("fwd", "fwd+bwd"):
            for T in args.lengths:
                x = make(B, T, H, D, dtype, grad=mode != "fwd")
                cells = []
                for name, fn in methods(family).items():
                    if name in ("chunk (torch)", "transformers GDN") and T > args.skip_torch_peers_above:
                        cells.append("-")
                        continue

                    def run(fn=fn):
                        if mode == "fwd":
                            with torch.no_grad():
                                fn(*x)
                        else:
                            fn(*x).sum().backward()

                    ms = timeit(run, device="cuda", min_reps=5, budget_s=1.0, warmup=2)
                    results[(family, mode, name, T)] = ms
                    cells.append(f"{ms:.2f}")
                rows.append([family, mode, T] + cells + (["-"] if family == "linear" else []))
                print(" ".join(str(c) for c in rows[-1]), flush=True)
    fixed = [r if r[0] == "delta" else r[:5] + ["-", r[5]] for r in rows]
    header = ["family", "mode", "T", "triton ms", "chunk (torch) ms", "transformers GDN ms", "SDPA ms"]
    table = markdown_table(header, fixed)
    note = f"{card}, {args.dtype}, B={B}, H={H}, K=V={D}; median of repeated runs after warm-up."
    print("\n" + table + "\n\n" + note)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "ops_gpu_" + card.replace(" ", "_")
    (args.out / f"{stem}.md").write_text(
        "Correctness (Triton vs naive, fp32):\n\n" + markdown_table(["family", "variant", "T", "max rel err"], corr)
        + "\n\n" + table + "\n\n" + note + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for family in ("delta", "linear"):
            for name in methods(family):
                pts = [(T, results[(family, mode, name, T)]) for T in args.lengths
                       if (family, mode, name, T) in results]
                if pts and not (family == "linear" and name == "SDPA causal"):
                    ax.plot(*zip(*pts), marker="o", label=f"{family}: {name}")
        ax.set(xscale="log", yscale="log", title=mode, xlabel="T", ylabel="ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"FWP ops on {card}")
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=120)
    print(f"wrote {args.out / (stem + '.md')}")


if __name__ == "__main__":
    main()
