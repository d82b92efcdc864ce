"""Triton (gated) delta rule: a chunkwise-parallel path (WY / UT representation) and a fused recurrent path.

Rule (per head, S is K x V)::

    A_t = exp(g_t) S_{t-1}
    S_t = A_t + beta_t k_t (v_t - A_t^T k_t)^T
    o_t = S_t^T (scale * q_t)

Layout: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, beta and g ``[B, T, H]``, states ``[B, H, K, V]`` float32;
kernels see the packed layout of :mod:`hf_fwp.modeling.ops_triton_common` (varlen runs natively). State math accumulates
in float32; bf16/fp16 inputs reach the tensor cores in their own dtype.

Chunked algorithm (chunk of BT = 64 tokens, within-chunk cumulative log-decay ``b``, ``Gamma = exp(b)``, causal
decay ``M[t, i] = exp(b_t - b_i)``)::

    L = strict_lower(diag(beta) K K^T * M),  Tm = (I + L)^{-1}             (kkt_solve: 16 x 16 blocks)
    W = Tm (beta Gamma K),  U = Tm (beta V)                                 (recompute_wu)
    X = U - W h_n;  h_{n+1} = exp(b_C) h_n + K^T (exp(b_C - b) X)          (state pass, sequential)
    O = scale (Gamma Q h_n + (Q K^T * M) X)                                 (shared output kernel)

Only q, k, v, beta, g, the chunk inverses Tm and the final state are saved; the backward pass recomputes W, U, the
chunk states and X, then runs the shared dv kernel (intra-chunk dX), a reverse sequential pass (total dX and the
end-of-chunk state gradients), the shared dq/dk/dW kernel and the WY backward (dk, dv, dbeta through Tm). Gate
gradients come from ``dL/dB_t = q_t . dq_t - v_t . dv_t`` (see :mod:`hf_fwp.modeling.ops_triton_common`).

The sequential passes split V over programs (BV 16-64) and keep the whole key dim as up to four ``[64, BV]`` fp32
register tiles (w . h needs all of K), so K <= 256 here; wider keys take the pure-torch chunk path.
"""

from __future__ import annotations

import torch
# In a try block: transformers' remote-code loader treats imports outside one as required packages, and Triton
# (Linux only) is optional; the dispatchers import this module only when Triton imports.
try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - platforms without Triton
    raise ImportError("the Triton kernels need the `triton` package (Linux); use backend='chunk'.") from error

from .ops_dispatch import TRITON_DELTA_MAX_K, TRITON_FUSED_MAX_LEN
from .ops_triton_common import (
    Seqs,
    by_dtype,
    chunk_bounds,
    chunk_dqk,
    chunk_dv,
    chunk_gates,
    chunk_local_cumsum,
    chunk_output,
    configs,
    dg_from_terms,
    dot_config,
    fused_tiles,
    launch,
    load_tile,
    load_vec,
    mma,
    parallel_configs,
    promote_qkv,
    refuse_float64,
    seq_bounds,
    store_dtype,
    store_tile,
    store_vec,
    tile,
)

__all__ = ["triton_delta_rule", "fused_recurrent_delta_rule", "triton_chunk_delta_rule"]

# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def fused_recurrent_fwd_kernel(q, k, v, beta, g, h0, o, ht, hs, cu_seqlens, scale,
                               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                               BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, USE_H0: tl.constexpr,
                               STORE_HT: tl.constexpr, STORE_HS: tl.constexpr):
    """One program per (V block, sequence * head); the ``[BK >= K, BV]`` state lives in registers.

    q, k: ``[T_all, H, K]``; v, o: ``[T_all, H, V]``; beta, g: ``[T_all, H]``; h0, ht: ``[N, H, K, V]`` fp32;
    hs: ``[T_all, H, K, V]`` fp32, the state *before* each token (kept for the backward pass).
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = o_k[:, None] * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_h, mask=m_h, other=0.0)
    for t in range(bos, eos):
        i_tok = t * H + i_h
        b_q = tl.load(q + i_tok * K + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + i_tok * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + i_tok * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + i_tok).to(tl.float32)
        if STORE_HS:
            tl.store(hs + i_tok * K * V + o_h, b_h, mask=m_h)
        if USE_G:
            b_h *= tl.exp(tl.load(g + i_tok).to(tl.float32))
        b_u = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))
        b_h += b_k[:, None] * b_u[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0)
        tl.store(o + i_tok * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_h, b_h, mask=m_h)


@triton.jit
def fused_recurrent_bwd_kernel(q, k, v, beta, g, hs, do, dht, dq, dk, dv, dbeta, dg, dh0, cu_seqlens, scale, T_all,
                               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                               BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, USE_DHT: tl.constexpr,
                               STORE_DH0: tl.constexpr):
    """Reverse token loop, one program per (V block, sequence * head), reading the stored pre-token states hs.

    dq, dk: ``[NV, T_all, H, K]`` and dbeta, dg: ``[NV, T_all, H]`` are per-V-block partial sums (reduced by the
    caller); dv: ``[T_all, H, V]``; dht, dh0: ``[N, H, K, V]``; all gradients fp32.
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = o_k[:, None] * V + o_v[None, :]

    # b_dh: gradient w.r.t. the state after the token being processed.
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + o_h, mask=m_h, other=0.0)
    for i_s in range(eos - bos):
        t = eos - 1 - i_s
        i_tok = t * H + i_h
        i_part = i_v * T_all * H + i_tok
        b_q = tl.load(q + i_tok * K + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + i_tok * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + i_tok * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_do = tl.load(do + i_tok * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + i_tok).to(tl.float32)
        b_a = tl.load(hs + i_tok * K * V + o_h, mask=m_h, other=0.0)
        if USE_G:
            b_eg = tl.exp(tl.load(g + i_tok).to(tl.float32))
            b_a = b_a * b_eg
        b_r = b_v - tl.sum(b_a * b_k[:, None], 0)
        b_u = b_beta * b_r
        b_s = b_a + b_k[:, None] * b_u[None, :]

        b_dq = tl.sum(b_s * b_do[None, :], 1) * scale
        b_dh += b_q[:, None] * b_do[None, :]
        b_du = tl.sum(b_dh * b_k[:, None], 0)
        b_dr = b_beta * b_du
        b_dk = tl.sum(b_dh * b_u[None, :], 1) - tl.sum(b_a * b_dr[None, :], 1)
        b_dbeta = tl.sum(b_du * b_r, 0)
        # Gradient w.r.t. A_t: the identity path minus the recall path through u.
        b_dh = b_dh - b_k[:, None] * b_dr[None, :]

        tl.store(dq + i_part * K + o_k, b_dq, mask=m_k)
        tl.store(dk + i_part * K + o_k, b_dk, mask=m_k)
        tl.store(dv + i_tok * V + o_v, b_dr, mask=m_v)
        tl.store(dbeta + i_part, b_dbeta)
        if USE_G:
            tl.store(dg + i_part, tl.sum(tl.sum(b_dh * b_a, 1), 0))
            b_dh = b_dh * b_eg
    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + o_h, b_dh, mask=m_h)


