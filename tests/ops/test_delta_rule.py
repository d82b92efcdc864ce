"""The delta rule: naive spec checks, chunk path vs naive, varlen, dtypes and long-sequence stability."""

import pytest
import torch

from hf_fwp.ops import delta_rule
from hf_fwp.modeling.ops_delta_rule_reference import chunk_delta_rule, naive_delta_rule
from tests.ops.helpers import assert_close, make_inputs, run


def test_naive_matches_hand_written_two_steps():
    # K = V = 2, B = H = 1, scale = 1, with decay: the table rule written out by hand.
    q = torch.tensor([[1.0, 0.0], [0.5, 2.0]]).view(1, 2, 1, 2)
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]]).view(1, 2, 1, 2)
    v = torch.tensor([[2.0, -1.0], [1.0, 3.0]]).view(1, 2, 1, 2)
    beta = torch.tensor([0.5, 1.0]).view(1, 2, 1)
    g = torch.log(torch.tensor([0.5, 0.25])).view(1, 2, 1)
    S0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    o, S = naive_delta_rule(q, k, v, beta, g=g, scale=1.0, initial_state=S0, output_final_state=True)
    # t = 1: A = 0.5 I; A^T k = [0.5, 0]; u = 0.5 ([2, -1] - [0.5, 0]) = [0.75, -0.5]
    S1 = torch.tensor([[0.5 + 0.75, -0.5], [0.0, 0.5]])
    # t = 2: A = 0.25 S1; A^T k = 0.25 * [0.6*1.25, 0.6*-0.5 + 0.8*0.5] = [0.1875, 0.025]
    A = 0.25 * S1
    u = 1.0 * (torch.tensor([1.0, 3.0]) - torch.tensor([0.1875, 0.025]))
    S2 = A + torch.outer(torch.tensor([0.6, 0.8]), u)
    expected_o = torch.stack([S1.T @ torch.tensor([1.0, 0.0]), S2.T @ torch.tensor([0.5, 2.0])])
    torch.testing.assert_close(o.view(2, 2), expected_o)
    torch.testing.assert_close(S.view(2, 2), S2)


@pytest.mark.parametrize("gate", [None, "mild"])
def test_naive_gradcheck_float64(gate):
    x = make_inputs(1, 5, 2, 3, 4, gate=gate, beta_max=1.0, initial_state=True, dtype=torch.float64)
    x["initial_state"] = x["initial_state"].double()
    names = list(x)

    def f(*args):
        kw = dict(zip(names, args))
        o, S = naive_delta_rule(kw["q"], kw["k"], kw["v"], kw["beta"], g=kw.get("g"),
                                initial_state=kw["initial_state"], output_final_state=True)
        return o, S

    assert torch.autograd.gradcheck(f, [x[n].requires_grad_() for n in names])


@pytest.mark.parametrize("gate", [None, "strong"])
def test_chunk_gradcheck_float64(gate):
    x = make_inputs(1, 11, 1, 3, 2, gate=gate, beta_max=2.0, initial_state=True, dtype=torch.float64)
    x["initial_state"] = x["initial_state"].double()
    names = list(x)

    def f(*args):
        kw = dict(zip(names, args))
        return chunk_delta_rule(kw["q"], kw["k"], kw["v"], kw["beta"], g=kw.get("g"), chunk_size=4,
                                initial_state=kw["initial_state"], output_final_state=True)

    assert torch.autograd.gradcheck(f, [x[n].requires_grad_() for n in names])


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 203])
@pytest.mark.parametrize("gate", [None, "mild", "strong"])
@pytest.mark.parametrize("beta_max", [1.0, 2.0])
@pytest.mark.parametrize("initial_state", [False, True])
def test_chunk_matches_naive(T, gate, beta_max, initial_state):
    x = make_inputs(2, T, 3, 16, 12, gate=gate, beta_max=beta_max, initial_state=initial_state, seed=T)
    expected = run(delta_rule, x, backend="naive")
    assert_close(run(delta_rule, x, backend="chunk"), expected, 2e-5, "chunk")


@pytest.mark.parametrize("chunk_size", [16, 32, 128])
def test_chunk_size_is_free(chunk_size):
    x = make_inputs(1, 100, 2, 8, 8, gate="mild", beta_max=1.0, initial_state=True)
    expected = run(delta_rule, x, backend="naive")
    assert_close(run(delta_rule, x, backend="chunk", chunk_size=chunk_size), expected, 2e-5)


def test_bf16_inputs():
    x = make_inputs(2, 90, 2, 16, 16, gate="mild", beta_max=1.0, dtype=torch.bfloat16)
    expected = run(delta_rule, {n: t.float() for n, t in x.items()}, backend="naive")
    got = run(delta_rule, x, backend="chunk")
    assert got["o"].dtype == torch.float32  # run() upcasts; check the op's own dtype contract below
    o, S = delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x["g"], output_final_state=True, backend="chunk")
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert_close(got, expected, 3e-2, "bf16")


@pytest.mark.parametrize("backend", ["naive", "chunk"])
def test_varlen_equals_separate_sequences(backend):
    lengths = [5, 70, 1, 33]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    x = make_inputs(1, sum(lengths), 2, 8, 6, gate="mild", beta_max=1.0)
    S0 = torch.randn(len(lengths), 2, 8, 6)
    o, S = delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x["g"], initial_state=S0, output_final_state=True,
                      cu_seqlens=cu, backend=backend)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_i, S_i = naive_delta_rule(x["q"][:, a:b], x["k"][:, a:b], x["v"][:, a:b], x["beta"][:, a:b],
                                    g=x["g"][:, a:b], initial_state=S0[i : i + 1], output_final_state=True)
        torch.testing.assert_close(o[:, a:b], o_i, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(S[i : i + 1], S_i, atol=1e-5, rtol=1e-5)


def test_varlen_gradients_match_naive():
    cu = torch.tensor([0, 9, 80, 100])
    x = make_inputs(1, 100, 2, 8, 6, gate="strong", beta_max=1.0)
    x["initial_state"] = torch.randn(3, 2, 8, 6)
    expected = run(delta_rule, x, backend="naive", cu_seqlens=cu)
    assert_close(run(delta_rule, x, backend="chunk", cu_seqlens=cu), expected, 2e-5)


@pytest.mark.parametrize("gate", [None, "strong"])
def test_long_sequence_is_stable(gate):
    T, prefix = 16384, 300
    x = make_inputs(1, T, 2, 16, 16, gate=gate, beta_max=1.0)
    o, S = delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x.get("g"), output_final_state=True, backend="chunk")
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    o_ref, _ = naive_delta_rule(x["q"][:, :prefix], x["k"][:, :prefix], x["v"][:, :prefix], x["beta"][:, :prefix],
                                g=None if gate is None else x["g"][:, :prefix])
    torch.testing.assert_close(o[:, :prefix], o_ref, atol=1e-4, rtol=1e-4)
