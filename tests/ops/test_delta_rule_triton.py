"""Triton delta rule (fused recurrent and chunked paths) against the float32 token-by-token spec.

Without a GPU these run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest), so shapes are small.
"""

import pytest
import torch

from hf_fwp.ops import delta_rule
from hf_fwp.modeling import ops_delta_rule_triton as delta_triton
from hf_fwp.modeling.ops_delta_rule_reference import naive_delta_rule
from hf_fwp.modeling.ops_delta_rule_triton import fused_recurrent_delta_rule, triton_chunk_delta_rule, triton_delta_rule
from tests.conftest import DEVICE
from tests.ops.helpers import assert_close, make_inputs, run

pytestmark = pytest.mark.triton

PATHS = {"fused": fused_recurrent_delta_rule, "chunk": triton_chunk_delta_rule, "auto": triton_delta_rule}
RTOL = 1e-4


@pytest.mark.parametrize("beta_max, init", [(1.0, False), (2.0, True)])
@pytest.mark.parametrize("gate", [None, "strong", "mild"])
@pytest.mark.parametrize("T, path", [(1, "fused"), (7, "fused"), (64, "fused"), (65, "fused"),
                                     (1, "chunk"), (7, "chunk"), (64, "chunk"), (65, "chunk"), (130, "chunk")])
def test_matches_naive(T, path, gate, beta_max, init):
    x = make_inputs(2, T, 2, 16, 32, gate=gate, beta_max=beta_max, initial_state=init, device=DEVICE)
    assert_close(run(PATHS[path], x), run(naive_delta_rule, x), RTOL, f"{path} T={T}")


@pytest.mark.parametrize("path, T", [("fused", 70), ("chunk", 203)])
def test_non_power_of_two_dims_and_several_v_blocks(path, T):
    # K = 20 pads to a 32-wide tile; V = 80 spans two 64-wide V blocks, the second one masked. The fused kernel
    # also runs past the length at which triton_delta_rule switches to the chunked one.
    x = make_inputs(1, T, 2, 20, 80, gate="strong", beta_max=2.0, initial_state=True, device=DEVICE, seed=3)
    assert_close(run(PATHS[path], x, scale=0.3), run(naive_delta_rule, x, scale=0.3), RTOL, path)


@pytest.mark.parametrize("T", [40, 65])
def test_auto_path_and_dispatcher(T):
    x = make_inputs(2, T, 2, 16, 32, gate="mild", beta_max=1.0, initial_state=True, device=DEVICE, seed=4)
    expected = run(naive_delta_rule, x)
    assert_close(run(triton_delta_rule, x), expected, RTOL, "auto")
    assert_close(run(delta_rule, x, backend="triton"), expected, RTOL, "delta_rule(backend='triton')")


def test_auto_picks_fused_kernel_up_to_64_tokens(monkeypatch):
    calls = []
    monkeypatch.setattr(delta_triton, "fused_recurrent_delta_rule", lambda *a, **kw: calls.append("fused"))
    monkeypatch.setattr(delta_triton, "triton_chunk_delta_rule", lambda *a, **kw: calls.append("chunk"))
    for T in (1, 64, 65):
        x = make_inputs(1, T, 1, 16, 16, beta_max=1.0, device=DEVICE)
        triton_delta_rule(x["q"], x["k"], x["v"], x["beta"])
    # Packed sequences go by the longest one, not by the packed length.
    x = make_inputs(1, 90, 1, 16, 16, beta_max=1.0, device=DEVICE)
    for offsets in ([0, 45, 90], [0, 20, 90]):
        cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
        triton_delta_rule(x["q"], x["k"], x["v"], x["beta"], cu_seqlens=cu)
    assert calls == ["fused", "fused", "chunk", "fused", "chunk"]


@pytest.mark.parametrize("path, T", [("fused", 20), ("chunk", 100)])
def test_without_final_state(path, T):
    x = make_inputs(2, T, 2, 16, 32, gate="mild", beta_max=1.0, initial_state=True, device=DEVICE, seed=5)
    grads = []
    for fn in (PATHS[path], naive_delta_rule):
        leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
        o, S = fn(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], g=leaves["g"],
                  initial_state=leaves["initial_state"])
        assert S is None
        (o * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).sum().backward()
        grads.append({"o": o.detach(), **{"d" + n: t.grad for n, t in leaves.items()}})
    assert_close(grads[0], grads[1], RTOL, path)