@triton.jit
def _inverse16(b_L):
    """``(I + L)^{-1}`` of a strictly lower ``[16, 16]`` block by forward substitution (fp32, CUDA cores).

    Row i of ``Tm - I`` is ``-L_i - sum_{j<i} L_ij (Tm - I)_j``; rows 0 and 1 equal ``-L`` already.
    """
    o_i = tl.arange(0, 16)
    b_X = -b_L
    for i in range(2, 16):
        b_a = tl.sum(tl.where(o_i[:, None] == i, b_X, 0.0), 0)
        b_a = b_a + tl.sum(b_a[:, None] * b_X, 0)
        b_X = tl.where(o_i[:, None] == i, b_a[None, :], b_X)
    return b_X + tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)


@triton.jit
def _scaled_block(b_A, b_beta, b_gi, b_gj, m_i, DIAG: tl.constexpr, USE_G: tl.constexpr):
    """``beta_i (k_i . k_j) exp(b_i - b_j)`` for one 16 x 16 block of L (strictly lower on the diagonal).

    Exponents are masked before exp: rows past the sequence end (zero keys) and entries above the diagonal."""
    o_i = tl.arange(0, 16)
    m = m_i[:, None] & (o_i[None, :] >= 0)
    if DIAG:
        m = m & (o_i[:, None] > o_i[None, :])
    b_A = b_A * b_beta[:, None]
    if USE_G:
        b_A = b_A * tl.exp(tl.where(m, b_gi[:, None] - b_gj[None, :], 0.0))
    return tl.where(m, b_A, 0.0)


