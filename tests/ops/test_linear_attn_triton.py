"""Triton (gated) linear attention vs the token-by-token float32 spec: outputs, final states and gradients.

Without a GPU these run in Triton's CPU interpreter (see conftest.py), so shapes stay small.
"""

from types import SimpleNamespace

import pytest
import torch

from hf_fwp.ops import linear_attention
from hf_fwp.modeling.ops_linear_attn_reference import naive_linear_attention
from tests.conftest import DEVICE
from tests.ops.helpers import assert_close, make_inputs, run

triton_mod = pytest.importorskip("hf_fwp.modeling.ops_linear_attn_triton")
chunk_fn = triton_mod.chunk_triton_linear_attention
fused_fn = triton_mod.fused_recurrent_linear_attention

pytestmark = pytest.mark.triton

FP32_TOL = 1e-4


def _check(fn, x, rtol=FP32_TOL, what="", **kwargs):
    expected = run(naive_linear_attention, x, **kwargs)
    actual = run(fn, x, **kwargs)
    assert_close(actual, expected, rtol, what)


@pytest.mark.parametrize("T", [1, 7, 64, 65, 130])
@pytest.mark.parametrize("gate", [None, "strong", "mild"])
@pytest.mark.parametrize("initial_state", [False, True])
def test_chunk_matches_naive(T, gate, initial_state):
    x = make_inputs(2, T, 2, 16, 32, gate=gate, initial_state=initial_state, device=DEVICE, seed=T)
    _check(chunk_fn, x, what=f"chunk T={T} gate={gate}")


@pytest.mark.parametrize("T", [1, 7, 40])
@pytest.mark.parametrize("gate", [None, "strong", "mild"])
@pytest.mark.parametrize("initial_state", [False, True])
def test_fused_recurrent_matches_naive(T, gate, initial_state):
    x = make_inputs(2, T, 2, 16, 32, gate=gate, initial_state=initial_state, device=DEVICE, seed=T + 1)
    _check(fused_fn, x, what=f"fused T={T} gate={gate}")


@pytest.mark.parametrize("fn, T", [(chunk_fn, 130), (fused_fn, 20)])
def test_non_power_of_two_dims(fn, T):
    x = make_inputs(2, T, 2, 24, 20, gate="strong", initial_state=True, device=DEVICE)
    _check(fn, x, what="K=24 V=20")


@pytest.mark.parametrize("fn, T", [(chunk_fn, 70), (fused_fn, 9)])
def test_several_key_and_value_blocks(fn, T):
    # K, V > 64 split into two tiles each in the chunk kernels (and two V blocks in the fused one).
    x = make_inputs(1, T, 1, 80, 72, gate="mild", initial_state=True, device=DEVICE)
    _check(fn, x, what="K=80 V=72", scale=0.3)


@pytest.mark.parametrize("fn, T, dtype", [(chunk_fn, 130, torch.bfloat16), (fused_fn, 33, torch.bfloat16),
                                          (chunk_fn, 70, torch.float16)])
def test_half_precision_inputs(fn, T, dtype):
    x = make_inputs(2, T, 2, 16, 32, gate="mild", initial_state=True, dtype=dtype, device=DEVICE)
    o, S = fn(x["q"], x["k"], x["v"], g=x["g"], initial_state=x["initial_state"], output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    _check(fn, x, rtol=3e-2, what=str(dtype))


@pytest.mark.parametrize("fn, lengths", [(chunk_fn, [5, 70, 64, 1]), (fused_fn, [3, 40, 64])])
@pytest.mark.parametrize("gate", [None, "strong"])
def test_varlen_equals_separate_sequences(fn, lengths, gate):
    cu = torch.tensor([0] + lengths).cumsum(0).to(device=DEVICE, dtype=torch.int32)
    x = make_inputs(1, sum(lengths), 2, 16, 32, gate=gate, device=DEVICE, seed=3)
    x["initial_state"] = torch.randn(len(lengths), 2, 16, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    _check(fn, x, what="varlen", cu_seqlens=cu)


@pytest.mark.parametrize("fn, T", [(chunk_fn, 130), (fused_fn, 7)])
def test_gradients_without_final_state(fn, T):
    """Only o gets an upstream gradient; the saved final state still feeds no spurious dg term."""
    x = make_inputs(2, T, 2, 16, 32, gate="strong", initial_state=True, device=DEVICE, seed=5)
    grads = []
    for f in (naive_linear_attention, fn):
        leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
        o, S = f(leaves["q"], leaves["k"], leaves["v"], g=leaves["g"], initial_state=leaves["initial_state"])
        assert S is None
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(6)).to(o)
        (o * do).sum().backward()
        grads.append({"o": o.detach(), **{"d" + n: t.grad for n, t in leaves.items()}})
    assert_close(grads[1], grads[0], FP32_TOL, "no final state")


def test_dispatch_picks_fused_for_short_and_chunk_for_long(monkeypatch):
    used = []
    for name in ("_ChunkLinearAttentionFunction", "_FusedRecurrentLinearAttentionFunction"):
        fn = getattr(triton_mod, name)
        spy = lambda *a, _name=name, _fn=fn: (used.append(_name), _fn.apply(*a))[1]  # noqa: E731
        monkeypatch.setattr(triton_mod, name, SimpleNamespace(apply=spy))
    for T in (1, 64, 65):
        x = make_inputs(1, T, 1, 16, 16, gate="mild", device=DEVICE)
        o, _ = triton_mod.triton_linear_attention(x["q"], x["k"], x["v"], g=x["g"])
        expected, _ = naive_linear_attention(x["q"], x["k"], x["v"], g=x["g"])
        assert_close({"o": o}, {"o": expected}, FP32_TOL, f"T={T}")
    assert used == ["_FusedRecurrentLinearAttentionFunction"] * 2 + ["_ChunkLinearAttentionFunction"]


def test_public_op_backend_triton():
    x = make_inputs(2, 70, 2, 16, 32, gate="strong", initial_state=True, device=DEVICE)
    _check(lambda *a, **kw: linear_attention(*a, backend="triton", **kw), x, what="linear_attention(triton)")


def test_long_sequence_strong_decay_is_finite_and_exact():
    x = make_inputs(1, 257, 1, 16, 16, gate="strong", initial_state=True, device=DEVICE, seed=7)
    x["g"][0, 100:200] = -8.0  # a long stretch that wipes the state many times over
    _check(chunk_fn, x, what="T=257 strong")


def test_float64_is_rejected():
    x = make_inputs(1, 4, 1, 16, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="backend='chunk'"):
        triton_mod.triton_linear_attention(x["q"], x["k"], x["v"])


@pytest.mark.parametrize("fn, T", [(chunk_fn, 70), (fused_fn, 7)])
def test_gradients_through_final_state_only(fn, T):
    x = make_inputs(1, T, 2, 16, 32, gate="strong", initial_state=True, device=DEVICE, seed=8)
    grads = []
    for f in (naive_linear_attention, fn):
        leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
        _, S = f(leaves["q"], leaves["k"], leaves["v"], g=leaves["g"], initial_state=leaves["initial_state"],
                 output_final_state=True)
        dS = torch.randn(S.shape, generator=torch.Generator().manual_seed(9)).to(S)
        (S * dS).sum().backward()
        # q gets no gradient at all from the spec; zeros from the kernels.
        grads.append({"S": S.detach(), **{"d" + n: torch.zeros_like(t) if t.grad is None else t.grad
                                          for n, t in leaves.items()}})
    assert_close(grads[1], grads[0], FP32_TOL, "final state only")
