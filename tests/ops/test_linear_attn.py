"""(Gated) linear attention: naive spec checks, chunk path vs naive, varlen, dtypes and long-sequence stability."""

import pytest
import torch

from hf_fwp.ops import linear_attention
from hf_fwp.modeling.ops_linear_attn_reference import chunk_linear_attention, naive_linear_attention
from tests.ops.helpers import assert_close, make_inputs, run


def test_naive_matches_hand_written_two_steps():
    q = torch.tensor([[1.0, 2.0], [-1.0, 0.5]]).view(1, 2, 1, 2)
    k = torch.tensor([[0.5, 1.0], [2.0, 0.0]]).view(1, 2, 1, 2)
    v = torch.tensor([[1.0, -2.0, 3.0], [0.0, 1.0, 1.0]]).view(1, 2, 1, 3)
    g = torch.log(torch.tensor([0.5, 0.1])).view(1, 2, 1)
    S0 = torch.ones(1, 1, 2, 3)
    o, S = naive_linear_attention(q, k, v, g=g, scale=0.5, initial_state=S0, output_final_state=True)
    S1 = 0.5 * torch.ones(2, 3) + torch.outer(torch.tensor([0.5, 1.0]), torch.tensor([1.0, -2.0, 3.0]))
    S2 = 0.1 * S1 + torch.outer(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0, 1.0]))
    expected = torch.stack([S1.T @ (0.5 * torch.tensor([1.0, 2.0])), S2.T @ (0.5 * torch.tensor([-1.0, 0.5]))])
    torch.testing.assert_close(o.view(2, 3), expected)
    torch.testing.assert_close(S.view(2, 3), S2)


@pytest.mark.parametrize("gate", [None, "mild"])
def test_naive_gradcheck_float64(gate):
    x = make_inputs(1, 5, 2, 3, 4, gate=gate, initial_state=True, dtype=torch.float64)
    x["initial_state"] = x["initial_state"].double()
    names = list(x)

    def f(*args):
        kw = dict(zip(names, args))
        return naive_linear_attention(kw["q"], kw["k"], kw["v"], g=kw.get("g"), initial_state=kw["initial_state"],
                                      output_final_state=True)

    assert torch.autograd.gradcheck(f, [x[n].requires_grad_() for n in names])


@pytest.mark.parametrize("gate", [None, "strong"])
def test_chunk_gradcheck_float64(gate):
    x = make_inputs(1, 11, 1, 3, 2, gate=gate, initial_state=True, dtype=torch.float64)
    x["initial_state"] = x["initial_state"].double()
    names = list(x)

    def f(*args):
        kw = dict(zip(names, args))
        return chunk_linear_attention(kw["q"], kw["k"], kw["v"], g=kw.get("g"), chunk_size=4,
                                      initial_state=kw["initial_state"], output_final_state=True)

    assert torch.autograd.gradcheck(f, [x[n].requires_grad_() for n in names])


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 203])
@pytest.mark.parametrize("gate", [None, "mild", "strong"])
@pytest.mark.parametrize("initial_state", [False, True])
def test_chunk_matches_naive(T, gate, initial_state):
    x = make_inputs(2, T, 3, 16, 12, gate=gate, initial_state=initial_state, seed=T)
    expected = run(linear_attention, x, backend="naive")
    assert_close(run(linear_attention, x, backend="chunk"), expected, 2e-5, "chunk")


@pytest.mark.parametrize("chunk_size", [16, 32, 128])
def test_chunk_size_is_free(chunk_size):
    x = make_inputs(1, 100, 2, 8, 8, gate="mild", initial_state=True)
    expected = run(linear_attention, x, backend="naive")
    assert_close(run(linear_attention, x, backend="chunk", chunk_size=chunk_size), expected, 2e-5)


def test_bf16_inputs():
    x = make_inputs(2, 90, 2, 16, 16, gate="mild", dtype=torch.bfloat16)
    expected = run(linear_attention, {n: t.float() for n, t in x.items()}, backend="naive")
    o, S = linear_attention(x["q"], x["k"], x["v"], g=x["g"], output_final_state=True, backend="chunk")
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert_close(run(linear_attention, x, backend="chunk"), expected, 3e-2, "bf16")


@pytest.mark.parametrize("backend", ["naive", "chunk"])
def test_varlen_equals_separate_sequences(backend):
    lengths = [5, 70, 1, 33]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    x = make_inputs(1, sum(lengths), 2, 8, 6, gate="mild")
    S0 = torch.randn(len(lengths), 2, 8, 6)
    o, S = linear_attention(x["q"], x["k"], x["v"], g=x["g"], initial_state=S0, output_final_state=True,
                            cu_seqlens=cu, backend=backend)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_i, S_i = naive_linear_attention(x["q"][:, a:b], x["k"][:, a:b], x["v"][:, a:b], g=x["g"][:, a:b],
                                          initial_state=S0[i : i + 1], output_final_state=True)
        torch.testing.assert_close(o[:, a:b], o_i, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(S[i : i + 1], S_i, atol=1e-5, rtol=1e-5)


def test_varlen_gradients_match_naive():
    cu = torch.tensor([0, 9, 80, 100])
    x = make_inputs(1, 100, 2, 8, 6, gate="strong")
    x["initial_state"] = torch.randn(3, 2, 8, 6)
    expected = run(linear_attention, x, backend="naive", cu_seqlens=cu)
    assert_close(run(linear_attention, x, backend="chunk", cu_seqlens=cu), expected, 2e-5)


@pytest.mark.parametrize("gate", [None, "strong"])
def test_long_sequence_is_stable(gate):
    T, prefix = 16384, 300
    x = make_inputs(1, T, 2, 16, 16, gate=gate)
    o, S = linear_attention(x["q"], x["k"], x["v"], g=x.get("g"), output_final_state=True, backend="chunk")
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    o_ref, _ = naive_linear_attention(x["q"][:, :prefix], x["k"][:, :prefix], x["v"][:, :prefix],
                                      g=None if gate is None else x["g"][:, :prefix])
    torch.testing.assert_close(o[:, :prefix], o_ref, atol=1e-4, rtol=1e-4)
    if gate is None:
        # Without decay the final state is the plain sum of all writes: check it exactly (in float64).
        S_sum = torch.einsum("thk,thv->hkv", x["k"][0].double(), x["v"][0].double())
        torch.testing.assert_close(S[0].double(), S_sum, atol=1e-3, rtol=1e-4)
