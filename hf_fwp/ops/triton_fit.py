"""Ahead-of-time fit check of every Triton launch, without a GPU.

The launches are not described twice: the public ops run forward and backward on CPU tensors while
:data:`hf_fwp.modeling.ops_triton_common.RECORDER` captures each ``launch`` (kernel, arguments, candidate configs) instead of
running it. Each distinct launch is then compiled by Triton for a GPU target (Triton ships ``ptxas``) with the
alignment hints a real launch gets (pointers and multiples of 16), and its shared memory, registers, local memory
(spills) and tensor-core instructions are read from the compiled kernel.

Must run without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` functions at definition time):

    python -m hf_fwp.ops.triton_fit --targets 80 86 90 --dims 64x64 128x128 256x256 128x256 256x128

prints one row per (kernel, shape, dtype, gates, target) -- chunked, fused recurrent and decoding-step kernels -- for the first (safe) config and, with ``--all-configs``,
for every autotune candidate. ``--json FILE`` writes the rows. Exit status 1 when a safe config does not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

# Per-block opt-in shared memory limits (bytes) by compute capability.
SMEM_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
TARGET_NAME = {80: "sm_80 (A100)", 86: "sm_86 (RTX 30, A10)", 89: "sm_89 (RTX 40, L4, L40S)",
               90: "sm_90 (H100, H200)"}
_DTYPE = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.int32": "i32",
          "torch.int64": "i64"}


def _record(family: str, K: int, V: int, dtype: str, gated: bool, path: str) -> list:
    """Run one op forward + backward with recording on; returns the captured launches."""
    import torch

    from hf_fwp.modeling import ops_triton_common as triton_common
    from hf_fwp.modeling.ops_delta_rule_triton import fused_recurrent_delta_rule, triton_chunk_delta_rule
    from hf_fwp.modeling.ops_linear_attn_triton import chunk_triton_linear_attention, fused_recurrent_linear_attention

    # Realistic sizes for the integer arguments' alignment (T = 4096, H = 16); fused paths run short sequences.
    B, H = 1, 16
    if path == "step":  # the decoding step: one token, forward only, state updated in place
        from hf_fwp.modeling.ops_step_triton import triton_fwp_step

        dt = getattr(torch, dtype)
        q, k, v = torch.zeros(B, 1, H, K, dtype=dt), torch.zeros(B, 1, H, K, dtype=dt), torch.zeros(B, 1, H, V, dtype=dt)
        gates = torch.zeros(B, 1, H, dtype=dt)
        triton_common.RECORDER = []
        try:
            with torch.no_grad():
                triton_fwp_step(q, k, v, torch.zeros(B, H, K, V), beta=gates if family == "delta" else None,
                                g=gates if gated else None, scale=1.0, qk_l2norm=True)
            return triton_common.RECORDER
        finally:
            triton_common.RECORDER = None
    T = 4096 if path == "chunk" else 64
    dt = getattr(torch, dtype)
    with torch.no_grad():
        q, k = torch.zeros(B, T, H, K, dtype=dt), torch.zeros(B, T, H, K, dtype=dt)
        v = torch.zeros(B, T, H, V, dtype=dt)
        beta = torch.zeros(B, T, H, dtype=dt)
        g = torch.zeros(B, T, H, dtype=dt) if gated else None
        h0 = torch.zeros(B, H, K, V)
    leaves = [t.requires_grad_() for t in (q, k, v, beta, h0) + ((g,) if gated else ())]
    fn = {("delta", "chunk"): triton_chunk_delta_rule, ("delta", "fused"): fused_recurrent_delta_rule,
          ("linear", "chunk"): chunk_triton_linear_attention, ("linear", "fused"): fused_recurrent_linear_attention}
    fn = fn[(family, path)]
    triton_common.RECORDER = []
    try:
        if family == "delta":
            o, S = fn(q, k, v, beta, g=g, initial_state=h0, output_final_state=True)
        else:
            o, S = fn(q, k, v, g=g, initial_state=h0, output_final_state=True)
        torch.autograd.backward([o, S], [torch.zeros_like(o), torch.zeros_like(S)], inputs=leaves)
        return triton_common.RECORDER
    finally:
        triton_common.RECORDER = None


def _spec(kernel, args: dict, cfg) -> dict:
    """A picklable compile spec for one launch under one config."""
    import torch

    params = {p.name: p for p in kernel.params}
    values = {**args, **cfg.kwargs}
    signature, constexprs, aligned = {}, {}, []
    for i, name in enumerate(kernel.arg_names):
        val = values[name]
        if params[name].is_constexpr or val is None:
            signature[name] = "constexpr"
            # tl.dtype constexprs travel by name (the specs go to worker processes).
            constexprs[name] = "tl:" + val.name if hasattr(val, "primitive_bitwidth") else val
        elif isinstance(val, torch.Tensor):
            signature[name] = "*" + _DTYPE[str(val.dtype)]
            aligned.append(i)
        elif isinstance(val, bool):
            signature[name] = "i1"
        elif isinstance(val, int):
            signature[name] = "i32" if abs(val) < 2**31 else "i64"
            if val % 16 == 0:
                aligned.append(i)
        else:
            signature[name] = "fp32"
    return dict(module=kernel.fn.__module__, kernel=kernel.fn.__name__, signature=signature, constexprs=constexprs,
                aligned=aligned, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def compile_spec(spec: dict, cc: int) -> dict:
    """Compile a spec for compute capability ``cc``; returns shared bytes, registers, local bytes and mma counts."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    constexprs = {n: (tl.dtype(v[3:]) if isinstance(v, str) and v.startswith("tl:") else v)
                  for n, v in spec["constexprs"].items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i in spec["aligned"]}
    try:
        compiled = triton.compile(
            triton.compiler.ASTSource(fn=kernel, signature=spec["signature"], constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", cc, 32),
            options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]},
        )
    except Exception as e:  # a compile error is a result too (e.g. a config Triton cannot lower)
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    ptx = compiled.asm["ptx"]
    half = r"\.(?:bf16|f16)"
    res = dict(shared=compiled.metadata.shared,
               wgmma_half=len(re.findall(r"wgmma\.mma_async\S*" + half, ptx)),
               mma_half=len(re.findall(r"mma\.sync\.aligned\S*" + half, ptx)),
               mma_any=len(re.findall(r"(?:wgmma\.mma_async|mma\.sync\.aligned)", ptx)))
    res.update(_resource_usage(compiled.asm["cubin"]))
    return res