@triton.jit
def kkt_solve_kernel(k, beta, gc, A, cu_seqlens, chunk_idx,
                     H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, USE_G: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr, SOLVE_PREC: tl.constexpr):
    """``Tm = (I + L)^{-1}`` of one chunk, built from its ten lower 16 x 16 blocks of L held in registers.

    Diagonal blocks are inverted by substitution, the others merged block row by block row:
    ``Tm_ij = -Tm_ii sum_{j <= m < i} L_im Tm_mj``. k: ``[T_all, H, K]``; beta: ``[T_all, H]``; gc: ``[T_all, H]``
    fp32; A (out): ``[T_all, H, BT]`` (row t: its chunk's row of Tm). Grid ``(NC, H)``; BT must be 64.
    """
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_t, bos, T = chunk_bounds(cu_seqlens, chunk_idx, i_c)
    p_k = k + (bos * H + i_h) * K
    t0 = i_t * BT

    b_L00 = tl.zeros([16, 16], dtype=tl.float32)
    b_L10 = tl.zeros([16, 16], dtype=tl.float32)
    b_L11 = tl.zeros([16, 16], dtype=tl.float32)
    b_L20 = tl.zeros([16, 16], dtype=tl.float32)
    b_L21 = tl.zeros([16, 16], dtype=tl.float32)
    b_L22 = tl.zeros([16, 16], dtype=tl.float32)
    b_L30 = tl.zeros([16, 16], dtype=tl.float32)
    b_L31 = tl.zeros([16, 16], dtype=tl.float32)
    b_L32 = tl.zeros([16, 16], dtype=tl.float32)
    b_L33 = tl.zeros([16, 16], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_k0 = load_tile(p_k, t0, i_k * BK, T, K, H * K, 1, 16, BK)
        b_k1 = load_tile(p_k, t0 + 16, i_k * BK, T, K, H * K, 1, 16, BK)
        b_k2 = load_tile(p_k, t0 + 32, i_k * BK, T, K, H * K, 1, 16, BK)
        b_k3 = load_tile(p_k, t0 + 48, i_k * BK, T, K, H * K, 1, 16, BK)
        b_L00 += mma(b_k0, tl.trans(b_k0), DOT_DTYPE, DOT_PREC)
        b_L10 += mma(b_k1, tl.trans(b_k0), DOT_DTYPE, DOT_PREC)
        b_L11 += mma(b_k1, tl.trans(b_k1), DOT_DTYPE, DOT_PREC)
        b_L20 += mma(b_k2, tl.trans(b_k0), DOT_DTYPE, DOT_PREC)
        b_L21 += mma(b_k2, tl.trans(b_k1), DOT_DTYPE, DOT_PREC)
        b_L22 += mma(b_k2, tl.trans(b_k2), DOT_DTYPE, DOT_PREC)
        b_L30 += mma(b_k3, tl.trans(b_k0), DOT_DTYPE, DOT_PREC)
        b_L31 += mma(b_k3, tl.trans(b_k1), DOT_DTYPE, DOT_PREC)
        b_L32 += mma(b_k3, tl.trans(b_k2), DOT_DTYPE, DOT_PREC)
        b_L33 += mma(b_k3, tl.trans(b_k3), DOT_DTYPE, DOT_PREC)

    o_i = tl.arange(0, 16)
    m0, m1, m2, m3 = t0 + o_i < T, t0 + 16 + o_i < T, t0 + 32 + o_i < T, t0 + 48 + o_i < T
    p_beta = beta + bos * H + i_h
    b_b0 = load_vec(p_beta, t0, T, H, 16).to(tl.float32)
    b_b1 = load_vec(p_beta, t0 + 16, T, H, 16).to(tl.float32)
    b_b2 = load_vec(p_beta, t0 + 32, T, H, 16).to(tl.float32)
    b_b3 = load_vec(p_beta, t0 + 48, T, H, 16).to(tl.float32)
    b_g0 = tl.zeros([16], dtype=tl.float32)
    b_g1 = tl.zeros([16], dtype=tl.float32)
    b_g2 = tl.zeros([16], dtype=tl.float32)
    b_g3 = tl.zeros([16], dtype=tl.float32)
    if USE_G:
        p_g = gc + bos * H + i_h
        b_g0 = load_vec(p_g, t0, T, H, 16)
        b_g1 = load_vec(p_g, t0 + 16, T, H, 16)
        b_g2 = load_vec(p_g, t0 + 32, T, H, 16)
        b_g3 = load_vec(p_g, t0 + 48, T, H, 16)
    b_L00 = _scaled_block(b_L00, b_b0, b_g0, b_g0, m0, True, USE_G)
    b_L11 = _scaled_block(b_L11, b_b1, b_g1, b_g1, m1, True, USE_G)
    b_L22 = _scaled_block(b_L22, b_b2, b_g2, b_g2, m2, True, USE_G)
    b_L33 = _scaled_block(b_L33, b_b3, b_g3, b_g3, m3, True, USE_G)
    b_L10 = _scaled_block(b_L10, b_b1, b_g1, b_g0, m1, False, USE_G)
    b_L20 = _scaled_block(b_L20, b_b2, b_g2, b_g0, m2, False, USE_G)
    b_L21 = _scaled_block(b_L21, b_b2, b_g2, b_g1, m2, False, USE_G)
    b_L30 = _scaled_block(b_L30, b_b3, b_g3, b_g0, m3, False, USE_G)
    b_L31 = _scaled_block(b_L31, b_b3, b_g3, b_g1, m3, False, USE_G)
    b_L32 = _scaled_block(b_L32, b_b3, b_g3, b_g2, m3, False, USE_G)

    b_T00 = _inverse16(b_L00)
    b_T11 = _inverse16(b_L11)
    b_T22 = _inverse16(b_L22)
    b_T33 = _inverse16(b_L33)
    b_T10 = -mma(mma(b_T11, b_L10, tl.float32, SOLVE_PREC), b_T00, tl.float32, SOLVE_PREC)
    b_T21 = -mma(mma(b_T22, b_L21, tl.float32, SOLVE_PREC), b_T11, tl.float32, SOLVE_PREC)
    b_T32 = -mma(mma(b_T33, b_L32, tl.float32, SOLVE_PREC), b_T22, tl.float32, SOLVE_PREC)
    b_T20 = -mma(b_T22, mma(b_L20, b_T00, tl.float32, SOLVE_PREC) + mma(b_L21, b_T10, tl.float32, SOLVE_PREC),
                 tl.float32, SOLVE_PREC)
    b_T31 = -mma(b_T33, mma(b_L31, b_T11, tl.float32, SOLVE_PREC) + mma(b_L32, b_T21, tl.float32, SOLVE_PREC),
                 tl.float32, SOLVE_PREC)
    b_T30 = -mma(b_T33, mma(b_L30, b_T00, tl.float32, SOLVE_PREC) + mma(b_L31, b_T10, tl.float32, SOLVE_PREC)
                 + mma(b_L32, b_T20, tl.float32, SOLVE_PREC), tl.float32, SOLVE_PREC)

    p_A = A + (bos * H + i_h) * BT
    b_0 = tl.zeros([16, 16], dtype=tl.float32)
    store_tile(p_A, b_T00, t0, 0, T, BT, H * BT, 1, 16, 16)
    store_tile(p_A, b_0, t0, 16, T, BT, H * BT, 1, 16, 16)
    store_tile(p_A, b_0, t0, 32, T, BT, H * BT, 1, 16, 16)
    store_tile(p_A, b_0, t0, 48, T, BT, H * BT, 1, 16, 16)
    store_tile(p_A, b_T10, t0 + 16, 0, T, BT, H * BT, 1, 16, 16)
    store_tile(p_A, b_T11, t0 + 16, 16, T, BT, H * BT, 1, 16, 16)
    store_tile(p_A, b_0, t0 + 16, 32, T, BT, H * BT, 1, 16, 16)
    store_tile(p_A, b_0, t0 + 16, 48, T, BT, H * BT, 1, 16, 16)
    store_tile(p_A, b_T20, t0 + 32, 0, T, BT, H * BT, 1, 16, 16)
    store_tile(p_A, b_T21, t0 + 32, 16, T, BT, H * BT, 1, 16, 16)
    store_tile(p_A, b_T22, t0 + 32, 32, T, BT, H * BT, 1, 16, 16)
    store_tile(p_A, b_0, t0 + 32, 48, T, BT, H * BT, 1, 16, 16)
    store_tile(p_A, b_T30, t0 + 48, 0, T, BT, H * BT, 1, 16, 16)
    store_tile(p_A, b_T31, t0 + 48, 16, T, BT, H * BT, 1, 16, 16)
    store_tile(p_A, b_T32, t0 + 48, 32, T, BT, H * BT, 1, 16, 16)
    store_tile(p_A, b_T33, t0 + 48, 48, T, BT, H * BT, 1, 16, 16)


@triton.jit
def recompute_wu_kernel(k, v, beta, gc, A, w, u, cu_seqlens, chunk_idx,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """``W = Tm (beta Gamma K)``, ``U = Tm (beta V)`` for one chunk. A: ``[T_all, H, BT]``; w: ``[T_all, H, K]``,
    u: ``[T_all, H, V]`` (compute dtype). Grid ``(NC, H)``."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_t, bos, T = chunk_bounds(cu_seqlens, chunk_idx, i_c)
    b_Tm = load_tile(A + (bos * H + i_h) * BT, i_t * BT, 0, T, BT, H * BT, 1, BT, BT)
    b_beta = load_vec(beta + bos * H + i_h, i_t * BT, T, H, BT).to(tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        b_v = load_tile(v + (bos * H + i_h) * V, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        b_u = mma(b_Tm, b_v.to(tl.float32) * b_beta[:, None], DOT_DTYPE, DOT_PREC)
        store_tile(u + (bos * H + i_h) * V, b_u, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
    if USE_G:
        b_g, b_glast = chunk_gates(gc, bos, i_h, i_t, T, H, BT)
        b_beta = b_beta * tl.exp(b_g)
    for i_k in range(tl.cdiv(K, BK)):
        b_k = load_tile(k + (bos * H + i_h) * K, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
        b_w = mma(b_Tm, b_k.to(tl.float32) * b_beta[:, None], DOT_DTYPE, DOT_PREC)
        store_tile(w + (bos * H + i_h) * K, b_w, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)


@triton.jit
def _load_state(p, i_nh, c_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                LOAD: tl.constexpr):
    """Columns ``[c_v, c_v + BV)`` of the ``[K, V]`` matrix ``i_nh`` of ``p`` (``[N * H, K, V]``) as four
    ``[BK, BV]`` fp32 row tiles (zeros past K, all zeros without ``LOAD``): the register layout of the sequential
    passes."""
    b_1 = tl.zeros([BK, BV], dtype=tl.float32)
    b_2 = tl.zeros([BK, BV], dtype=tl.float32)
    b_3 = tl.zeros([BK, BV], dtype=tl.float32)
    b_4 = tl.zeros([BK, BV], dtype=tl.float32)
    if LOAD:
        p_s = p + i_nh.to(tl.int64) * K * V
        b_1 += load_tile(p_s, 0, c_v, K, V, V, 1, BK, BV)
        if K > BK:
            b_2 += load_tile(p_s, BK, c_v, K, V, V, 1, BK, BV)
        if K > 2 * BK:
            b_3 += load_tile(p_s, 2 * BK, c_v, K, V, V, 1, BK, BV)
        if K > 3 * BK:
            b_4 += load_tile(p_s, 3 * BK, c_v, K, V, V, 1, BK, BV)
    return b_1, b_2, b_3, b_4


@triton.jit
def _store_state(p, b_1, b_2, b_3, b_4, c_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Inverse of :func:`_load_state` (tiles past K are not stored)."""
    store_tile(p, b_1, 0, c_v, K, V, V, 1, BK, BV)
    if K > BK:
        store_tile(p, b_2, BK, c_v, K, V, V, 1, BK, BV)
    if K > 2 * BK:
        store_tile(p, b_3, 2 * BK, c_v, K, V, V, 1, BK, BV)
    if K > 3 * BK:
        store_tile(p, b_4, 3 * BK, c_v, K, V, V, 1, BK, BV)


@triton.jit
def state_fwd_kernel(k, w, u, gc, h, x, h0, ht, cu_seqlens, chunk_offsets,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Sequential over the chunks of one sequence and head, one ``[K, BV]`` slice of the state per program.

    Per chunk: store the chunk-start state, ``X = U - W h``, ``h <- exp(b_C) h + K^T (exp(b_C - b) X)``.
    k, w: ``[T_all, H, K]``; u, x (out): ``[T_all, H, V]``; h (out): ``[NC, H, K, V]``; h0, ht: ``[N, H, K, V]``
    fp32. The key dim is split into up to four ``[BK, BV]`` fp32 tiles. Grid ``(cdiv(V, BV), N * H)``.
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, NT, boc = seq_bounds(cu_seqlens, chunk_offsets, i_n, BT)
    p_k = k + (bos * H + i_h) * K
    p_w = w + (bos * H + i_h) * K
    c_v = i_v * BV

    b_h1, b_h2, b_h3, b_h4 = _load_state(h0, i_nh, c_v, K, V, BK, BV, USE_H0)
    for i_t in range(NT):
        t0 = i_t * BT
        _store_state(h + ((boc + i_t) * H + i_h) * K * V, b_h1, b_h2, b_h3, b_h4, c_v, K, V, BK, BV)
        b_x = load_tile(u + (bos * H + i_h) * V, t0, c_v, T, V, H * V, 1, BT, BV).to(tl.float32)
        b_x -= mma(load_tile(p_w, t0, 0, T, K, H * K, 1, BT, BK), b_h1, DOT_DTYPE, DOT_PREC)
        if K > BK:
            b_x -= mma(load_tile(p_w, t0, BK, T, K, H * K, 1, BT, BK), b_h2, DOT_DTYPE, DOT_PREC)
        if K > 2 * BK:
            b_x -= mma(load_tile(p_w, t0, 2 * BK, T, K, H * K, 1, BT, BK), b_h3, DOT_DTYPE, DOT_PREC)
        if K > 3 * BK:
            b_x -= mma(load_tile(p_w, t0, 3 * BK, T, K, H * K, 1, BT, BK), b_h4, DOT_DTYPE, DOT_PREC)
        store_tile(x + (bos * H + i_h) * V, b_x, t0, c_v, T, V, H * V, 1, BT, BV)
        if USE_G:
            b_g, b_glast = chunk_gates(gc, bos, i_h, i_t, T, H, BT)
            # Decay the chunk's values to its end instead of its keys: one [BT, BV] scale for every key tile.
            b_x *= tl.exp(tl.where(t0 + tl.arange(0, BT) < T, b_glast - b_g, 0.0))[:, None]
            b_d = tl.exp(b_glast)
            b_h1 *= b_d
            b_h2 *= b_d
            b_h3 *= b_d
            b_h4 *= b_d
        b_h1 += mma(load_tile(p_k, 0, t0, K, T, 1, H * K, BK, BT), b_x, DOT_DTYPE, DOT_PREC)
        if K > BK:
            b_h2 += mma(load_tile(p_k, BK, t0, K, T, 1, H * K, BK, BT), b_x, DOT_DTYPE, DOT_PREC)
        if K > 2 * BK:
            b_h3 += mma(load_tile(p_k, 2 * BK, t0, K, T, 1, H * K, BK, BT), b_x, DOT_DTYPE, DOT_PREC)
        if K > 3 * BK:
            b_h4 += mma(load_tile(p_k, 3 * BK, t0, K, T, 1, H * K, BK, BT), b_x, DOT_DTYPE, DOT_PREC)
    if STORE_HT:
        _store_state(ht + i_nh.to(tl.int64) * K * V, b_h1, b_h2, b_h3, b_h4, c_v, K, V, BK, BV)


@triton.jit
def _state_bwd_step(b_dh, p_q, p_w, c_k, t0, T, b_qs, b_do, b_dx,
                    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key tile of ``dh <- dh + (scale Gamma Q)^T dO - W^T dX`` (dh already decayed)."""
    b_qt = load_tile(p_q, c_k, t0, K, T, 1, H * K, BK, BT).to(tl.float32) * b_qs[None, :]
    b_wt = load_tile(p_w, c_k, t0, K, T, 1, H * K, BK, BT)
    return b_dh + mma(b_qt, b_do, DOT_DTYPE, DOT_PREC) - mma(b_wt, b_dx, DOT_DTYPE, DOT_PREC)


@triton.jit
def state_bwd_kernel(q, k, w, gc, do, dxl, dx, dh, dht, dh0, cu_seqlens, chunk_offsets, scale,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     USE_G: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Reverse sequential pass: ``dh[c]`` is the gradient of the state at the END of chunk c.

    Per chunk (last first): ``dX = dX_local + exp(b_C - b) K dh`` (the total gradient of the corrected values),
    then ``dh <- exp(b_C) dh + scale (Gamma Q)^T dO - W^T dX``. dxl: ``[T_all, H, V]`` fp32 intra-chunk part;
    dx (out): ``[T_all, H, V]`` fp32; dh (out): ``[NC, H, K, V]``; dht, dh0: ``[N, H, K, V]`` fp32.
    Grid ``(cdiv(V, BV), N * H)``.
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, NT, boc = seq_bounds(cu_seqlens, chunk_offsets, i_n, BT)
    p_q = q + (bos * H + i_h) * K
    p_k = k + (bos * H + i_h) * K
    p_w = w + (bos * H + i_h) * K
    c_v = i_v * BV
    o_i = tl.arange(0, BT)

    b_dh1, b_dh2, b_dh3, b_dh4 = _load_state(dht, i_nh, c_v, K, V, BK, BV, USE_DHT)
    for i_s in range(NT):
        i_t = NT - 1 - i_s
        t0 = i_t * BT
        _store_state(dh + ((boc + i_t) * H + i_h) * K * V, b_dh1, b_dh2, b_dh3, b_dh4, c_v, K, V, BK, BV)
        b_dx = mma(load_tile(p_k, t0, 0, T, K, H * K, 1, BT, BK), b_dh1, DOT_DTYPE, DOT_PREC)
        if K > BK:
            b_dx += mma(load_tile(p_k, t0, BK, T, K, H * K, 1, BT, BK), b_dh2, DOT_DTYPE, DOT_PREC)
        if K > 2 * BK:
            b_dx += mma(load_tile(p_k, t0, 2 * BK, T, K, H * K, 1, BT, BK), b_dh3, DOT_DTYPE, DOT_PREC)
        if K > 3 * BK:
            b_dx += mma(load_tile(p_k, t0, 3 * BK, T, K, H * K, 1, BT, BK), b_dh4, DOT_DTYPE, DOT_PREC)
        b_qs = tl.full([BT], 1.0, dtype=tl.float32) * scale
        if USE_G:
            b_g, b_glast = chunk_gates(gc, bos, i_h, i_t, T, H, BT)
            b_dx *= tl.exp(tl.where(t0 + o_i < T, b_glast - b_g, 0.0))[:, None]
            b_qs *= tl.exp(b_g)
            b_d = tl.exp(b_glast)
            b_dh1 *= b_d
            b_dh2 *= b_d
            b_dh3 *= b_d
            b_dh4 *= b_d
        b_dx += load_tile(dxl + (bos * H + i_h) * V, t0, c_v, T, V, H * V, 1, BT, BV)
        store_tile(dx + (bos * H + i_h) * V, b_dx, t0, c_v, T, V, H * V, 1, BT, BV)
        b_do = load_tile(do + (bos * H + i_h) * V, t0, c_v, T, V, H * V, 1, BT, BV)
        b_dh1 = _state_bwd_step(b_dh1, p_q, p_w, 0, t0, T, b_qs, b_do, b_dx, H, K, BT, BK, DOT_DTYPE, DOT_PREC)
        if K > BK:
            b_dh2 = _state_bwd_step(b_dh2, p_q, p_w, BK, t0, T, b_qs, b_do, b_dx, H, K, BT, BK, DOT_DTYPE, DOT_PREC)
        if K > 2 * BK:
            b_dh3 = _state_bwd_step(b_dh3, p_q, p_w, 2 * BK, t0, T, b_qs, b_do, b_dx, H, K, BT, BK, DOT_DTYPE,
                                    DOT_PREC)
        if K > 3 * BK:
            b_dh4 = _state_bwd_step(b_dh4, p_q, p_w, 3 * BK, t0, T, b_qs, b_do, b_dx, H, K, BT, BK, DOT_DTYPE,
                                    DOT_PREC)
    if STORE_DH0:
        _store_state(dh0 + i_nh.to(tl.int64) * K * V, b_dh1, b_dh2, b_dh3, b_dh4, c_v, K, V, BK, BV)


@triton.jit
def wy_bwd_kernel(k, v, beta, gc, A, w, u, dw, du, dk_in, dk, dv, dbeta, dB, cu_seqlens, chunk_idx, T_all,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Gradients through ``W = Tm R_k``, ``U = Tm R_v`` (R_k = beta Gamma K, R_v = beta V, Tm = (I + L)^{-1}).

    ``dR = Tm^T dW``, ``dL = -(dR_k W^T + dR_v U^T)``; L = strict_lower(beta K K^T * M) then gives dk and dbeta.
    dw, du (= dX), dk_in (from the dq/dk kernel): fp32 ``[T_all, H, *]``; dk, dv (out) fp32; dbeta (out)
    ``[T_all, H]`` fp32; dB (out, gated only): ``[T_all, H]`` fp32, the ``-v . dv`` gate term. Grid ``(NC, H)``.
    """
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_t, bos, T = chunk_bounds(cu_seqlens, chunk_idx, i_c)
    t0 = i_t * BT
    b_Tmt = tl.trans(load_tile(A + (bos * H + i_h) * BT, t0, 0, T, BT, H * BT, 1, BT, BT))
    b_beta = load_vec(beta + bos * H + i_h, t0, T, H, BT).to(tl.float32)
    b_dL = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    b_dBv = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        c_v = i_v * BV
        b_drv = mma(b_Tmt, load_tile(du + (bos * H + i_h) * V, t0, c_v, T, V, H * V, 1, BT, BV), DOT_DTYPE, DOT_PREC)
        b_v = load_tile(v + (bos * H + i_h) * V, t0, c_v, T, V, H * V, 1, BT, BV).to(tl.float32)
        b_dv = b_drv * b_beta[:, None]
        store_tile(dv + (bos * H + i_h) * V, b_dv, t0, c_v, T, V, H * V, 1, BT, BV)
        b_dbeta += tl.sum(b_drv * b_v, 1)
        b_dBv -= tl.sum(b_v * b_dv, 1)
        b_u = load_tile(u + (bos * H + i_h) * V, t0, c_v, T, V, H * V, 1, BT, BV)
        b_dL -= mma(b_drv, tl.trans(b_u), DOT_DTYPE, DOT_PREC)

    o_i = tl.arange(0, BT)
    strict = (o_i[:, None] > o_i[None, :]) & (t0 + o_i < T)[:, None]
    b_gam = tl.full([BT], 1.0, dtype=tl.float32)
    if USE_G:
        b_g, b_glast = chunk_gates(gc, bos, i_h, i_t, T, H, BT)
        b_gam = tl.exp(b_g)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        c_k = i_k * BK
        b_k = load_tile(k + (bos * H + i_h) * K, t0, c_k, T, K, H * K, 1, BT, BK)
        b_drk = mma(b_Tmt, load_tile(dw + (bos * H + i_h) * K, t0, c_k, T, K, H * K, 1, BT, BK), DOT_DTYPE, DOT_PREC)
        b_w = load_tile(w + (bos * H + i_h) * K, t0, c_k, T, K, H * K, 1, BT, BK)
        b_dL -= mma(b_drk, tl.trans(b_w), DOT_DTYPE, DOT_PREC)
        b_kk += mma(b_k, tl.trans(b_k), DOT_DTYPE, DOT_PREC)
        b_dbeta += tl.sum(b_drk * b_k.to(tl.float32), 1) * b_gam
    if USE_G:
        b_dL *= tl.exp(tl.where(strict, b_g[:, None] - b_g[None, :], 0.0))
    b_dL = tl.where(strict, b_dL, 0.0)
    b_dbeta += tl.sum(b_dL * b_kk, 1)
    store_vec(dbeta + bos * H + i_h, b_dbeta, t0, T, H, BT)
    if USE_G:
        store_vec(dB + bos * H + i_h, b_dBv, t0, T, H, BT)

    for i_k in range(tl.cdiv(K, BK)):
        c_k = i_k * BK
        b_k = load_tile(k + (bos * H + i_h) * K, t0, c_k, T, K, H * K, 1, BT, BK).to(tl.float32)
        b_drk = mma(b_Tmt, load_tile(dw + (bos * H + i_h) * K, t0, c_k, T, K, H * K, 1, BT, BK), DOT_DTYPE, DOT_PREC)
        b_dk = load_tile(dk_in + (bos * H + i_h) * K, t0, c_k, T, K, H * K, 1, BT, BK)
        b_dk += b_drk * (b_beta * b_gam)[:, None]
        b_dk += mma(b_dL, b_k, DOT_DTYPE, DOT_PREC) * b_beta[:, None]
        b_dk += mma(tl.trans(b_dL), b_k * b_beta[:, None], DOT_DTYPE, DOT_PREC)
        store_tile(dk + (bos * H + i_h) * K, b_dk, t0, c_k, T, K, H * K, 1, BT, BK)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------

# Sequential passes: BV sets the parallelism ((V / BV) * N * H programs) against the per-program work; the first
# config is the one that fits every target (sm_86's 101 KB) at K = V = 256.
state_configs = by_dtype(
    configs(({"BV": 32}, 4, 1), ({"BV": 32}, 4, 2), ({"BV": 64}, 4, 1), ({"BV": 64}, 4, 2), ({"BV": 16}, 4, 2),
            ({"BV": 32}, 4, 3), ({"BV": 64}, 8, 2)),
    configs(({"BV": 32}, 8, 1), ({"BV": 16}, 4, 1), ({"BV": 32}, 4, 1), ({"BV": 64}, 8, 1)))
# The triangular solve keeps ten 16 x 16 fp32 tiles live and is latency-bound: few warps.
solve_configs = by_dtype(configs(({}, 4, 2), ({}, 2, 2), ({}, 4, 3), ({}, 8, 2), ({}, 4, 1)),
                         configs(({}, 8, 1), ({}, 4, 1)))
_KEY = ["H", "K", "V", "USE_G", "DOT_DTYPE"]


def kkt_solve(k, beta, gc, seqs: Seqs) -> torch.Tensor:
    """-> the chunk inverses Tm ``[T_all, H, BT]`` in the compute dtype."""
    _, H, K = k.shape
    dc = dot_config(k.dtype)
    A = k.new_empty(k.shape[0], H, seqs.BT, dtype=store_dtype(k.dtype))
    launch(kkt_solve_kernel, lambda m: (seqs.NC, H), solve_configs(k.dtype), ["H", "K", "USE_G", "DOT_DTYPE"],
           k=k, beta=beta, gc=gc, A=A, cu_seqlens=seqs.cu_seqlens, chunk_idx=seqs.chunk_idx, H=H, K=K, BT=seqs.BT,
           BK=tile(K), USE_G=gc is not None, **dc,
           # Half inputs: tf32 merges (the substitution itself is exact fp32); fp32 inputs keep fp32 accuracy.
           SOLVE_PREC="tf32" if dc["DOT_PREC"] is None else dc["DOT_PREC"])
    return A


def recompute_wu(k, v, beta, gc, A, seqs: Seqs):
    """-> W ``[T_all, H, K]`` and U ``[T_all, H, V]`` in the compute dtype."""
    _, H, K = k.shape
    V = v.shape[-1]
    sd = store_dtype(k.dtype)
    w, u = torch.empty_like(k, dtype=sd), torch.empty_like(v, dtype=sd)
    launch(recompute_wu_kernel, lambda m: (seqs.NC, H), parallel_configs(k.dtype), _KEY,
           k=k, v=v, beta=beta, gc=gc, A=A, w=w, u=u, cu_seqlens=seqs.cu_seqlens, chunk_idx=seqs.chunk_idx,
           H=H, K=K, V=V, BT=seqs.BT, BK=tile(K), BV=tile(V), USE_G=gc is not None, **dot_config(k.dtype))
    return w, u


def state_fwd(k, w, u, gc, h0, seqs: Seqs, store_final: bool):
    """-> chunk-start states ``h [NC, H, K, V]``, corrected values ``X [T_all, H, V]`` (compute dtype) and the
    final state ``[N, H, K, V]`` fp32 (or None)."""
    _, H, K = k.shape
    V = u.shape[-1]
    h = k.new_empty(seqs.NC, H, K, V, dtype=store_dtype(k.dtype))
    x = torch.empty_like(u)
    ht = k.new_empty(seqs.N, H, K, V, dtype=torch.float32) if store_final else None
    launch(state_fwd_kernel, lambda m: (triton.cdiv(V, m["BV"]), seqs.N * H), state_configs(k.dtype),
           _KEY, k=k, w=w, u=u, gc=gc, h=h, x=x, h0=h0, ht=ht, cu_seqlens=seqs.cu_seqlens, chunk_offsets=seqs.chunk_offsets,
           H=H, K=K, V=V, BT=seqs.BT, BK=tile(K), USE_G=gc is not None, USE_H0=h0 is not None,
           STORE_HT=store_final, **dot_config(k.dtype))
    return h, x, ht


def state_bwd(q, k, w, gc, do, dxl, dht, scale: float, seqs: Seqs, store_dh0: bool):
    """-> end-of-chunk state gradients ``dh [NC, H, K, V]``, ``dh0`` (or None) and the total dX (fp32)."""
    _, H, K = q.shape
    V = do.shape[-1]
    dh = q.new_empty(seqs.NC, H, K, V, dtype=store_dtype(q.dtype))
    dh0 = q.new_empty(seqs.N, H, K, V, dtype=torch.float32) if store_dh0 else None
    dx = torch.empty_like(dxl)
    launch(state_bwd_kernel, lambda m: (triton.cdiv(V, m["BV"]), seqs.N * H), state_configs(q.dtype),
           _KEY, q=q, k=k, w=w, gc=gc, do=do, dxl=dxl, dx=dx, dh=dh, dht=dht, dh0=dh0, cu_seqlens=seqs.cu_seqlens,
           chunk_offsets=seqs.chunk_offsets, scale=scale, H=H, K=K, V=V, BT=seqs.BT, BK=tile(K),
           USE_G=gc is not None, USE_DHT=dht is not None, STORE_DH0=store_dh0, **dot_config(q.dtype))
    return dh, dh0, dx


def wy_bwd(k, v, beta, gc, A, w, u, dw, dx, dk_in, seqs: Seqs):
    """-> fp32 dk, dv, dbeta and the ``-v . dv`` gate term ``[T_all, H]`` (or None)."""
    T_all, H, K = k.shape
    V = v.shape[-1]
    f32 = dict(dtype=torch.float32, device=k.device)
    dk, dv = torch.empty(T_all, H, K, **f32), torch.empty(T_all, H, V, **f32)
    dbeta = torch.empty(T_all, H, **f32)
    dB = torch.empty(T_all, H, **f32) if gc is not None else None
    launch(wy_bwd_kernel, lambda m: (seqs.NC, H), parallel_configs(k.dtype), _KEY,
           k=k, v=v, beta=beta, gc=gc, A=A, w=w, u=u, dw=dw, du=dx, dk_in=dk_in, dk=dk, dv=dv, dbeta=dbeta, dB=dB,
           cu_seqlens=seqs.cu_seqlens, chunk_idx=seqs.chunk_idx, T_all=T_all, H=H, K=K, V=V, BT=seqs.BT,
           BK=tile(K), BV=tile(V), USE_G=gc is not None, **dot_config(k.dtype))
    return dk, dv, dbeta, dB


def fused_recurrent_fwd(q, k, v, beta, g, h0, scale: float, seqs: Seqs, store_final: bool, store_states: bool):
    """-> o, the final state (or None) and the pre-token states ``[T_all, H, K, V]`` fp32 (or None)."""
    T_all, H, K = q.shape
    V = v.shape[-1]
    BK, BV, nw = fused_tiles(K, V)
    o = torch.empty_like(v)
    ht = q.new_empty(seqs.N, H, K, V, dtype=torch.float32) if store_final else None
    hs = q.new_empty(T_all, H, K, V, dtype=torch.float32) if store_states else None
    launch(fused_recurrent_fwd_kernel, lambda m: (triton.cdiv(V, BV), seqs.N * H), configs(({}, nw, 1)), [],
           q=q, k=k, v=v, beta=beta, g=g, h0=h0, o=o, ht=ht, hs=hs, cu_seqlens=seqs.cu_seqlens, scale=scale,
           H=H, K=K, V=V, BK=BK, BV=BV, USE_G=g is not None, USE_H0=h0 is not None, STORE_HT=store_final,
           STORE_HS=store_states)
    return o, ht, hs


def fused_recurrent_bwd(q, k, v, beta, g, hs, do, dht, scale: float, seqs: Seqs, store_dh0: bool):
    """-> fp32 dq, dk, dv, dbeta, dg (or None), dh0 (or None)."""
    T_all, H, K = q.shape
    V = v.shape[-1]
    BK, BV, nw = fused_tiles(K, V)
    NV = triton.cdiv(V, BV)
    f32 = dict(dtype=torch.float32, device=q.device)
    dq, dk = torch.empty(NV, T_all, H, K, **f32), torch.empty(NV, T_all, H, K, **f32)
    dv = torch.empty(T_all, H, V, **f32)
    dbeta = torch.empty(NV, T_all, H, **f32)
    dg = torch.empty(NV, T_all, H, **f32) if g is not None else None
    dh0 = torch.empty(seqs.N, H, K, V, **f32) if store_dh0 else None
    launch(fused_recurrent_bwd_kernel, lambda m: (NV, seqs.N * H), configs(({}, nw, 1)), [],
           q=q, k=k, v=v, beta=beta, g=g, hs=hs, do=do, dht=dht, dq=dq, dk=dk, dv=dv, dbeta=dbeta, dg=dg, dh0=dh0,
           cu_seqlens=seqs.cu_seqlens, scale=scale, T_all=T_all, H=H, K=K, V=V, BK=BK, BV=BV, USE_G=g is not None,
           USE_DHT=dht is not None, STORE_DH0=store_dh0)
    return dq.sum(0), dk.sum(0), dv, dbeta.sum(0), (dg.sum(0) if dg is not None else None), dh0


# ---------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------


def _grad(x: torch.Tensor | None, dx: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
    return None if x is None or dx is None or not needed else dx.to(x.dtype)


class ChunkDeltaRuleFunction(torch.autograd.Function):
    """Chunked path on packed tensors: q, k ``[T_all, H, K]``, v ``[T_all, H, V]``, beta and g ``[T_all, H]``,
    initial_state ``[N, H, K, V]`` fp32 or None -> o ``[T_all, H, V]``, final state ``[N, H, K, V]`` or None.

    Saves only the inputs, the chunk inverses and the final state; W, U, the states and X are recomputed."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, scale, seqs, output_final_state):
        gc = chunk_local_cumsum(g, seqs) if g is not None else None
        A = kkt_solve(k, beta, gc, seqs)
        w, u = recompute_wu(k, v, beta, gc, A, seqs)
        # The final state enters dg even when the caller does not want it.
        store_final = output_final_state or g is not None
        h, x, ht = state_fwd(k, w, u, gc, initial_state, seqs, store_final)
        o = chunk_output(q, k, x, gc, h, scale, seqs)
        ctx.save_for_backward(q, k, v, beta, g, gc, A, initial_state, ht)
        ctx.scale, ctx.seqs = scale, seqs
        ctx.set_materialize_grads(False)
        return o, (ht if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, gc, A, h0, ht = ctx.saved_tensors
        scale, seqs = ctx.scale, ctx.seqs
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dht = None if dht is None else dht.float().contiguous()
        w, u = recompute_wu(k, v, beta, gc, A, seqs)
        h, x, _ = state_fwd(k, w, u, gc, h0, seqs, False)
        dxl = chunk_dv(q, k, do, gc, None, scale, seqs, out_dtype=torch.float32)
        dh, dh0, dx = state_bwd(q, k, w, gc, do, dxl, dht, scale, seqs, h0 is not None)
        dq, dk, dw, dBq = chunk_dqk(q, k, x, do, gc, h, dh, scale, seqs, dx=dx)
        dk, dv, dbeta, dBv = wy_bwd(k, v, beta, gc, A, w, u, dw, dx, dk, seqs)
        dg = None
        if g is not None and ctx.needs_input_grad[4]:
            dg = dg_from_terms(torch.cat([dBq, dBv[None]]), ht, dht, seqs, g.dtype)
        need = ctx.needs_input_grad
        return (_grad(q, dq, need[0]), _grad(k, dk, need[1]), _grad(v, dv, need[2]), _grad(beta, dbeta, need[3]),
                dg, _grad(h0, dh0, need[5]), None, None, None)


class FusedRecurrentDeltaRuleFunction(torch.autograd.Function):
    """Token-by-token forward; the backward replays the tokens in reverse from the stored pre-token states.
    Same packed interface as :class:`ChunkDeltaRuleFunction`."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, scale, seqs, output_final_state):
        needs_grad = any(x is not None and x.requires_grad for x in (q, k, v, beta, g, initial_state))
        o, ht, hs = fused_recurrent_fwd(q, k, v, beta, g, initial_state, scale, seqs, output_final_state, needs_grad)
        ctx.save_for_backward(q, k, v, beta, g, initial_state, hs)
        ctx.scale, ctx.seqs = scale, seqs
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, h0, hs = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dht = None if dht is None else dht.float().contiguous()
        dq, dk, dv, dbeta, dg, dh0 = fused_recurrent_bwd(q, k, v, beta, g, hs, do, dht, ctx.scale, ctx.seqs,
                                                         h0 is not None)
        need = ctx.needs_input_grad
        return (_grad(q, dq, need[0]), _grad(k, dk, need[1]), _grad(v, dv, need[2]), _grad(beta, dbeta, need[3]),
                _grad(g, dg, need[4]), _grad(h0, dh0, need[5]), None, None, None)


# ---------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------


def _run(fn, q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, op: str, seqs=None):
    refuse_float64(op, q=q, k=k, v=v, beta=beta, g=g, initial_state=initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if fn is ChunkDeltaRuleFunction and K > TRITON_DELTA_MAX_K:
        raise ValueError(f"{op}: the chunked Triton delta rule holds the key dim in at most four 64-wide register "
                         f"tiles (K <= {TRITON_DELTA_MAX_K}); got K = {K}. Use backend='chunk' (or 'auto', which "
                         "routes such keys there).")
    scale = K**-0.5 if scale is None else float(scale)
    if seqs is None:
        seqs = Seqs(B, T, cu_seqlens, q.device)
    v_dtype = v.dtype
    q, k, v = promote_qkv(q, k, v)
    beta = beta.reshape(B * T, H).contiguous()
    g = None if g is None else g.reshape(B * T, H).contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht = fn.apply(q, k, v, beta, g, h0, scale, seqs, output_final_state)
    return o.reshape(B, T, H, V).to(v_dtype), ht


def fused_recurrent_delta_rule(
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
    """Token-by-token Triton kernel (decoding, short inputs). Shapes as in :func:`triton_delta_rule`.

    When gradients are needed it stores every pre-token state (``T * H * K * V`` floats): meant for short T.
    """
    return _run(FusedRecurrentDeltaRuleFunction, q, k, v, beta, g, scale, initial_state, output_final_state,
                cu_seqlens, "fused_recurrent_delta_rule")


def triton_chunk_delta_rule(
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
    """Chunkwise-parallel Triton path (chunks of 64 tokens, K <= 256). Shapes as in :func:`triton_delta_rule`."""
    return _run(ChunkDeltaRuleFunction, q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens,
                "triton_chunk_delta_rule")


def triton_delta_rule(
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
    """Causal (gated) delta rule in Triton; the fused recurrent kernel when every sequence has at most 64 tokens.

    Args:
        q, k: ``[B, T, H, K]`` (K <= 256 for inputs longer than 64 tokens); v: ``[B, T, H, V]``;
        beta, g: ``[B, T, H]`` (g: log-decay or None); initial_state: ``[N, H, K, V]`` float32 (N = B, or the
        number of sequences in cu_seqlens); cu_seqlens: ``[N + 1]`` offsets of sequences packed along T (B == 1).

    Returns:
        ``o [B, T, H, V]`` in v's dtype and the float32 final state ``[N, H, K, V]`` (or None).
    """
    if cu_seqlens is not None:
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    else:
        longest = q.shape[1]
    fn = fused_recurrent_delta_rule if longest <= TRITON_FUSED_MAX_LEN else triton_chunk_delta_rule
    return fn(q, k, v, beta, g=g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens)
