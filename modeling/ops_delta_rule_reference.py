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

from .ops_chunking import blocks, block_decay, bmm_ng, chunks_per_block, gather_block, scatter_block
from .ops_utils import state_dtype, varlen_padded, varlen_separately


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
    S0 = q.new_zeros(B * H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt).reshape(B * H, K, V)
    o, final = _ChunkDelta.apply(q, k, v, beta, g, S0, scale, chunk_size)
    return o, (final.reshape(B, H, K, V) if output_final_state else None)


def _block_forward(q, k, v, beta, g, scale, for_backward=False):
    """Every per-chunk quantity of one block (``[nb, G, C, *]`` inputs in the state dtype); see chunk_delta_rule.

    The decay enters ``A`` and ``L`` either through the log-space mask or folded into the operands
    (:func:`hf_fwp.modeling.ops_chunking.block_decay`); the backward always asks for the mask.
    """
    nb, G, C, K = q.shape
    V = v.shape[-1]
    mask, gamma, tail, chunk, right = block_decay(k, g, for_backward)
    gk = k if gamma is None else k * gamma[..., None]
    qg = q * scale if gamma is None else q * (scale * gamma)[..., None]
    rT = right.transpose(-1, -2)
    if mask is None:
        # Only the strict lower triangle of L is read below, so L needs no mask; A keeps the diagonal.
        L = bmm_ng(gk * beta[..., None], rT)
        A = bmm_ng(qg, rT).tril_()
    else:
        L = bmm_ng(k * beta[..., None], rT).mul_(mask)
        A = bmm_ng(q, rT).mul_(mask).mul_(scale)
    # T = (I + L)^{-1} explicitly: one solve against I, then products (faster on CPU than solving for W directly,
    # and the backward reuses T instead of a second solve).
    eye_c = torch.eye(C, dtype=q.dtype, device=q.device)
    Ti = torch.linalg.solve_triangular(L, eye_c.expand(nb, G, C, C), upper=False, unitriangular=True)
    W = bmm_ng(Ti, torch.cat([v, gk], dim=-1).mul_(beta[..., None]))  # [W_v | W_k]
    AW = bmm_ng(A, W)  # [A W_v | A W_k] in one product
    kd = k if tail is None else k * tail[..., None]
    KW = bmm_ng(kd.transpose(-1, -2), W)  # [K_d^T W_v | K_d^T W_k]
    eye = torch.eye(K, dtype=q.dtype, device=q.device)
    P = (eye if chunk is None else chunk[..., None, None] * eye) - KW[..., V:]
    X = qg - AW[..., V:]
    return dict(mask=mask, gamma=gamma, tail=tail, chunk=chunk, L=L, Ti=Ti, W=W, A=A, AW=AW, kd=kd, gk=gk, KW=KW,
                P=P, X=X)


