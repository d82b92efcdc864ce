"""Pure-torch (gated) linear attention: the token-by-token specification and the chunkwise CPU path.

Rule (per head, S is K x V): ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale * q_t)``; g = None is
plain linear attention. Both functions share the public signature of :func:`hf_fwp.ops.linear_attention` (less
``backend``) and assume validated inputs.
"""

from __future__ import annotations

import torch

from hf_fwp.ops.chunking import decay_terms, from_chunks, to_chunks
from hf_fwp.ops.scan import scalar_scan
from hf_fwp.ops.utils import state_dtype, varlen_padded, varlen_separately


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
    backward (:mod:`hf_fwp.ops.scan`).
    """
    if cu_seqlens is not None:
        return varlen_padded(chunk_linear_attention, (q, k, v), g, scale, initial_state, output_final_state,
                              cu_seqlens, chunk_size=chunk_size)
    dt = state_dtype(q, k, v, g, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    qc, kc, vc, gc = (to_chunks(x, chunk_size, dt) for x in (q, k, v, g))  # [N, G, C, *]
    N, G, C = qc.shape[:3]
    mask, gamma, tail, chunk = decay_terms(gc, C, q.device, dt)
    flat = lambda x: x.reshape(N * G, *x.shape[2:])  # noqa: E731  (views: bmm wants 3-D operands)
    zero = q.new_zeros((), dtype=dt).expand(1, 1, 1)
    A = torch.baddbmm(zero, flat(qc), flat(kc).transpose(-1, -2), beta=0.0, alpha=scale)
    A = A * (mask if gamma is None else flat(mask))
    kd = kc if tail is None else kc * tail[..., None]
    D = torch.bmm(flat(kd).transpose(-1, -2), flat(vc)).view(N, G, K, V)  # what each chunk writes
    S0 = q.new_zeros(G, K, V, dtype=dt) if initial_state is None else initial_state.to(dt).reshape(G, K, V)
    states = scalar_scan(chunk, D, S0)  # [N + 1, G, K, V]
    qg = scale * qc if gamma is None else qc * (scale * gamma)[..., None]
    o = torch.baddbmm(torch.bmm(A, flat(vc)), flat(qg), flat(states[:N]))
    final = states[N].reshape(B, H, K, V) if output_final_state else None
    return from_chunks(o.view(N, G, C, V), B, T, v.dtype), final

