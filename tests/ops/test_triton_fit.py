"""Ahead-of-time fit of every Triton launch, checked on CPU (Triton compiles for any NVIDIA target without a GPU).

For both families, head dims 128 and 256 (and K != V; fp32 at K = V only, its tiles do not depend on the shape
otherwise), bf16 and fp32, gated and ungated, with initial and final
states, forward and backward, chunked, fused recurrent and the decoding step: each launch's safe config (the one the interpreter and
``HF_FWP_AUTOTUNE=0`` use, and the floor of the autotuner's list) must need no more shared memory per block than
sm_86/sm_89 allow (101,376 B, the smallest limit; sm_80's 166,912 B follows from it since both compile through the
same mma.sync path) and sm_90 (232,448 B), and bf16 inputs must reach half-precision tensor-core instructions.
The compiler runs in a subprocess: this suite sets TRITON_INTERPRET, under which kernels cannot be compiled.
"""

import json
import os
import subprocess
import sys

import pytest

from hf_fwp.ops.triton_fit import SMEM_LIMIT

pytestmark = pytest.mark.triton

DIMS = ["128x128", "256x256", "128x256", "256x128"]
FP32_DIMS = ["128x128", "256x256"]
TARGETS = [86, 90]
# Kernels that multiply tiles (the rest are scans and per-token recurrences on CUDA cores).
DOT_KERNELS = {"kkt_solve_kernel", "recompute_wu_kernel", "state_fwd_kernel", "state_bwd_kernel", "wy_bwd_kernel",
               "chunk_output_kernel", "chunk_dv_kernel", "chunk_dqk_kernel", "_chunk_state_fwd_kernel",
               "_chunk_state_bwd_kernel"}
EXPECTED = {
    "delta": DOT_KERNELS - {"_chunk_state_fwd_kernel", "_chunk_state_bwd_kernel"}
    | {"chunk_local_cumsum_kernel", "reverse_cumsum_kernel", "fused_recurrent_fwd_kernel", "fused_recurrent_bwd_kernel"},
    "linear": {"chunk_output_kernel", "chunk_dv_kernel", "chunk_dqk_kernel", "_chunk_state_fwd_kernel",
               "_chunk_state_bwd_kernel", "chunk_local_cumsum_kernel", "reverse_cumsum_kernel",
               "_fused_recurrent_fwd_kernel", "_fused_recurrent_bwd_kernel"},
}
for _kernels in EXPECTED.values():
    _kernels.add("fwp_step_kernel")  # the decoding step, one kernel with a constexpr variant per rule


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "hf_fwp.ops.triton_fit", "--quiet", "--json", str(out),
           "--targets", *map(str, TARGETS), "--dims", *DIMS, "--fp32-dims", *FP32_DIMS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.exists(), proc.stderr[-3000:]
    return json.loads(out.read_text()), proc


def test_every_launch_compiles_and_fits(rows):
    rows, proc = rows
    errors = [r for r in rows if "error" in r]
    assert not errors, errors[:5]
    over = [f"{r['family']}.{r['kernel']} K={r['K']} V={r['V']} {r['dtype']} gated={r['gated']} sm_{r['cc']}: "
            f"{r['shared']} B > {SMEM_LIMIT[r['cc']]} B" for r in rows if r["shared"] > SMEM_LIMIT[r["cc"]]]
    assert not over, "\n".join(over)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_kernel_and_variant_was_compiled(rows):
    rows, _ = rows
    # Launches shared by both families (triton_common, labelled "shared") are compiled once.
    seen = {r["kernel"] for r in rows}
    for family, kernels in EXPECTED.items():
        assert kernels <= seen, (family, kernels - seen)
    # Every (dims, dtype, gates) combination reached the compiler for the sequential passes of both families.
    for kernel in ("state_bwd_kernel", "_chunk_state_bwd_kernel", "chunk_dqk_kernel"):
        combos = {(r["K"], r["V"], r["dtype"], r["gated"]) for r in rows if r["kernel"] == kernel}
        assert len(combos) == (len(DIMS) + len(FP32_DIMS)) * 2, (kernel, sorted(combos))


def test_bf16_inputs_reach_half_precision_tensor_cores(rows):
    rows, _ = rows
    missing = [f"{r['family']}.{r['kernel']} K={r['K']} sm_{r['cc']}" for r in rows
               if r["kernel"] in DOT_KERNELS and r["dtype"] == "bfloat16" and r["wgmma_half"] + r["mma_half"] == 0]
    assert not missing, missing
    # Hopper's warpgroup MMA is used where the tiles allow it (64-row tiles, 4 warps).
    hopper = {r["kernel"] for r in rows if r["cc"] == 90 and r["dtype"] == "bfloat16" and r["wgmma_half"] > 0}
    assert {"state_fwd_kernel", "state_bwd_kernel", "chunk_output_kernel", "chunk_dqk_kernel"} <= hopper, hopper


def test_an_oversized_config_is_reported():
    # The check itself can fail: a linear-attention state tile of 256 x 256 with a deep pipeline outgrows sm_86.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import json, triton, torch\n"
        "from hf_fwp.ops import triton_fit\n"
        "from hf_fwp.modeling import ops_linear_attn_triton as lt\n"
        "launches = triton_fit._record('linear', 256, 256, 'bfloat16', True, 'chunk')\n"
        "kernel, args, _ = next(l for l in launches if l[0] is lt._chunk_state_fwd_kernel)\n"
        "cfg = triton.Config({'BK': 256, 'BV': 256}, num_warps=4, num_stages=4)\n"
        "print(json.dumps(triton_fit.compile_spec(triton_fit._spec(kernel, args, cfg), 86)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["shared"] > SMEM_LIMIT[86], res


def test_the_decoding_step_keeps_its_state_in_registers(rows):
    rows, _ = rows
    step = [r for r in rows if r["kernel"] == "fwp_step_kernel"]
    assert {(r["K"], r["family"]) for r in step} >= {(256, "delta"), (256, "linear"), (128, "delta")}
    # The state block is read once and written once per token: a spill would double that traffic.
    spilled = [f"K={r['K']} V={r['V']} {r['dtype']} sm_{r['cc']}: {r['local']} B" for r in step if r["local"]]
    assert not spilled, spilled
