"""The decoding step (fwp_step): token after token it must reproduce the token-by-token spec of every rule, the
Triton kernel must equal its torch twin, and the custom op must survive torch.compile(fullgraph=True).

Without a GPU the Triton kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest)."""

import pytest
import torch
import torch.nn.functional as F

from hf_fwp.ops import delta_rule, linear_attention
from hf_fwp.modeling.ops_step import fwp_step, torch_fwp_step
from tests.conftest import DEVICE
from tests.ops.helpers import make_inputs

RULES = {"linear": (False, None), "gated_linear": (False, "strong"), "delta": (True, None),
         "gated_delta": (True, "mild")}


def _inputs(rule, B=2, T=5, H=3, K=24, V=20, dtype=torch.float32, seed=0):
    delta, gate = RULES[rule]
    x = make_inputs(B, T, H, K, V, gate=gate, beta_max=2.0 if delta else None, initial_state=True, dtype=dtype,
                    seed=seed, device=DEVICE)
    return x


def _steps(x, backend, scale, qk_l2norm=False):
    """Run fwp_step over the tokens of x; -> (outputs [B, T, H, V] in fp32, final state)."""
    state = x["initial_state"].clone()
    outs = []
    for t in range(x["q"].shape[1]):
        sl = lambda n: None if n not in x else x[n][:, t : t + 1]  # noqa: E731
        outs.append(fwp_step(sl("q"), sl("k"), sl("v"), state, beta=sl("beta"), g=sl("g"), scale=scale,
                             qk_l2norm=qk_l2norm, backend=backend).float())
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("rule", list(RULES))
def test_torch_steps_equal_the_recurrence(rule):
    x = _inputs(rule)
    o, S = _steps(x, "torch", scale=0.4)
    op = delta_rule if "beta" in x else linear_attention
    args = [x[n] for n in ("q", "k", "v", "beta") if n in x]
    o_ref, S_ref = op(*args, g=x.get("g"), scale=0.4, initial_state=x["initial_state"], output_final_state=True,
                      backend="naive")
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(S, S_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", list(RULES))
def test_compiled_cpu_steps_equal_the_recurrence(rule):
    # Compiled on CPU the step is written as broadcasts and sums that inductor fuses (no bmm calls): the same
    # recurrence, the state still updated in place, with grouped queries reading one state.
    torch._dynamo.reset()
    G = 3
    x = _grouped(_inputs(rule, H=2, K=16, V=12, T=4, seed=6), G)
    x = {n: t.cpu() for n, t in x.items()}
    step = torch.compile(torch_fwp_step, backend="inductor", fullgraph=True)
    state, outs = x["initial_state"].clone(), []
    for t in range(x["q"].shape[1]):
        sl = lambda n: None if n not in x else x[n][:, t : t + 1]  # noqa: E731
        outs.append(step(sl("q"), sl("k"), sl("v"), state, beta=sl("beta"), g=sl("g"), scale=0.3))
    o_ref, S_ref = _steps(_expanded(x, G), "torch", scale=0.3)
    torch.testing.assert_close(torch.cat(outs, 1), o_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(state, S_ref[:, ::G], atol=2e-5, rtol=1e-4)


def test_l2norm_inside_the_step_equals_normalising_first():
    x = _inputs("gated_delta", seed=4)
    x["k"] = x["k"] * 3.0  # not unit-norm any more
    o, S = _steps(x, "torch", scale=0.5, qk_l2norm=True)
    y = dict(x, q=F.normalize(x["q"], dim=-1, eps=1e-6), k=F.normalize(x["k"], dim=-1, eps=1e-6))
    o_ref, S_ref = _steps(y, "torch", scale=0.5)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(S, S_ref)


@pytest.mark.triton
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("K, V", [(24, 20), (64, 128), (256, 64)])
@pytest.mark.parametrize("qk_l2norm", [False, True])
def test_triton_step_equals_its_torch_twin(rule, K, V, qk_l2norm):
    x = _inputs(rule, B=2, T=3, H=2, K=K, V=V, seed=K + V)
    o, S = _steps(x, "triton", scale=K**-0.5, qk_l2norm=qk_l2norm)
    o_ref, S_ref = _steps(x, "torch", scale=K**-0.5, qk_l2norm=qk_l2norm)
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(S, S_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.triton
def test_triton_step_in_bf16_keeps_an_fp32_state():
    x = _inputs("gated_delta", K=32, V=32, dtype=torch.bfloat16, seed=9)
    o, S = _steps(x, "triton", scale=0.2)
    o_ref, S_ref = _steps(x, "torch", scale=0.2)
    assert S.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(S, S_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.triton
def test_the_custom_op_is_registered_correctly():
    from hf_fwp.modeling import ops_step_triton as step_triton

    for G in (1, 2):
        x = _grouped(_inputs("gated_delta", T=1, K=16, V=16), G)
        args = (x["q"], x["k"], x["v"], x["beta"], x["g"], x["initial_state"].clone(), 0.25, True)
        # Schema (the state is declared mutated), fake implementation and dispatch, as torch.compile relies on them.
        torch.library.opcheck(step_triton._fwp_step_op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.triton
def test_the_triton_step_compiles_as_one_opaque_node():
    torch._dynamo.reset()
    x = _inputs("gated_delta", T=1, K=16, V=16, seed=2)

    def step(q, k, v, beta, g, state):
        o = fwp_step(q, k, v, state, beta=beta, g=g, scale=0.25, qk_l2norm=True, backend="triton")
        return o * 2

    state_ref, state = x["initial_state"].clone(), x["initial_state"].clone()
    expected = step(x["q"], x["k"], x["v"], x["beta"], x["g"], state_ref)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x["q"], x["k"], x["v"], x["beta"], x["g"], state)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(state, state_ref)  # the in-place update survives functionalisation


def _grouped(x, G):
    """x with G query heads per state head: q gets G x the heads; k, v, beta, g and the state keep theirs."""
    B, T, Hs, K = x["k"].shape
    q = torch.randn(B, T, Hs * G, K, generator=torch.Generator().manual_seed(7)).to(x["q"])
    return dict(x, q=q)


def _expanded(x, G):
    """The same computation with every state copied to its G query heads (ungrouped)."""
    rep = lambda t: None if t is None else t.repeat_interleave(G, dim=2)  # noqa: E731
    y = dict(x, k=rep(x["k"]), v=rep(x["v"]), initial_state=x["initial_state"].repeat_interleave(G, dim=1))
    for n in ("beta", "g"):
        if n in x:
            y[n] = rep(x[n])
    return y


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_grouped_queries_read_one_shared_state(rule, backend):
    G = 3
    x = _grouped(_inputs(rule, H=2, K=16, V=12, T=4, seed=3), G)
    o, S = _steps(x, backend, scale=0.3, qk_l2norm=True)
    o_ref, S_ref = _steps(_expanded(x, G), "torch", scale=0.3, qk_l2norm=True)
    assert o.shape == x["q"].shape[:3] + (12,) and S.shape == x["initial_state"].shape
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(S, S_ref[:, ::G], atol=2e-5, rtol=1e-4)


def test_bad_inputs_are_refused():
    x = _inputs("delta", T=1)
    with pytest.raises(ValueError, match="one token"):
        fwp_step(x["q"].expand(-1, 2, -1, -1), x["k"], x["v"], x["initial_state"])
    with pytest.raises(ValueError, match="updated in place"):
        fwp_step(x["q"], x["k"], x["v"], x["initial_state"].half())
    with pytest.raises(ValueError, match="updated in place"):
        fwp_step(x["q"], x["k"], x["v"], x["initial_state"][..., :-1])
    with pytest.raises(ValueError, match="`beta` must be"):
        fwp_step(x["q"], x["k"], x["v"], x["initial_state"].clone(), beta=x["beta"][..., :1])
    with pytest.raises(ValueError, match="backend"):
        fwp_step(x["q"], x["k"], x["v"], x["initial_state"].clone(), backend="cuda")
    with pytest.raises(ValueError, match=r"`state` requires grad, but it is updated in place.*state.detach\(\)"):
        fwp_step(x["q"], x["k"], x["v"], x["initial_state"].clone().requires_grad_())
    with pytest.raises(ValueError, match="`beta` must be a floating tensor; got dtype torch.int64"):
        fwp_step(x["q"], x["k"], x["v"], x["initial_state"].clone(), beta=x["beta"].long())
    with pytest.raises(ValueError, match="`beta` must be a torch.Tensor; got list"):
        fwp_step(x["q"], x["k"], x["v"], x["initial_state"].clone(), beta=x["beta"].tolist())
    with pytest.raises(ValueError, match="`state` must be a torch.Tensor; got NoneType"):
        fwp_step(x["q"], x["k"], x["v"], None)
    with pytest.raises(ValueError, match="H a multiple of Hs"):  # 3 query heads cannot share 2 states
        fwp_step(x["q"], x["k"][:, :, :2], x["v"][:, :, :2], x["initial_state"][:, :2].clone())


def test_torch_step_updates_the_state_in_place():
    x = _inputs("gated_linear", T=1)
    state = x["initial_state"].clone()
    ptr = state.data_ptr()
    torch_fwp_step(x["q"], x["k"], x["v"], state, g=x["g"], scale=0.3)
    assert state.data_ptr() == ptr and not torch.equal(state, x["initial_state"])


def test_inputs_of_the_wrong_rank_or_dtype_are_named():
    x = _inputs("delta", T=1)
    with pytest.raises(ValueError, match="must be 4-D"):
        fwp_step(x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], x["initial_state"])
    with pytest.raises(ValueError, match="one floating dtype"):
        fwp_step(x["q"].bfloat16(), x["k"], x["v"], x["initial_state"])
    with pytest.raises(ValueError, match="one floating dtype"):
        fwp_step(x["q"].long(), x["k"].long(), x["v"].long(), x["initial_state"])
    with pytest.raises(ValueError, match="`scale` must be None"):
        fwp_step(x["q"], x["k"], x["v"], x["initial_state"].clone(), scale="x")
