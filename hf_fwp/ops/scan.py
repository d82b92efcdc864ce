"""Sequential inter-chunk state scans with hand-written backward passes (pure torch).

Chunked FWP algorithms reduce every chunk ``n`` to an affine map of the fast-weight state::

    S_{n+1} = P_n S_n + D_n          (delta rules: P_n is a [K, K] matrix)
    S_{n+1} = gamma_n * S_n + D_n     (linear rules: gamma_n is a scalar decay)

Everything else is batched over chunks; only this recurrence is sequential. Autograd through a Python
loop records one node per chunk and per op; these functions keep the loop in one place and run the reverse
loop themselves, which is what makes the chunk path's backward fast. Shapes: ``P [N, G, K, K]`` (may be a
strided view), ``gamma [N, G]``, ``D [N, G, K, V]``, ``S0 [G, K, V]``; states ``[N + 1, G, K, V]`` hold the
state before each chunk, then the final state.
"""

from __future__ import annotations

import torch


def matrix_scan_forward(P: torch.Tensor, D: torch.Tensor, S0: torch.Tensor) -> torch.Tensor:
    """States of ``S_{n+1} = P_n S_n + D_n`` (no autograd)."""
    N = P.shape[0]
    states = torch.empty((N + 1,) + tuple(S0.shape), dtype=S0.dtype, device=S0.device)
    states[0] = S0
    for n in range(N):
        torch.baddbmm(D[n], P[n], states[n], out=states[n + 1])
    return states


def matrix_scan_backward(P: torch.Tensor, states: torch.Tensor, d_states: torch.Tensor):
    """Gradients ``(dP, dD, dS0)`` of :func:`matrix_scan_forward` given ``d_states [N + 1, G, K, V]``."""
    N = P.shape[0]
    dP = torch.empty((N,) + tuple(P.shape[1:]), dtype=P.dtype, device=P.device)
    dD = torch.empty((N,) + tuple(states.shape[1:]), dtype=states.dtype, device=states.device)
    dS = d_states[N].clone()
    for n in range(N - 1, -1, -1):
        dD[n] = dS
        torch.bmm(dS, states[n].transpose(-1, -2), out=dP[n])
        dS = torch.baddbmm(d_states[n], P[n].transpose(-1, -2), dS)
    return dP, dD, dS


class _MatrixScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, P: torch.Tensor, D: torch.Tensor, S0: torch.Tensor) -> torch.Tensor:
        states = matrix_scan_forward(P, D, S0)
        ctx.save_for_backward(P, states)
        return states

    @staticmethod
    def backward(ctx, d_states: torch.Tensor):
        P, states = ctx.saved_tensors
        return matrix_scan_backward(P, states, d_states)


class _ScalarScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gamma: torch.Tensor, D: torch.Tensor, S0: torch.Tensor) -> torch.Tensor:
        N = gamma.shape[0]
        states = torch.empty((N + 1,) + tuple(S0.shape), dtype=S0.dtype, device=S0.device)
        states[0] = S0
        g = gamma[..., None, None]
        for n in range(N):
            torch.addcmul(D[n], g[n], states[n], out=states[n + 1])
        ctx.save_for_backward(gamma, states)
        return states

    @staticmethod
    def backward(ctx, d_states: torch.Tensor):
        gamma, states = ctx.saved_tensors
        N = gamma.shape[0]
        g = gamma[..., None, None]
        dD = torch.empty((N,) + tuple(states.shape[1:]), dtype=states.dtype, device=states.device)
        dS = d_states[N].clone()
        for n in range(N - 1, -1, -1):
            dD[n] = dS
            dS = torch.addcmul(d_states[n], g[n], dS)
        # d gamma_n = <dS_{n+1}, S_n>, with dS_{n+1} = dD[n]; one batched reduction after the loop.
        d_gamma = (dD * states[:N]).sum((-1, -2))
        return d_gamma, dD, dS


def matrix_scan(P: torch.Tensor, D: torch.Tensor, S0: torch.Tensor) -> torch.Tensor:
    """Differentiable states of ``S_{n+1} = P_n S_n + D_n``."""
    return _MatrixScan.apply(P, D, S0.contiguous())


def scalar_scan(gamma: torch.Tensor | None, D: torch.Tensor, S0: torch.Tensor) -> torch.Tensor:
    """Differentiable states of ``S_{n+1} = gamma_n S_n + D_n`` (``gamma=None`` means 1: a prefix sum)."""
    if gamma is None:
        return torch.cat([S0[None], S0[None] + D.cumsum(0)], dim=0)
    return _ScalarScan.apply(gamma, D, S0.contiguous())
