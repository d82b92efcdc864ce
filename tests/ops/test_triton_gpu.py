"""Compiled Triton kernels at realistic shapes on a CUDA GPU (skipped without one).

Reference: the pure-torch chunk path in float32 on the same (bf16-rounded) inputs; that path is itself tested
against the token-by-token recurrence. Tolerances, as ratios of the error's RMS to the reference's RMS:

* fp32 inputs (exact ``ieee`` dots): 1e-4 for outputs, final states and every gradient;
* bf16 inputs (bf16 tensor-core operands, fp32 accumulation, chunk states stored in bf16): 1.5e-2 for outputs and
  final states, 4e-2 for gradients (dg: 6e-2, it is a long sum of per-token terms).
"""

import pytest
import torch
import torch.nn.functional as F

from hf_fwp.ops import delta_rule, linear_attention

pytestmark = [pytest.mark.triton, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _inputs(B, T, H, K, V, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    x = dict(q=r(B, T, H, K), k=F.normalize(r(B, T, H, K), dim=-1), v=r(B, T, H, V),
             beta=torch.rand(B, T, H, device="cuda", generator=gen),
             g=F.logsigmoid(r(B, T, H) + 4.0) * 0.5)
    x = {n: t.to(dtype) for n, t in x.items()}
    x["initial_state"] = r(B, H, K, V) * 0.1
    return x


def _run(op, x, backend, gated, seed=1):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items() if gated or n != "g"}
    kw = dict(g=leaves.get("g"), initial_state=leaves["initial_state"], output_final_state=True, backend=backend)
    if op == "delta":
        o, S = delta_rule(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], **kw)
    else:
        leaves.pop("beta")
        o, S = linear_attention(leaves["q"], leaves["k"], leaves["v"], **kw)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    do = torch.randn(o.shape, device="cuda", generator=gen)
    dS = torch.randn(S.shape, device="cuda", generator=gen)
    ((o.float() * do).sum() + (S * dS).sum()).backward()
    return {"o": o.float(), "S": S, **{"d" + n: t.grad.float() for n, t in leaves.items()}}


def _rms_ratio(a, e):
    return ((a - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp_min(1e-12)).item()


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("op", ["delta", "linear"])
@pytest.mark.parametrize("K, V", [(128, 128), (256, 256), (128, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_realistic_shapes_match_fp32_chunk_path(dtype, K, V, op, gated):
    x = _inputs(2, 4096, 4, K, V, dtype)
    expected = _run(op, {n: t.float() for n, t in x.items()}, "chunk", gated)
    actual = _run(op, x, "triton", gated)
    for name, e in expected.items():
        if dtype == torch.float32:
            tol = 1e-4
        else:
            tol = 1.5e-2 if name in ("o", "S") else 6e-2 if name == "dg" else 4e-2
        a = actual[name]
        assert torch.isfinite(a).all(), name
        err = _rms_ratio(a, e)
        assert err <= tol, f"{op} gated={gated} {dtype} K={K} V={V} {name}: rms error ratio {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("op", ["delta", "linear"])
def test_varlen_realistic(op):
    # Packed sequences of uneven lengths run natively (no padding) and equal separate calls.
    x = _inputs(1, 5000, 4, 128, 128, torch.bfloat16, seed=3)
    cu = torch.tensor([0, 1000, 1017, 4100, 5000], device="cuda", dtype=torch.int32)
    x["initial_state"] = torch.zeros(4, 4, 128, 128, device="cuda")
    call = delta_rule if op == "delta" else linear_attention
    args = (lambda s: (x["q"][:, s], x["k"][:, s], x["v"][:, s], x["beta"][:, s])) if op == "delta" else \
        (lambda s: (x["q"][:, s], x["k"][:, s], x["v"][:, s]))
    whole = slice(None)
    o, S = call(*args(whole), g=x["g"], cu_seqlens=cu, output_final_state=True, backend="triton")
    for i in range(4):
        s = slice(int(cu[i]), int(cu[i + 1]))
        oi, Si = call(*args(s), g=x["g"][:, s], output_final_state=True, backend="triton")
        assert _rms_ratio(o[:, s].float(), oi.float()) < 1e-2
        assert _rms_ratio(S[i], Si[0]) < 1e-2
