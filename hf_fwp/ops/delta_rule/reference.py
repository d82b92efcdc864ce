"""Pure-torch (gated) delta rule: the token-by-token specification and the chunkwise CPU path.

Rule (per head, S is K x V)::

    A_t = exp(g_t) S_{t-1}
    S_t = A_t + beta_t k_t (v_t - A_t^T k_t)^T
    o_t = S_t^T (scale * q_t)

g = None is DeltaNet; with g it is Gated DeltaNet (the rule of Qwen3-Next and flash-linear-attention).
Both functions share the public signature of :func:`hf_fwp.ops.delta_rule` (less ``backend``).
"""

from __future__ import annotations

import torch

from hf_fwp.ops.chunking import decay_terms, from_chunks, to_chunks
from hf_fwp.ops.scan import matrix_scan_backward, matrix_scan_forward
from hf_fwp.ops.utils import state_dtype, varlen_padded, varlen_separately


def naive_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence one token at a time in float32 (float64 for float64 inputs): the executable spec.

    Returns ``o [B, T, H, V]`` in v's dtype and the final state ``[B, H, K, V]`` (or None).
    """
    if cu_seqlens is not None:
        return varlen_separately(naive_delta_rule, (q, k, v), g, scale, initial_state, output_final_state,
                                 cu_seqlens, beta=beta)
    dt = state_dtype(q, k, v, beta, g, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
    qf, kf, vf, bf = q.to(dt) * scale, k.to(dt), v.to(dt), beta.to(dt)
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].to(dt).exp()[..., None, None]
        k_t = kf[:, t]
        recalled = torch.einsum("bhk,bhkv->bhv", k_t, S)
        u = bf[:, t, :, None] * (vf[:, t] - recalled)
        S = S + k_t[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], S))
    o = torch.stack(outs, dim=1).to(v.dtype)
    return o, (S if output_final_state else None)


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise-parallel (gated) delta rule in float32, via the WY / UT representation.

    Within a chunk (cumulative log-decay ``b``, ``Gamma = exp(b)``, causal decay mask ``M[t, i] = exp(b_t - b_i)``)
    the written values are ``U = W_v - W_k S_n`` with ``[W_v | W_k] = (I + L)^{-1} [beta V | beta Gamma K]`` and
    ``L = tril(beta K K^T * M, -1)`` (one unit-triangular solve per chunk). Substituting U everywhere gives

        O       = A W_v + (scale Gamma Q - A W_k) S_n,          A = scale Q K^T * M
        S_{n+1} = (exp(b_C) I - K_d^T W_k) S_n + K_d^T W_v,      K_d = exp(b_C - b) K

    so the only sequential work is one [K, K] x [K, V] product per chunk; everything else is batched over all
    chunks. The backward pass is written by hand (:class:`_ChunkDelta`).
    """
    if cu_seqlens is not None:
        return varlen_padded(chunk_delta_rule, (q, k, v), g, scale, initial_state, output_final_state, cu_seqlens,
                             beta=beta, chunk_size=chunk_size)
    dt = state_dtype(q, k, v, beta, g, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    qc, kc, vc, bc, gc = (to_chunks(x, chunk_size, dt) for x in (q, k, v, beta, g))  # [N, G, C, *]
    S0 = q.new_zeros(B * H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt).reshape(B * H, K, V)
    o, final = _ChunkDelta.apply(qc, kc, vc, bc, gc, S0, scale)
    return from_chunks(o, B, T, v.dtype), (final.reshape(B, H, K, V) if output_final_state else None)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched matmul over leading ``[N, G]`` dims through one 3-D bmm (views, no copies for contiguous input)."""
    N, G = a.shape[:2]
    return torch.bmm(a.reshape(N * G, *a.shape[2:]), b.reshape(N * G, *b.shape[2:])).view(N, G, a.shape[2], b.shape[3])


class _ChunkDelta(torch.autograd.Function):
    """Chunked delta rule on chunk-major tensors ``q, k [N, G, C, K]``, ``v [N, G, C, V]``, ``beta, g [N, G, C]``
    (g may be None), ``S0 [G, K, V]`` -> ``(o [N, G, C, V], final state [G, K, V])``."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, S0, scale):
        N, G, C, K = q.shape
        V = v.shape[-1]
        mask, gamma, tail, chunk = decay_terms(g, C, q.device, q.dtype)
        kT = k.transpose(-1, -2)
        kb = k * beta[..., None]
        # Only the strict lower triangle of L is read (unitriangular solve), so it needs no masking of its own.
        L = _bmm(kb, kT) * mask
        R = torch.cat([v, k if gamma is None else k * gamma[..., None]], dim=-1) * beta[..., None]
        W = torch.linalg.solve_triangular(L, R, upper=False, unitriangular=True)  # [W_v | W_k]
        A = _bmm(q, kT).mul_(mask).mul_(scale)
        AW = _bmm(A, W)  # [A W_v | A W_k] in one product
        kd = k if tail is None else k * tail[..., None]
        KW = _bmm(kd.transpose(-1, -2), W)  # [K_d^T W_v | K_d^T W_k]
        eye = torch.eye(K, dtype=q.dtype, device=q.device)
        P = (eye if chunk is None else chunk[..., None, None] * eye) - KW[..., V:]
        states = matrix_scan_forward(P, KW[..., :V], S0)
        qg = q * scale if gamma is None else q * (scale * gamma)[..., None]
        X = qg - AW[..., V:]
        o = torch.baddbmm(AW[..., :V].reshape(N * G, C, V), X.reshape(N * G, C, K),
                          states[:N].reshape(N * G, K, V)).view(N, G, C, V)
        ctx.save_for_backward(q, k, v, beta, g, mask, L, W, A, P, states, X)
        ctx.scale = scale
        return o, states[N]

    @staticmethod
    def backward(ctx, d_o, d_final):
        q, k, v, beta, g, mask, L, W, A, P, states, X = ctx.saved_tensors
        scale = ctx.scale
        N, G, C, K = q.shape
        V = v.shape[-1]
        gated = g is not None
        _, gamma, tail, chunk = decay_terms(g, C, q.device, q.dtype) if gated else (None,) * 4
        S_n = states[:N]
        dX = _bmm(d_o, S_n.transpose(-1, -2))  # dO S_n^T: [N, G, C, K]
        d_states = torch.cat([_bmm(X.transpose(-1, -2), d_o), d_final[None]], dim=0)
        dP, dD, dS0 = matrix_scan_backward(P, states, d_states)
        dKW = torch.cat([dD, -dP], dim=-1)  # [N, G, K, V + K]
        dAW = torch.cat([d_o, -dX], dim=-1)  # [N, G, C, V + K]
        kd = k if tail is None else k * tail[..., None]
        d_kd = _bmm(W, dKW.transpose(-1, -2))
        dW = _bmm(kd, dKW) + _bmm(A.transpose(-1, -2), dAW)
        dA = _bmm(dAW, W.transpose(-1, -2))
        # W = (I + L)^{-1} R  =>  dR = (I + L)^{-T} dW,  dL = -dR W^T on the strict lower triangle.
        dR = torch.linalg.solve_triangular(L.transpose(-1, -2), dW, upper=True, unitriangular=True)
        dL = _bmm(dR, W.transpose(-1, -2)).neg_().tril_(-1)
        dAm = dA * mask
        dLm = dL * mask
        kb = k * beta[..., None]
        dkb = _bmm(dLm, k)
        dq = _bmm(dAm, k).mul_(scale) + (dX * scale if gamma is None else dX * (scale * gamma)[..., None])
        dk = _bmm(dAm.transpose(-1, -2), q).mul_(scale) + _bmm(dLm.transpose(-1, -2), kb)
        dRv, dRk = dR[..., :V], dR[..., V:]
        gk = k if gamma is None else k * gamma[..., None]
        dv = dRv * beta[..., None]
        dbeta = (dRv * v).sum(-1) + (dRk * gk).sum(-1) + (dkb * k).sum(-1)
        dk += dRk * (beta if gamma is None else beta * gamma)[..., None] + dkb * beta[..., None]
        dk += d_kd if tail is None else d_kd * tail[..., None]
        dg = None
        if gated:
            # Log-space chain rule: every decay factor is exp(a difference of b), so db collects d(factor) * factor.
            Z = dA * A + dL * L
            db = Z.sum(-1) - Z.sum(-2)
            db += (dRk * gk).sum(-1) * beta + (dX * q).sum(-1) * (scale * gamma)
            e = (d_kd * kd).sum(-1)
            db -= e
            db[..., -1] += e.sum(-1) + dP.diagonal(dim1=-2, dim2=-1).sum(-1) * chunk
            dg = db.flip(-1).cumsum(-1).flip(-1)  # b = cumsum(g)  =>  dg = reverse cumsum of db
        return dq, dk, dv, dbeta, dg, dS0, None