def _resource_usage(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return dict(regs=int(m.group(1)), local=int(m.group(2)) + int(m.group(3))) if m else {}


def _work(item):
    key, spec, cc = item
    return key, cc, compile_spec(spec, cc)


def collect(cases, targets, all_configs=False, workers=None, families=("delta", "linear")):
    """Record, deduplicate and compile ``cases`` (``(K, V, dtype name)`` tuples); returns a list of row dicts."""
    items, seen = [], set()
    for family in families:
        for K, V, dtype in cases:
            for gated in (False, True):
                for path in ("chunk", "fused", "step"):
                    for kernel, args, cfgs in _record(family, K, V, dtype, gated, path):
                        for ci, cfg in enumerate(cfgs if all_configs else cfgs[:1]):
                            spec = _spec(kernel, args, cfg)
                            sig = json.dumps([spec["kernel"], spec["signature"], spec["constexprs"],
                                              spec["num_warps"], spec["num_stages"]], sort_keys=True, default=str)
                            if sig in seen:
                                continue
                            seen.add(sig)
                            # Kernels of triton_common serve both families: label them by where they live.
                            owner = "shared" if spec["module"].endswith("ops_triton_common") else family
                            meta = dict(family=owner, kernel=spec["kernel"], K=K, V=V, dtype=dtype, gated=gated,
                                        config=ci, cfg=f"{cfg.kwargs or ''} w{cfg.num_warps} s{cfg.num_stages}".strip())
                            for cc in targets:
                                items.append((json.dumps(meta), spec, cc))
    rows = []
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        for key, cc, res in pool.map(_work, items, chunksize=4):
            row = dict(json.loads(key), cc=cc, limit=SMEM_LIMIT[cc], **res)
            row["fits"] = "error" not in row and row["shared"] <= row["limit"]
            rows.append(row)
    return rows


def markdown(rows) -> str:
    head = "| kernel | K x V | dtype | gates | config | target | shared B | limit B | regs | local B | tensor-core ops |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        tc = ("error" if "error" in r else
              f"{r['wgmma_half']} wgmma + {r['mma_half']} mma (half)" if r["dtype"] != "float32" else
              f"{r['mma_any']} (fp32)")
        shared = r.get("shared", r.get("error", ""))
        flag = "" if r["fits"] else " **over**"
        lines.append(f"| {r['family']}.{r['kernel']} | {r['K']}x{r['V']} | {r['dtype']} | {'g' if r['gated'] else '-'} "
                     f"| {r['cfg']} | sm_{r['cc']} | {shared}{flag} | {r['limit']} | {r.get('regs', '')} | "
                     f"{r.get('local', '')} | {tc} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, nargs="+", default=[80, 86, 90])
    ap.add_argument("--dims", nargs="+", default=["64x64", "128x128", "256x256", "128x256", "256x128"])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--fp32-dims", nargs="+", default=None, help="dims for float32 (default: --dims)")
    ap.add_argument("--families", nargs="+", default=["delta", "linear"])
    ap.add_argument("--all-configs", action="store_true", help="also compile every autotune candidate")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the rows to this file")
    ap.add_argument("--quiet", action="store_true", help="no table on stdout")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; silences its 3.9 notice
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("triton_fit: unset TRITON_INTERPRET (the interpreter cannot compile ahead of time).")
    cases = []
    for dtype in args.dtypes:
        for d in (args.fp32_dims if dtype == "float32" and args.fp32_dims else args.dims):
            K, V = (int(x) for x in d.split("x"))
            cases.append((K, V, dtype))
    rows = collect(cases, args.targets, args.all_configs, args.workers, tuple(args.families))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if not args.quiet:
        print(markdown(rows))
    bad = [r for r in rows if r["config"] == 0 and not r["fits"]]
    for r in bad:
        print(f"DOES NOT FIT: {r['family']}.{r['kernel']} K={r['K']} V={r['V']} {r['dtype']} gated={r['gated']} "
              f"sm_{r['cc']}: {r.get('shared', r.get('error'))} > {r['limit']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
