"""Pure-torch (gated) linear attention: the token-by-token specification and the chunkwise CPU path.

Rule (per head, S is K x V): ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale * q_t)``; g = None is
plain linear attention. Both functions share the public signature of :func:`hf_fwp.ops.linear_attention` (less
``backend``) and assume validated inputs.
"""

from __future__ import annotations

import torch

from .ops_chunking import blocks, block_decay, bmm_ng, chunks_per_block, gather_block, scatter_block
from .ops_utils import state_dtype, varlen_padded, varlen_separately


def naive_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence one token at a time in float32 (float64 for float64 inputs): the executable spec.

    Returns ``o [B, T, H, V]`` in v's dtype and the final state ``[B, H, K, V]`` (or None).
    With ``cu_seqlens`` each packed sequence runs on its own, starting from its row of ``initial_state``.
    """
    if cu_seqlens is not None:
        return varlen_separately(naive_linear_attention, (q, k, v), g, scale, initial_state, output_final_state, cu_seqlens)
    dt = state_dtype(q, k, v, g, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
    qf, kf, vf = q.to(dt) * scale, k.to(dt), v.to(dt)
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].to(dt).exp()[..., None, None]
        S = S + kf[:, t, :, :, None] * vf[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], S))
    o = torch.stack(outs, dim=1).to(v.dtype)
    return o, (S if output_final_state else None)


def chunk_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise-parallel linear attention in float32.

    Per chunk with cumulative log-decay ``b``: ``O = (scale Q K^T * M) V + scale (exp(b) Q) S_n`` with the
    causal decay mask ``M[t, i] = exp(b_t - b_i)``, and ``S_{n+1} = exp(b_C) S_n + (exp(b_C - b) K)^T V``.
    Everything but the state recurrence is batched over chunks; the recurrence is a scan with a hand-written
    backward.
    """
    if cu_seqlens is not None:
        return varlen_padded(chunk_linear_attention, (q, k, v), g, scale, initial_state, output_final_state,
                              cu_seqlens, chunk_size=chunk_size)
    dt = state_dtype(q, k, v, g, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    S0 = q.new_zeros(B * H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt).reshape(B * H, K, V)
    o, final = _ChunkLinear.apply(q, k, v, g, S0, scale, chunk_size)
    return o, (final.reshape(B, H, K, V) if output_final_state else None)


def _block_forward(q, k, g, scale, for_backward=False):
    """Per-chunk quantities of one block (``[nb, G, C, *]`` in the state dtype): the masked, scaled, decayed
    ``A = scale Q K^T * M``, ``qg = scale Gamma Q``, ``kd = exp(b_C - b) K`` and the chunk decay ``exp(b_C)``.

    The decay enters ``A`` through the log-space mask or folded into the operands
    (:func:`hf_fwp.modeling.ops_chunking.block_decay`); the backward always asks for the mask.
    """
    mask, gamma, tail, chunk, right = block_decay(k, g, for_backward)
    qg = q * scale if gamma is None else q * (scale * gamma)[..., None]
    if mask is None:
        A = bmm_ng(qg, right.transpose(-1, -2)).tril_()
    else:
        A = bmm_ng(q, k.transpose(-1, -2)).mul_(mask).mul_(scale)
    kd = k if tail is None else k * tail[..., None]
    return dict(mask=mask, gamma=gamma, chunk=chunk, tail=tail, A=A, qg=qg, kd=kd)


class _ChunkLinear(torch.autograd.Function):
    """Chunked (gated) linear attention on ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``g [B, T, H]`` or None and
    ``S0 [B * H, K, V]`` -> ``(o [B, T, H, V], final state [B * H, K, V])``, block by block; the backward pass
    recomputes each block from the inputs and keeps only the chunk-start states."""

    @staticmethod
    def forward(ctx, q, k, v, g, S0, scale, chunk_size):
        B, T, H, K = q.shape
        V = v.shape[-1]
        G, dt, C = B * H, S0.dtype, chunk_size
        N = -(-T // C)
        states = torch.empty(N + 1, G, K, V, dtype=dt, device=q.device)
        states[0] = S0
        o = torch.empty(B, T, H, V, dtype=v.dtype, device=v.device)
        for n0, nb, t0 in blocks(T, C, chunks_per_block(G)):
            qb, kb, vb, gb = (gather_block(t, t0, nb, C, dt) for t in (q, k, v, g))
            x = _block_forward(qb, kb, gb, scale)
            D = bmm_ng(x["kd"].transpose(-1, -2), vb)
            for j in range(nb):
                if x["chunk"] is None:
                    torch.add(D[j], states[n0 + j], out=states[n0 + j + 1])
                else:
                    torch.addcmul(D[j], x["chunk"][j][:, None, None], states[n0 + j], out=states[n0 + j + 1])
            ob = torch.baddbmm(bmm_ng(x["A"], vb).view(nb * G, C, V), x["qg"].reshape(nb * G, C, K),
                               states[n0 : n0 + nb].reshape(nb * G, K, V))
            scatter_block(o, ob.view(nb, G, C, V), t0)
        ctx.save_for_backward(q, k, v, g, states)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return o, states[N].clone()

    @staticmethod
    def backward(ctx, d_o, d_final):
        q, k, v, g, states = ctx.saved_tensors
        scale, C = ctx.scale, ctx.chunk_size
        B, T, H, K = q.shape
        V = v.shape[-1]
        G, dt = B * H, states.dtype
        grads = [torch.empty_like(t) if t is not None else None for t in (q, k, v, g)]
        dS = d_final.to(dt).clone()
        for n0, nb, t0 in reversed(list(blocks(T, C, chunks_per_block(G)))):
            qb, kb, vb, gb, dO = (gather_block(t, t0, nb, C, dt) for t in (q, k, v, g, d_o))
            x = _block_forward(qb, kb, gb, scale, for_backward=True)
            S_n = states[n0 : n0 + nb]
            dS_ext = bmm_ng(x["qg"].transpose(-1, -2), dO)
            dD = torch.empty(nb, G, K, V, dtype=dt, device=q.device)
            for j in range(nb - 1, -1, -1):
                dD[j] = dS
                dS = dS_ext[j] + (dS if x["chunk"] is None else x["chunk"][j][:, None, None] * dS)
            block = _block_backward(qb, kb, vb, gb, scale, x, dO, S_n, dD)
            for out, grad in zip(grads, block):
                if out is not None:
                    scatter_block(out, grad, t0)
        return (*grads, dS, None, None)


def _block_backward(q, k, v, g, scale, x, dO, S_n, dD):
    """Gradients of one block's q, k, v, g given dO, the chunk-start states and the scan's dD = dS_{n+1}."""
    mask, gamma, chunk, tail, A, qg, kd = (x[n] for n in ("mask", "gamma", "chunk", "tail", "A", "qg", "kd"))
    d_qg = bmm_ng(dO, S_n.transpose(-1, -2))
    d_kd = bmm_ng(v, dD.transpose(-1, -2))
    dv = bmm_ng(A.transpose(-1, -2), dO).add_(bmm_ng(kd, dD))
    dA = bmm_ng(dO, v.transpose(-1, -2))
    dAm = dA * mask  # d(scale q k^T) (the mask also zeroes the upper triangle)
    dq = bmm_ng(dAm, k).mul_(scale).add_(d_qg * scale if gamma is None else d_qg * (scale * gamma)[..., None])
    dk = bmm_ng(dAm.transpose(-1, -2), q).mul_(scale).add_(d_kd if tail is None else d_kd * tail[..., None])
    dg = None
    if g is not None:
        # Log-space chain rule, as in the delta rule: dA * A collects the mask's d(factor) * factor.
        Z = dA * A
        db = Z.sum(-1) - Z.sum(-2) + (d_qg * qg).sum(-1)
        e = (d_kd * kd).sum(-1)
        db -= e
        d_chunk = (dD * S_n).sum((-1, -2))
        db[..., -1] += e.sum(-1) + d_chunk * chunk
        dg = db.flip(-1).cumsum(-1).flip(-1)
    return dq, dk, dv, dg

