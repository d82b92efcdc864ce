"""Bad input to the public ops raises ValueError naming the argument and what was expected."""

import pytest
import torch

from hf_fwp.ops import delta_rule, linear_attention
from hf_fwp.modeling.ops_utils import pack_varlen, unpack_varlen

B, T, H, K, V = 2, 5, 3, 4, 6


def _ok():
    return dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, H, V),
                beta=torch.rand(B, T, H), g=-torch.rand(B, T, H))


def _call(**over):
    x = {**_ok(), **over}
    extra = {n: x.pop(n) for n in list(x) if n not in ("q", "k", "v", "beta")}
    return delta_rule(x["q"], x["k"], x["v"], x["beta"], **extra)


@pytest.mark.parametrize(
    "over, pattern",
    [
        (dict(q=torch.randn(B, T, H * K)), r"`q` must have rank 4"),
        (dict(k=torch.randn(B, T, H, K + 1)), r"`k` must have the shape of `q`"),
        (dict(k=torch.randn(B, T, H + 1, K)), r"`k` must have the shape of `q`"),
        (dict(v=torch.randn(B, T, H + 1, V)), r"`v` must be \[B, T, H, V\]"),
        (dict(v=torch.randn(B, T + 1, H, V)), r"`v` must be \[B, T, H, V\]"),
        (dict(beta=torch.rand(B, T, H, 1)), r"`beta` must be \[B, T, H\]"),
        (dict(g=torch.rand(B, T)), r"`g` must be \[B, T, H\]"),
        (dict(q=torch.randint(0, 3, (B, T, H, K))), r"`q` must be a floating tensor"),
        (dict(initial_state=torch.zeros(B, H, V, K)), r"`initial_state` must be \[N, H, K, V\]"),
        (dict(initial_state=torch.zeros(B, H, K, V, dtype=torch.bfloat16)), r"`initial_state` must be float32"),
        (dict(backend="cuda"), r"backend='cuda' is not one of"),
        (dict(q=torch.randn(B, 0, H, K), k=torch.randn(B, 0, H, K), v=torch.randn(B, 0, H, V),
              beta=torch.rand(B, 0, H), g=-torch.rand(B, 0, H)), r"T must be at least 1"),
        (dict(q=torch.randn(B, T, H, 0), k=torch.randn(B, T, H, 0)), r"head dims must be at least 1"),
        (dict(k=torch.randn(B, T, H, K, dtype=torch.float64)), r"q, k and v must share one dtype"),
        (dict(beta=None), r"`beta` \(writing strength \[B, T, H\]\) is required"),
        (dict(chunk_size=0), r"`chunk_size` must be a positive int"),
        (dict(chunk_size=-8), r"`chunk_size` must be a positive int"),
        (dict(chunk_size=16.0), r"`chunk_size` must be a positive int"),
        (dict(initial_state=[[0.0]]), r"`initial_state` must be a torch.Tensor"),
        (dict(scale="x"), r"`scale` must be None \(K \*\* -0.5\) or a positive finite number; got 'x'"),
        (dict(scale=0.0), r"`scale` must be None"),
        (dict(scale=-1.0), r"`scale` must be None"),
        (dict(scale=torch.tensor(0.5)), r"`scale` must be None .*\(a tensor: pass scale.item\(\)\)"),
        (dict(output_final_state="no"), r"`output_final_state` must be True or False; got 'no'"),
    ],
)
def test_bad_inputs_raise_clear_errors(over, pattern):
    with pytest.raises(ValueError, match=pattern):
        _call(**over)


@pytest.mark.parametrize("backend", ["naive", "chunk"])
def test_gate_values_outside_their_range_are_refused_by_the_torch_backends(backend):
    x = _ok()
    g, beta = x["g"].clone(), x["beta"].clone()
    g[0, 2, 1] = 0.5  # a growing state, not a decay
    with pytest.raises(ValueError, match="`g` is a log-decay and must be <= 0.*maximum of 0.5"):
        _call(g=g, backend=backend)
    with pytest.raises(ValueError, match="linear_attention: `g` is a log-decay"):
        linear_attention(x["q"], x["k"], x["v"], g=g, backend=backend)
    for bad in (-0.1, 2.5):
        beta[1, 0, 0] = bad
        with pytest.raises(ValueError, match=r"`beta` must lie in \[0, 1\]"):
            _call(beta=beta, backend=backend)
    # The edges are allowed: g = 0 (no decay), g = -inf (a hard reset), beta in [0, 2] (negative eigenvalues).
    g[0, 2, 1], g[1, 3, 0] = 0.0, float("-inf")
    beta[1, 0, 0], beta[0, 0, 0] = 2.0, 0.0
    o, _ = _call(g=g, beta=beta, backend=backend)
    assert torch.isfinite(o).all()


def test_numpy_scales_are_numbers():
    import numpy as np

    x = _ok()
    o, _ = delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x["g"], scale=np.float32(0.5))
    torch.testing.assert_close(o, delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x["g"], scale=0.5)[0])


def test_device_mismatch_is_reported():
    meta = torch.randn(B, T, H, V, device="meta")
    with pytest.raises(ValueError, match="one device"):
        _call(v=meta)


@pytest.mark.parametrize(
    "cu, pattern",
    [
        (torch.tensor([0, 3, 2, 10]), "strictly increasing"),
        (torch.tensor([0, 4, 9]), "end at T = 10"),
        (torch.tensor([1, 4, 10]), "start at 0"),
        (torch.tensor([0.0, 10.0]), "1-D int32/int64"),
        (torch.tensor([0, 5, 5, 10]), "strictly increasing"),
        ([0, 4, 10], "got a list"),
    ],
)
def test_bad_cu_seqlens(cu, pattern):
    q = torch.randn(1, 10, H, K)
    with pytest.raises(ValueError, match=pattern):
        linear_attention(q, q, torch.randn(1, 10, H, V), cu_seqlens=cu)


def test_cu_seqlens_needs_batch_of_one_and_state_per_sequence():
    q = torch.randn(2, 10, H, K)
    with pytest.raises(ValueError, match="B must be 1"):
        linear_attention(q, q, torch.randn(2, 10, H, V), cu_seqlens=torch.tensor([0, 4, 10]))
    q = torch.randn(1, 10, H, K)
    with pytest.raises(ValueError, match="number of sequences in cu_seqlens"):
        linear_attention(q, q, torch.randn(1, 10, H, V), cu_seqlens=torch.tensor([0, 4, 10]),
                         initial_state=torch.zeros(1, H, K, V))


def test_triton_backend_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _call(backend="triton")


def test_pack_unpack_round_trip():
    cu = torch.tensor([0, 2, 7, 8])
    x = torch.randn(1, 8, 3)
    packed = pack_varlen(x, cu)
    assert packed.shape == (3, 5, 3)
    assert (packed[0, 2:] == 0).all() and (packed[2, 1:] == 0).all()
    torch.testing.assert_close(unpack_varlen(packed, cu), x)
