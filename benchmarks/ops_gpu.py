"""GPU benchmark of the FWP ops, one row per rule and shape: our Triton kernels vs flash-linear-attention (fla, an
optional peer: imported only if installed, never a dependency) and causal SDPA (FlashAttention), forward and
forward+backward, plus a correctness check of the compiled kernels against the float32 token-by-token reference.

    python benchmarks/ops_gpu.py                                  # the issue's shapes: B8 T2048 and B2 T8192, H16 D128
    python benchmarks/ops_gpu.py --shapes 8x2048x16x256 2x8192x16x256     # head dim 256
    PYTHONPATH=/tmp/site python benchmarks/ops_gpu.py             # with fla installed in /tmp/site (GPU machine)

Times are medians of ``triton.testing.do_bench``; bf16 inputs, fp32 states, mild decays like a trained model.
Writes ``results/ops_gpu_<card>.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, sdpa_causal  # noqa: E402

from hf_fwp.ops import delta_rule, linear_attention  # noqa: E402

RULES = ("gated_delta", "delta", "gated_linear", "linear")


def ours(rule: str, backend: str = "triton"):
    """``fn(q, k, v, beta, g, **kw) -> (o, S)`` for one rule."""
    if rule == "gated_delta":
        return lambda q, k, v, b, g, **kw: delta_rule(q, k, v, b, g=g, backend=backend, **kw)
    if rule == "delta":
        return lambda q, k, v, b, g, **kw: delta_rule(q, k, v, b, backend=backend, **kw)
    if rule == "gated_linear":
        return lambda q, k, v, b, g, **kw: linear_attention(q, k, v, g=g, backend=backend, **kw)
    return lambda q, k, v, b, g, **kw: linear_attention(q, k, v, backend=backend, **kw)


def fla(rule: str):
    """The matching fla 0.6 op, or None when fla is not importable."""
    try:
        if rule == "gated_delta":
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            return lambda q, k, v, b, g: chunk_gated_delta_rule(q, k, v, g, b)
        if rule == "delta":
            from fla.ops.delta_rule import chunk_delta_rule

            return lambda q, k, v, b, g: chunk_delta_rule(q, k, v, b)
        from fla.ops.simple_gla import chunk_simple_gla

        if rule == "gated_linear":
            return lambda q, k, v, b, g: chunk_simple_gla(q, k, v, g=g)
        return lambda q, k, v, b, g: chunk_simple_gla(q, k, v)
    except Exception:  # not installed, or it fails to import on this stack
        return None


def make(B, T, H, D, dtype, grad, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    q = r(B, T, H, D).to(dtype)
    k = F.normalize(r(B, T, H, D), dim=-1).to(dtype)
    v = r(B, T, H, D).to(dtype)
    beta = torch.rand(B, T, H, device="cuda", generator=gen).to(dtype)
    g = F.logsigmoid(r(B, T, H) + 3.0)  # mild decay, like a trained gated model
    return [t.requires_grad_(grad) for t in (q, k, v, beta, g)]


def check_correctness(T=1000, H=4, D=128):
    """Max relative error of compiled Triton vs the naive fp32 recurrence (outputs, final state, every gradient)."""
    rows = []
    for rule in RULES:
        x = make(2, T, H, D, torch.float32, grad=False)
        res = {}
        for backend in ("naive", "triton"):
            leaves = [t.detach().clone().requires_grad_() for t in x]
            o, S = ours(rule, backend)(*leaves, output_final_state=True)
            gen = torch.Generator(device="cuda").manual_seed(1)
            ((o * torch.randn(o.shape, device="cuda", generator=gen)).sum()
             + (S * torch.randn(S.shape, device="cuda", generator=gen)).sum()).backward()
            res[backend] = [o, S] + [t.grad for t in leaves if t.grad is not None]
        errs = [((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() for a, b in zip(res["triton"], res["naive"])]
        rows.append([rule, f"B2 T{T} H{H} D{D}", f"{max(errs):.1e}"])
    return rows


def bench(fn, x, mode):
    from triton.testing import do_bench

    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(*x)
    else:
        def run():
            out = fn(*x)
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    return do_bench(run, warmup=25, rep=100, return_mode="median")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["8x2048x16x128", "2x8192x16x128"], help="BxTxHxD")
    ap.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ops_gpu.py needs a CUDA GPU; on CPU run benchmarks/ops_cpu.py (speed) or "
                 "python -m hf_fwp.ops.triton_fit (kernel fit) instead.")
    import triton

    card = torch.cuda.get_device_name()
    dtype = getattr(torch, args.dtype)
    print(f"device: {card}, torch {torch.__version__}, triton {triton.__version__}, dtype {args.dtype}", flush=True)
    corr = [] if args.skip_correctness else check_correctness()
    if corr:
        print(markdown_table(["rule", "shape", "max rel err vs naive (fp32: o, S, all grads)"], corr), flush=True)
    rows, plot = [], {}
    for shape in args.shapes:
        B, T, H, D = (int(s) for s in shape.split("x"))
        for mode in args.modes:
            x = make(B, T, H, D, dtype, grad=mode != "fwd")
            sdpa = bench(lambda q, k, v, b, g: sdpa_causal(q, k, v), x, mode)
            for rule in args.rules:
                ms = bench(lambda *a, f=ours(rule): f(*a)[0], x, mode)
                peer = fla(rule)
                try:
                    peer_ms = bench(lambda *a, f=peer: f(*a)[0], x, mode) if peer is not None else None
                except Exception as e:  # e.g. fla refuses its gated backward on Hopper with Triton < 3.7.1
                    print(f"fla {rule} {mode} {shape}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    peer_ms = None
                ratio = f"{ms / peer_ms:.2f}x" if peer_ms else "-"
                rows.append([rule, mode, f"B{B} T{T} H{H} D{D}", f"{ms:.3f}", f"{peer_ms:.3f}" if peer_ms else "-",
                             ratio, f"{sdpa:.3f}", f"{ms / sdpa:.2f}x"])
                plot.setdefault((rule, mode), []).append((T * B, ms))
                print(" | ".join(rows[-1]), flush=True)
    header = ["rule", "mode", "shape", "hf-fwp ms", "fla ms", "hf-fwp / fla", "SDPA ms", "hf-fwp / SDPA"]
    table = markdown_table(header, rows)
    note = (f"{card}; torch {torch.__version__}, triton {triton.__version__}; {args.dtype} inputs, fp32 states; "
            "medians of triton.testing.do_bench. Ratios below 1 favour hf-fwp. fla peer: "
            + ("present" if fla("linear") is not None else "not installed"))
    print("\n" + table + "\n\n" + note)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "ops_gpu_" + card.replace(" ", "_")
    corr_md = ("Correctness (compiled Triton vs naive recurrence, fp32):\n\n"
               + markdown_table(["rule", "shape", "max rel err"], corr) + "\n\n") if corr else ""
    (args.out / f"{stem}.md").write_text(corr_md + table + "\n\n" + note + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [r[0] + " " + r[1] + " " + r[2] for r in rows]
    ax.barh(range(len(rows)), [float(r[3]) for r in rows], label="hf-fwp")
    ax.barh([i + 0.4 for i in range(len(rows))], [float(r[4]) if r[4] != "-" else 0 for r in rows], height=0.4,
            label="fla 0.6")
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.set(xlabel="ms", title=f"FWP ops on {card}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=120)
    print(f"wrote {args.out / (stem + '.md')}")


if __name__ == "__main__":
    main()
