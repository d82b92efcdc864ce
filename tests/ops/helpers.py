"""Shared fixtures for the op tests: random inputs, a forward+backward runner and a relative comparison."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_inputs(B, T, H, K, V, *, gate=None, beta_max=None, initial_state=False, dtype=torch.float32, seed=0,
                device="cpu"):
    """Random op inputs. ``gate``: None, "mild" (log-decay in [-0.1, 0]) or "strong" (down to -8 per step).

    k is L2-normalised (what the delta rule expects); beta in (0, beta_max) when beta_max is given.
    """
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = {
        "q": r(B, T, H, K),
        "k": F.normalize(r(B, T, H, K), dim=-1),
        "v": r(B, T, H, V),
    }
    if beta_max is not None:
        x["beta"] = torch.rand(B, T, H, generator=gen) * beta_max
    if gate == "mild":
        x["g"] = -0.1 * torch.rand(B, T, H, generator=gen)
    elif gate == "strong":
        x["g"] = -8.0 * torch.rand(B, T, H, generator=gen)
    elif gate is not None:
        raise ValueError(gate)
    x = {n: t.to(device=device, dtype=dtype) for n, t in x.items()}
    if initial_state:
        x["initial_state"] = r(B, H, K, V).to(device)
    return x


def run(fn, inputs: dict, *, grad=True, seed=1, **kwargs):
    """Call ``fn`` (positional q, k, v[, beta]) with a final state, backprop random upstream gradients and
    return ``{"o", "S", "dq", ...}`` as float32 tensors."""
    leaves = {n: t.detach().clone().requires_grad_(grad) for n, t in inputs.items()}
    pos = [leaves[n] for n in ("q", "k", "v", "beta") if n in leaves]
    kw = {n: leaves[n] for n in ("g", "initial_state") if n in leaves}
    o, S = fn(*pos, output_final_state=True, **kw, **kwargs)
    out = {"o": o.detach().float(), "S": S.detach().float()}
    if grad:
        gen = torch.Generator().manual_seed(seed)
        do = torch.randn(o.shape, generator=gen).to(o)
        dS = torch.randn(S.shape, generator=gen).to(S)
        ((o * do).sum() + (S * dS).sum()).backward()
        for n, t in leaves.items():
            out["d" + n] = t.grad.detach().float()
    return out


def assert_close(actual: dict, expected: dict, rtol: float, what: str = ""):
    """Every entry's max abs error is at most ``rtol`` times the reference's max magnitude (floor 1)."""
    assert actual.keys() == expected.keys(), (actual.keys(), expected.keys())
    for n in expected:
        a, e = actual[n], expected[n]
        assert a.shape == e.shape, (n, a.shape, e.shape)
        assert torch.isfinite(a).all(), f"{what} {n}: non-finite values"
        err = (a - e).abs().max().item()
        ref = max(e.abs().max().item(), 1.0)
        assert err <= rtol * ref, f"{what} {n}: max abs err {err:.3e} > {rtol:.1e} * {ref:.3e}"