@pytest.mark.parametrize("path", ["fused", "chunk"])
def test_gradient_through_final_state_only(path):
    x = make_inputs(1, 70, 2, 16, 32, gate="strong", beta_max=2.0, initial_state=True, device=DEVICE, seed=6)
    grads = []
    for fn in (PATHS[path], naive_delta_rule):
        leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
        _, S = fn(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], g=leaves["g"],
                  initial_state=leaves["initial_state"], output_final_state=True)
        (S * torch.linspace(-1, 1, S.numel(), device=S.device).view_as(S)).sum().backward()
        grads.append({"S": S.detach(), **{"d" + n: t.grad for n, t in leaves.items()}})
    # q only reads the state: the spec leaves it out of the graph, the kernels return zeros.
    assert grads[1].pop("dq") is None
    assert grads[0].pop("dq").abs().max() == 0
    assert_close(grads[0], grads[1], RTOL, path)


@pytest.mark.parametrize("path, T", [("fused", 30), ("chunk", 90)])
def test_bf16_inputs(path, T):
    x = make_inputs(1, T, 2, 16, 32, gate="mild", beta_max=1.0, dtype=torch.bfloat16, device=DEVICE, seed=7)
    x["initial_state"] = torch.randn(1, 2, 16, 32, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    o, S = PATHS[path](leaves["q"], leaves["k"], leaves["v"], leaves["beta"], g=leaves["g"],
                       initial_state=leaves["initial_state"], output_final_state=True)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    (o.float().sum() + S.sum()).backward()
    assert all(t.grad.dtype == t.dtype for t in leaves.values())
    # The spec on the same bf16-rounded inputs, computed in float32.
    assert_close(run(PATHS[path], x), run(naive_delta_rule, x), 3e-2, f"bf16 {path}")


@pytest.mark.parametrize("path, lengths", [("fused", [5, 17, 1]), ("chunk", [3, 70, 30]), ("auto", [66, 9])])
def test_cu_seqlens_equals_separate_sequences(path, lengths):
    N, T = len(lengths), sum(lengths)
    x = make_inputs(1, T, 2, 16, 32, gate="strong", beta_max=2.0, device=DEVICE, seed=9)
    x["initial_state"] = torch.randn(N, 2, 16, 32, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    # naive_delta_rule runs each packed sequence separately: the cu_seqlens spec.
    assert_close(run(PATHS[path], x, cu_seqlens=cu), run(naive_delta_rule, x, cu_seqlens=cu), RTOL, path)


@pytest.mark.parametrize("K, V", [(256, 32), (128, 16), (32, 256)])
def test_wide_heads(K, V):
    # The sequential passes hold K as up to four 64-row register tiles; these cover 2 and 4 tiles and a wide V.
    x = make_inputs(1, 70, 1, K, V, gate="mild", beta_max=2.0, initial_state=True, device=DEVICE, seed=11)
    assert_close(run(triton_chunk_delta_rule, x), run(naive_delta_rule, x), RTOL, f"K={K} V={V}")


def test_refuses_float64_and_too_wide_keys():
    x = make_inputs(1, 4, 1, 8, 8, beta_max=1.0, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="backend='chunk'"):
        triton_delta_rule(x["q"], x["k"], x["v"], x["beta"])
    x = make_inputs(1, 70, 1, 264, 8, beta_max=1.0, device=DEVICE)
    with pytest.raises(ValueError, match="K <= 256"):
        triton_delta_rule(x["q"], x["k"], x["v"], x["beta"])
    # The dispatcher's "auto" sends such keys to the pure-torch chunk path instead of failing.
    o, _ = delta_rule(x["q"], x["k"], x["v"], x["beta"], backend="auto")
    assert torch.allclose(o, naive_delta_rule(x["q"], x["k"], x["v"], x["beta"])[0], atol=1e-4)