class _ChunkDelta(torch.autograd.Function):
    """Chunked delta rule on ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``beta, g [B, T, H]`` (g may be None) and
    ``S0 [B * H, K, V]`` -> ``(o [B, T, H, V] in v's dtype, final state [B * H, K, V])``.

    Works block by block (a few chunks at a time, :func:`hf_fwp.modeling.ops_chunking.blocks`); the backward pass recomputes
    each block's intra-chunk quantities from the inputs and keeps only the chunk-start states from the forward.
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, g, S0, scale, chunk_size):
        B, T, H, K = q.shape
        V = v.shape[-1]
        G, dt, C = B * H, S0.dtype, chunk_size
        N = -(-T // C)
        states = torch.empty(N + 1, G, K, V, dtype=dt, device=q.device)
        states[0] = S0
        o = torch.empty(B, T, H, V, dtype=v.dtype, device=v.device)
        per = chunks_per_block(G)
        for n0, nb, t0 in blocks(T, C, per):
            x = _block_forward(*(gather_block(t, t0, nb, C, dt) for t in (q, k, v, beta, g)), scale)
            D, P = x["KW"][..., :V], x["P"]
            for j in range(nb):
                torch.baddbmm(D[j], P[j], states[n0 + j], out=states[n0 + j + 1])
            ob = torch.baddbmm(x["AW"][..., :V].reshape(nb * G, C, V), x["X"].reshape(nb * G, C, K),
                               states[n0 : n0 + nb].reshape(nb * G, K, V))
            scatter_block(o, ob.view(nb, G, C, V), t0)
        ctx.save_for_backward(q, k, v, beta, g, states)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return o, states[N].clone()

    @staticmethod
    def backward(ctx, d_o, d_final):
        q, k, v, beta, g, states = ctx.saved_tensors
        scale, C = ctx.scale, ctx.chunk_size
        B, T, H, K = q.shape
        V = v.shape[-1]
        G, dt = B * H, states.dtype
        grads = [torch.empty_like(t) if t is not None else None for t in (q, k, v, beta, g)]
        dS = d_final.to(dt).clone()
        for n0, nb, t0 in reversed(list(blocks(T, C, chunks_per_block(G)))):
            qb, kb, vb, bb, gb = (gather_block(t, t0, nb, C, dt) for t in (q, k, v, beta, g))
            dO = gather_block(d_o, t0, nb, C, dt)
            x = _block_forward(qb, kb, vb, bb, gb, scale, for_backward=True)
            S_n = states[n0 : n0 + nb]
            dX = bmm_ng(dO, S_n.transpose(-1, -2))
            dS_ext = bmm_ng(x["X"].transpose(-1, -2), dO)
            dP = torch.empty(nb, G, K, K, dtype=dt, device=q.device)
            dD = torch.empty(nb, G, K, V, dtype=dt, device=q.device)
            P = x["P"]
            for j in range(nb - 1, -1, -1):
                dD[j] = dS
                torch.bmm(dS, S_n[j].transpose(-1, -2), out=dP[j])
                dS = torch.baddbmm(dS_ext[j], P[j].transpose(-1, -2), dS)
            block_grads = _block_backward(qb, kb, vb, bb, gb, scale, x, dO, dX, dP, dD)
            for out, grad in zip(grads, block_grads):
                if out is not None:
                    scatter_block(out, grad, t0)
        return (*grads, dS, None, None)


def _block_backward(q, k, v, beta, g, scale, x, dO, dX, dP, dD):
    """Gradients of one block's inputs given the gradients of its outputs, ``X`` and the scan's ``P``/``D``."""
    V = v.shape[-1]
    mask, gamma, tail, chunk, L, W, A, kd, gk = (x[n] for n in ("mask", "gamma", "tail", "chunk", "L", "W", "A",
                                                                 "kd", "gk"))
    dKW = torch.cat([dD, -dP], dim=-1)  # [nb, G, K, V + K]
    dAW = torch.cat([dO, -dX], dim=-1)  # [nb, G, C, V + K]
    d_kd = bmm_ng(W, dKW.transpose(-1, -2))
    dW = bmm_ng(kd, dKW).add_(bmm_ng(A.transpose(-1, -2), dAW))
    dA = bmm_ng(dAW, W.transpose(-1, -2))
    # W = (I + L)^{-1} R  =>  dR = (I + L)^{-T} dW,  dL = -dR W^T on the strict lower triangle.
    dR = bmm_ng(x["Ti"].transpose(-1, -2), dW)
    dL = bmm_ng(dR, W.transpose(-1, -2)).neg_().tril_(-1)
    dAm = dA * mask
    dLm = dL * mask
    kbeta = k * beta[..., None]
    dkb = bmm_ng(dLm, k)
    dq = bmm_ng(dAm, k).mul_(scale).add_(dX * scale if gamma is None else dX * (scale * gamma)[..., None])
    dk = bmm_ng(dAm.transpose(-1, -2), q).mul_(scale).add_(bmm_ng(dLm.transpose(-1, -2), kbeta))
    dRv, dRk = dR[..., :V], dR[..., V:]
    dv = dRv * beta[..., None]
    dRk_gk = (dRk * gk).sum(-1)
    dbeta = (dRv * v).sum(-1) + dRk_gk + (dkb * k).sum(-1)
    dk += dRk * (beta if gamma is None else beta * gamma)[..., None] + dkb * beta[..., None]
    dk += d_kd if tail is None else d_kd * tail[..., None]
    dg = None
    if g is not None:
        # Log-space chain rule: every decay factor is exp(a difference of b), so db collects d(factor) * factor.
        Z = dA * A + dL * L
        db = Z.sum(-1) - Z.sum(-2)
        db += dRk_gk * beta + (dX * q).sum(-1) * (scale * gamma)
        e = (d_kd * kd).sum(-1)
        db -= e
        db[..., -1] += e.sum(-1) + dP.diagonal(dim1=-2, dim2=-1).sum(-1) * chunk
        dg = db.flip(-1).cumsum(-1).flip(-1)  # b = cumsum(g)  =>  dg = reverse cumsum of db
    return dq, dk, dv, dbeta, dg
