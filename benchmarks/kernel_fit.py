"""Shared memory, registers and spills of every Triton launch per GPU target, compiled ahead of time on CPU.

    python benchmarks/kernel_fit.py                     # all targets, head dims 64-256, bf16 + fp32, safe configs
    python benchmarks/kernel_fit.py --all-configs       # every autotune candidate too (slow: minutes per target)
    PYTHONPATH=/tmp/t36 python benchmarks/kernel_fit.py --out-name kernel_fit_triton36   # another Triton

Writes ``results/<out-name>.md`` (a summary per kernel and target, then every compiled launch) and a PNG of each
kernel's peak shared memory as a fraction of each target's limit. Runs without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.pop("TRITON_INTERPRET", None)  # before anything defines a kernel
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from common import RESULTS, markdown_table  # noqa: E402

from hf_fwp.ops.triton_fit import SMEM_LIMIT, TARGET_NAME, collect, markdown  # noqa: E402


def summary(rows) -> tuple[str, dict]:
    peaks: dict = {}
    for r in rows:
        if "error" in r:
            continue
        key = (r["family"] + "." + r["kernel"], r["cc"])
        p = peaks.setdefault(key, dict(shared=0, regs=0, local=0, where=""))
        if r["shared"] >= p["shared"]:
            p.update(shared=r["shared"], where=f"{r['K']}x{r['V']} {r['dtype']} {'gated' if r['gated'] else 'plain'}")
        p["regs"] = max(p["regs"], r.get("regs", 0))
        p["local"] = max(p["local"], r.get("local", 0))
    table = [[k, f"sm_{cc}", f"{p['shared']:,}", f"{SMEM_LIMIT[cc]:,}", f"{p['shared'] / SMEM_LIMIT[cc]:.0%}",
              p["where"], p["regs"], p["local"]] for (k, cc), p in sorted(peaks.items())]
    head = ["kernel", "target", "peak shared B", "limit B", "of limit", "at", "max regs", "max local B"]
    return markdown_table(head, table), peaks


def main():
    import triton

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, nargs="+", default=[80, 86, 90])
    ap.add_argument("--dims", nargs="+", default=["64x64", "128x128", "256x256", "128x256", "256x128"])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--families", nargs="+", default=["delta", "linear"], choices=["delta", "linear"])
    ap.add_argument("--all-configs", action="store_true")
    ap.add_argument("--out-name", default="kernel_fit")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    cases = [(int(d.split("x")[0]), int(d.split("x")[1]), dt) for dt in args.dtypes for d in args.dims]
    rows = collect(cases, args.targets, args.all_configs, families=tuple(args.families))
    table, peaks = summary(rows)
    over = [r for r in rows if r["config"] == 0 and not r["fits"]]
    note = (f"Triton {triton.__version__}, compiled ahead of time on CPU with real-launch alignment hints; targets: "
            + ", ".join(f"{TARGET_NAME[cc]} limit {SMEM_LIMIT[cc]:,} B" for cc in args.targets)
            + f". {len(rows)} compiled launches, {len(over)} safe configs over a limit. 'local' is spill + stack "
            "bytes per thread (cuobjdump). Shapes: K x V in " + ", ".join(args.dims) + ".")
    print(table + "\n\n" + note)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.out_name}.md").write_text(
        "## Peak per kernel and target (safe configs" + (" and all candidates" if args.all_configs else "")
        + ")\n\n" + table + "\n\n" + note + "\n\n## Every compiled launch\n\n" + markdown(rows) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = sorted({k for k, _ in peaks})
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(kernels) + 1.5))
    width = 0.8 / len(args.targets)
    for i, cc in enumerate(args.targets):
        vals = [peaks.get((k, cc), {}).get("shared", 0) / SMEM_LIMIT[cc] for k in kernels]
        ax.barh([j + i * width for j in range(len(kernels))], vals, height=width, label=TARGET_NAME[cc])
    ax.axvline(1.0, color="red", lw=1)
    ax.set_yticks([j + 0.4 - width / 2 for j in range(len(kernels))], kernels, fontsize=7)
    ax.set(xlabel="peak shared memory / per-block limit", title=f"Triton {triton.__version__}: kernel fit")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / f"{args.out_name}.png", dpi=120)
    print(f"wrote {args.out / (args.out_name + '.md')}")
    sys.exit(1 if over else 0)


if __name__ == "__main__":
    main()
