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
from hf_fwp.ops.scan import matrix_scan
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

    so the only sequential work is one [K, K] x [K, V] product per chunk (:func:`hf_fwp.ops.scan.matrix_scan`,
    hand-written backward); everything else is batched over all chunks.
    """
    if cu_seqlens is not None:
        return varlen_padded(chunk_delta_rule, (q, k, v), g, scale, initial_state, output_final_state, cu_seqlens,
                             beta=beta, chunk_size=chunk_size)
    dt = state_dtype(q, k, v, beta, g, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    qc, kc, vc, bc, gc = (to_chunks(x, chunk_size, dt) for x in (q, k, v, beta, g))  # [N, G, C, *]
    N, G, C = bc.shape
    mask, gamma, tail, chunk = decay_terms(gc, C, q.device, dt)
    flat = lambda x: x.reshape(N * G, *x.shape[2:])  # noqa: E731  (views: bmm wants 3-D operands)
    kT = flat(kc).transpose(-1, -2)
    kb = kc * bc[..., None]
    # Only the strict lower triangle of L is read (unitriangular solve), so it needs no masking of its own.
    L = torch.bmm(flat(kb), kT).view(N, G, C, C)
    if gamma is not None:
        L = L * mask
    rhs = torch.cat([vc, kc if gamma is None else kc * gamma[..., None]], dim=-1) * bc[..., None]
    W = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)  # [W_v | W_k]
    zero = q.new_zeros((), dtype=dt).expand(1, 1, 1)
    A = torch.baddbmm(zero, flat(qc), kT, beta=0.0, alpha=scale) * (mask if gamma is None else flat(mask))
    AW = torch.bmm(A, flat(W)).view(N, G, C, V + K)  # [A W_v | A W_k] in one product
    kd = kc if tail is None else kc * tail[..., None]
    KW = torch.bmm(flat(kd).transpose(-1, -2), flat(W)).view(N, G, K, V + K)  # [K_d^T W_v | K_d^T W_k]
    eye = torch.eye(K, dtype=dt, device=q.device)
    P = (eye if chunk is None else chunk[..., None, None] * eye) - KW[..., V:]  # [N, G, K, K]
    S0 = q.new_zeros(G, K, V, dtype=dt) if initial_state is None else initial_state.to(dt).reshape(G, K, V)
    states = matrix_scan(P, KW[..., :V], S0)  # [N + 1, G, K, V]
    qg = scale * qc if gamma is None else qc * (scale * gamma)[..., None]
    o = torch.baddbmm(flat(AW[..., :V]), flat(qg - AW[..., V:]), flat(states[:N]))
    final = states[N].reshape(B, H, K, V) if output_final_state else None
    return from_chunks(o.view(N, G, C, V), B, T, v.dtype), final
