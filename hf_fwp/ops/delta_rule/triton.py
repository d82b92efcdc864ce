"""Triton (gated) delta rule: a chunkwise-parallel path (WY / UT representation) and a fused recurrent path.

Rule (per head, S is K x V)::

    A_t = exp(g_t) S_{t-1}
    S_t = A_t + beta_t k_t (v_t - A_t^T k_t)^T
    o_t = S_t^T (scale * q_t)

Layout: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, beta and g ``[B, T, H]``, states ``[B, H, K, V]`` float32.
All state math accumulates in float32 whatever the input dtype; float64 inputs are refused (use the pure-torch
backends for gradcheck).

Chunked algorithm (chunk of BT tokens, within-chunk cumulative log-decay ``b``, ``Gamma = exp(b)``, causal
decay mask ``M[t, i] = exp(b_t - b_i)`` for ``i <= t``)::

    L = strict_lower(diag(beta) K K^T * M),  Tm = (I + L)^{-1}
    W_v = Tm (beta V),  W_k = Tm (beta Gamma K),  U = W_v - W_k S_n
    O = scale (Gamma Q) S_n + (scale Q K^T * M) U
    S_{n+1} = exp(b_C) S_n + (exp(b_C - b) K)^T U

Forward kernels: per-chunk preparation (L, Tm, W_k, W_v), a sequential state pass (chunk-start states and U),
and a per-chunk output pass. Backward: a reverse sequential pass for the state gradients and the total dU, then
one per-chunk pass for dq, dk, dv, dbeta and the gradient of the cumulative log-decay (turned into dg by a
reverse cumsum within each chunk).

Without a GPU the kernels run under ``TRITON_INTERPRET=1``; the launch configs are fixed (no autotuning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hf_fwp.ops.utils import varlen_padded

__all__ = ["triton_delta_rule", "fused_recurrent_delta_rule", "triton_chunk_delta_rule"]

CHUNK_SIZE = 64
# Up to this length the token-by-token kernel is used: it stores every state for the backward pass.
RECURRENT_MAX_T = 64
MAX_HEAD_DIM_K = 128


@triton.jit
def _dot(a, b):
    # tf32x3 keeps float32 accuracy on tensor cores: the triangular inverse amplifies plain tf32 rounding.
    return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def fused_recurrent_fwd_kernel(
    q, k, v, beta, g, h0, o, ht, hs, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_HS: tl.constexpr,
):
    """One program per (V block, b * h); the K x BV state lives in registers.

    q, k: [B, T, H, K]; v, o: [B, T, H, V]; beta, g: [B, T, H]; h0, ht: [B, H, K, V] fp32;
    hs: [B, H, T, K, V] fp32, the state *before* each token (kept for the backward pass).
    """
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = o_k[:, None] * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_bh64 * K * V + o_h, mask=m_h, other=0.0)
    for t in range(0, T):
        i_tok = (i_b.to(tl.int64) * T + t) * H + i_h
        b_q = tl.load(q + i_tok * K + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + i_tok * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + i_tok * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + i_tok).to(tl.float32)
        if STORE_HS:
            tl.store(hs + (i_bh64 * T + t) * K * V + o_h, b_h, mask=m_h)
        if USE_G:
            b_h *= tl.exp(tl.load(g + i_tok).to(tl.float32))
        b_u = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))
        b_h += b_k[:, None] * b_u[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0)
        tl.store(o + i_tok * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + i_bh64 * K * V + o_h, b_h, mask=m_h)


@triton.jit
def fused_recurrent_bwd_kernel(
    q, k, v, beta, g, hs, do, dht, dq, dk, dv, dbeta, dg, dh0, scale, T, BTH,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
):
    """Reverse token loop, one program per (V block, b * h), reading the stored pre-token states hs.

    dq, dk: [NV, B, T, H, K] and dbeta, dg: [NV, B, T, H] are per-V-block partial sums (reduced by the caller);
    dv: [B, T, H, V]; dht, dh0: [B, H, K, V]; all gradients fp32. BTH = B * T * H.
    """
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = o_k[:, None] * V + o_v[None, :]

    # b_dh: gradient w.r.t. the state after the token being processed.
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_bh64 * K * V + o_h, mask=m_h, other=0.0)
    for i in range(0, T):
        t = T - 1 - i
        i_tok = (i_b.to(tl.int64) * T + t) * H + i_h
        i_part = i_v * BTH + i_tok
        b_q = tl.load(q + i_tok * K + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + i_tok * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + i_tok * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_do = tl.load(do + i_tok * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + i_tok).to(tl.float32)
        b_a = tl.load(hs + (i_bh64 * T + t) * K * V + o_h, mask=m_h, other=0.0)
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
        tl.store(dh0 + i_bh64 * K * V + o_h, b_dh, mask=m_h)


@triton.jit
def chunk_prepare_fwd_kernel(
    k, v, beta, b, tm, wk, wv, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr,
):
    """Per (chunk, b * h): Tm = (I + L)^{-1}, W_k = Tm (beta Gamma K), W_v = Tm (beta V).

    k: [B, T, H, K]; v: [B, T, H, V]; beta, b (within-chunk cumsum of g, fp32): [B, T, H];
    outputs (fp32): tm [B, T, H, BT], wk [B, T, H, K], wv [B, T, H, V].
    """
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    o_k = tl.arange(0, BK)
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    i_row = (i_b * T + o_t) * H + i_h
    m_s = o_i[:, None] > o_i[None, :]

    b_k = tl.load(k + i_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
    b_beta = tl.load(beta + i_row, mask=m_t, other=0.0).to(tl.float32)
    b_L = _dot(b_k, tl.trans(b_k)) * b_beta[:, None]
    b_rk = b_k * b_beta[:, None]
    if USE_G:
        b_b = tl.load(b + i_row, mask=m_t, other=0.0)
        # Exponent masked first: above the diagonal b_t - b_i > 0 may overflow.
        b_L = b_L * tl.exp(tl.where(m_s, b_b[:, None] - b_b[None, :], 0.0))
        b_rk = b_rk * tl.exp(b_b)[:, None]
    b_L = tl.where(m_s, b_L, 0.0)

    # Blockwise inverse with 16 x 16 diagonal blocks. First all diagonal blocks at once by forward substitution:
    # step i finalises row i of every block, Tm[i, :] = e_i - L_diag[i, :] Tm (its earlier rows are final).
    b_eye = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)
    o_blk = o_i // 16
    m_blk = o_blk[:, None] == o_blk[None, :]
    b_tm = b_eye
    for i in range(1, 16):
        m_row = (o_i % 16) == i
        b_new = b_eye - _dot(tl.where(m_row[:, None] & m_blk, b_L, 0.0), b_tm)
        b_tm = tl.where(m_row[:, None], b_new, b_tm)
    # Then block row r below the diagonal: Tm[r, :r] = -Tm[r, r] L[r, :r] Tm[:r, :r] (block rows < r are final,
    # and block row r of Tm still holds only its diagonal block).
    for r in range(1, BT // 16):
        m_r = (o_blk == r)[:, None] & (o_blk < r)[None, :]
        b_x = _dot(tl.where(m_r, b_L, 0.0), b_tm)
        b_tm = tl.where(m_r, -_dot(b_tm, b_x), b_tm)

    tl.store(tm + i_row[:, None] * BT + o_i[None, :], b_tm, mask=m_t[:, None])
    tl.store(wk + i_row[:, None] * K + o_k[None, :], _dot(b_tm, b_rk), mask=m_tk)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + i_row[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        tl.store(wv + i_row[:, None] * V + o_v[None, :], _dot(b_tm, b_v * b_beta[:, None]), mask=m_tv)


@triton.jit
def chunk_state_fwd_kernel(
    k, wk, wv, b, h0, h, u, ht, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    """Sequential over chunks, one program per (V block, b * h).

    k: [B, T, H, K]; wk: [B, T, H, K], wv: [B, T, H, V], b: [B, T, H] (fp32); h0, ht: [B, H, K, V];
    outputs (fp32): h [B, H, NT, K, V] (chunk-start states), u [B, T, H, V] (the values actually written).
    """
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    o_kv = o_k[:, None] * V + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_bh64 * K * V + o_kv, mask=m_kv, other=0.0)
    for i_t in range(0, NT):
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        i_row = (i_b * T + o_t) * H + i_h
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        tl.store(h + (i_bh64 * NT + i_t) * K * V + o_kv, b_h, mask=m_kv)
        b_wk = tl.load(wk + i_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_wv = tl.load(wv + i_row[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        b_u = b_wv - _dot(b_wk, b_h)
        tl.store(u + i_row[:, None] * V + o_v[None, :], b_u, mask=m_tv)
        b_k = tl.load(k + i_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        if USE_G:
            i_last = tl.minimum(i_t * BT + BT, T) - 1
            b_last = tl.load(b + (i_b * T + i_last) * H + i_h)
            b_b = tl.load(b + i_row, mask=m_t, other=0.0)
            b_k = b_k * tl.exp(b_last - b_b)[:, None]
            b_h = b_h * tl.exp(b_last)
        b_h += _dot(tl.trans(b_k), b_u)
    if STORE_HT:
        tl.store(ht + i_bh64 * K * V + o_kv, b_h, mask=m_kv)


@triton.jit
def chunk_output_fwd_kernel(
    q, k, u, b, h, o, scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr,
):
    """Per (V block, chunk, b * h): O = scale (Gamma Q) S_n + (scale Q K^T * M) U.

    q, k: [B, T, H, K]; u: [B, T, H, V] fp32; b: [B, T, H] fp32; h: [B, H, NT, K, V] fp32; o: [B, T, H, V].
    """
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    i_row = (i_b * T + o_t) * H + i_h
    m_tk = m_t[:, None] & m_k[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    m_c = o_i[:, None] >= o_i[None, :]

    b_q = tl.load(q + i_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32) * scale
    b_k = tl.load(k + i_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
    b_u = tl.load(u + i_row[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
    b_h = tl.load(h + (i_bh64 * NT + i_t) * K * V + o_k[:, None] * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.0)
    b_A = _dot(b_q, tl.trans(b_k))
    if USE_G:
        b_b = tl.load(b + i_row, mask=m_t, other=0.0)
        b_A = b_A * tl.exp(tl.where(m_c, b_b[:, None] - b_b[None, :], 0.0))
        b_q = b_q * tl.exp(b_b)[:, None]
    b_A = tl.where(m_c, b_A, 0.0)
    b_o = _dot(b_q, b_h) + _dot(b_A, b_u)
    tl.store(o + i_row[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)


@triton.jit
def chunk_state_bwd_kernel(
    q, k, wk, b, do, dht, dhs, du, dh0, scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
):
    """Reverse sequential pass, one program per (V block, b * h).

    dU = (scale Q K^T * M)^T dO + exp(b_C - b) K dS_{n+1};
    dS_n = scale (Gamma Q)^T dO + exp(b_C) dS_{n+1} - W_k^T dU.
    Inputs q, k: [B, T, H, K]; wk: [B, T, H, K] fp32; b: [B, T, H]; do: [B, T, H, V]; dht, dh0: [B, H, K, V].
    Outputs (fp32): dhs [B, H, NT, K, V] (gradient w.r.t. each chunk's end state), du [B, T, H, V].
    """
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    o_kv = o_k[:, None] * V + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]
    # Transposed causal mask: entry (i, t) of A^T is live when i <= t.
    m_ct = o_i[:, None] <= o_i[None, :]

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_bh64 * K * V + o_kv, mask=m_kv, other=0.0)
    for i in range(0, NT):
        i_t = NT - 1 - i
        o_t = i_t * BT + o_i
        m_t = o_t < T
        i_row = (i_b * T + o_t) * H + i_h
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        tl.store(dhs + (i_bh64 * NT + i_t) * K * V + o_kv, b_dh, mask=m_kv)
        b_q = tl.load(q + i_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + i_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_wk = tl.load(wk + i_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_do = tl.load(do + i_row[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_At = _dot(b_k, tl.trans(b_q))
        if USE_G:
            i_last = tl.minimum(i_t * BT + BT, T) - 1
            b_last = tl.load(b + (i_b * T + i_last) * H + i_h)
            b_b = tl.load(b + i_row, mask=m_t, other=0.0)
            b_At = b_At * tl.exp(tl.where(m_ct, b_b[None, :] - b_b[:, None], 0.0))
            b_q = b_q * tl.exp(b_b)[:, None]
            b_kd = b_k * tl.exp(b_last - b_b)[:, None]
        else:
            b_kd = b_k
        b_At = tl.where(m_ct, b_At, 0.0)
        b_du = _dot(b_At, b_do) + _dot(b_kd, b_dh)
        tl.store(du + i_row[:, None] * V + o_v[None, :], b_du, mask=m_tv)
        if USE_G:
            b_dh = b_dh * tl.exp(b_last)
        b_dh += _dot(tl.trans(b_q), b_do) - _dot(tl.trans(b_wk), b_du)
    if STORE_DH0:
        tl.store(dh0 + i_bh64 * K * V + o_kv, b_dh, mask=m_kv)


@triton.jit
def chunk_bwd_kernel(
    q, k, v, beta, b, tm, wk, wv, u, h, dhs, do, du, dq, dk, dv, dbeta, db, scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr,
):
    """Per (chunk, b * h): every gradient local to a chunk, given dU and dS_{n+1} from the state pass.

    Inputs as in the forward kernels plus do [B, T, H, V], du [B, T, H, V] and dhs [B, H, NT, K, V] (fp32).
    Outputs (fp32): dq, dk [B, T, H, K]; dv [B, T, H, V]; dbeta and db (gradient of the within-chunk
    cumulative log-decay b) [B, T, H].
    """
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    i_row = (i_b * T + o_t) * H + i_h
    m_tk = m_t[:, None] & m_k[None, :]
    m_c = o_i[:, None] >= o_i[None, :]
    m_s = o_i[:, None] > o_i[None, :]

    b_q = tl.load(q + i_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + i_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
    b_wk = tl.load(wk + i_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
    b_tm = tl.load(tm + i_row[:, None] * BT + o_i[None, :], mask=m_t[:, None], other=0.0)
    b_beta = tl.load(beta + i_row, mask=m_t, other=0.0).to(tl.float32)

    b_dA = tl.zeros([BT, BT], dtype=tl.float32)  # gradient of the intra-chunk attention A (before masking)
    b_dL = tl.zeros([BT, BT], dtype=tl.float32)
    b_dqs = tl.zeros([BT, BK], dtype=tl.float32)  # dO S_n^T
    b_dkd = tl.zeros([BT, BK], dtype=tl.float32)  # gradient of the decayed keys of the state write
    b_dwk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    b_hdh = tl.zeros([BK, BV], dtype=tl.float32)  # S_n * dS_{n+1}, for the whole-chunk decay exp(b_C)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        o_tv = i_row[:, None] * V + o_v[None, :]
        o_kv = (i_bh64 * NT + i_t) * K * V + o_k[:, None] * V + o_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        b_v = tl.load(v + o_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_wv = tl.load(wv + o_tv, mask=m_tv, other=0.0)
        b_u = tl.load(u + o_tv, mask=m_tv, other=0.0)
        b_du = tl.load(du + o_tv, mask=m_tv, other=0.0)
        b_do = tl.load(do + o_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_h = tl.load(h + o_kv, mask=m_kv, other=0.0)
        b_dh = tl.load(dhs + o_kv, mask=m_kv, other=0.0)

        b_dA += _dot(b_do, tl.trans(b_u))
        b_dqs += _dot(b_do, tl.trans(b_h))
        b_dkd += _dot(b_u, tl.trans(b_dh))
        b_dwk -= _dot(b_du, tl.trans(b_h))
        # W_v = Tm R_v: dR_v = Tm^T dW_v, and dL = -dR W^T (the inverse's derivative).
        b_drv = _dot(tl.trans(b_tm), b_du)
        tl.store(dv + o_tv, b_drv * b_beta[:, None], mask=m_tv)
        b_dbeta += tl.sum(b_drv * b_v, 1)
        b_dL -= _dot(b_drv, tl.trans(b_wv))
        if USE_G:
            b_hdh += b_h * b_dh

    b_drk = _dot(tl.trans(b_tm), b_dwk)
    b_dL -= _dot(b_drk, tl.trans(b_wk))
    b_kk = _dot(b_k, tl.trans(b_k))
    if USE_G:
        i_last = tl.minimum(i_t * BT + BT, T) - 1
        b_last = tl.load(b + (i_b * T + i_last) * H + i_h)
        b_b = tl.load(b + i_row, mask=m_t, other=0.0)
        b_M = tl.exp(tl.where(m_c, b_b[:, None] - b_b[None, :], 0.0))
        b_gam = tl.exp(b_b)
        b_tail = tl.exp(b_last - b_b)
    else:
        b_M = tl.full([BT, BT], 1.0, dtype=tl.float32)
        b_gam = tl.full([BT], 1.0, dtype=tl.float32)
        b_tail = tl.full([BT], 1.0, dtype=tl.float32)

    # R_k = beta Gamma K
    b_dk = b_drk * (b_beta * b_gam)[:, None]
    b_dbeta += tl.sum(b_drk * b_k * b_gam[:, None], 1)
    # L = strict_lower(diag(beta) K K^T * M)
    b_dLm = tl.where(m_s, b_dL * b_M, 0.0)
    b_dbeta += tl.sum(b_dLm * b_kk, 1)
    b_dk += _dot(b_dLm, b_k) * b_beta[:, None] + _dot(tl.trans(b_dLm), b_k * b_beta[:, None])
    # A = scale Q K^T * M
    b_dP = tl.where(m_c, b_dA * b_M, 0.0) * scale
    b_dq = b_dqs * (scale * b_gam)[:, None] + _dot(b_dP, b_k)
    b_dk += _dot(tl.trans(b_dP), b_q)
    # State write with the keys decayed to the chunk end.
    b_dk += b_dkd * b_tail[:, None]

    tl.store(dq + i_row[:, None] * K + o_k[None, :], b_dq, mask=m_tk)
    tl.store(dk + i_row[:, None] * K + o_k[None, :], b_dk, mask=m_tk)
    tl.store(dbeta + i_row, b_dbeta, mask=m_t)
    if USE_G:
        # A term X[t, i] = f * exp(b_t - b_i) contributes rowsum - colsum of X * dX to db.
        b_gl = b_dLm * b_kk * b_beta[:, None]
        b_ga = b_dP * _dot(b_q, tl.trans(b_k))
        b_gk = tl.sum(b_dkd * b_k * b_tail[:, None], 1)
        b_db = (tl.sum(b_drk * b_k, 1) * b_beta * b_gam
                + tl.sum(b_gl, 1) - tl.sum(b_gl, 0)
                + tl.sum(b_ga, 1) - tl.sum(b_ga, 0)
                + tl.sum(b_dqs * b_q, 1) * scale * b_gam
                - b_gk)
        b_dlast = tl.sum(b_gk, 0) + tl.exp(b_last) * tl.sum(tl.sum(b_hdh, 1), 0)
        b_db += tl.where(o_t == i_last, b_dlast, 0.0)
        tl.store(db + i_row, b_db, mask=m_t)


def _tiles(K: int, V: int) -> tuple[int, int]:
    """BK covers the whole key dim (the triangular solve and state update need it); BV <= 64."""
    BK = max(16, triton.next_power_of_2(K))
    BV = min(64, max(16, triton.next_power_of_2(V)))
    return BK, BV


def _num_warps(BK: int, BV: int) -> int:
    return 4 if BK * BV <= 64 * 64 else 8


def _chunk_local_cumsum(g: torch.Tensor, BT: int) -> torch.Tensor:
    """``[B, T, H]`` log-decays -> fp32 cumulative sums restarted at every chunk of BT tokens."""
    B, T, H = g.shape
    NT = triton.cdiv(T, BT)
    gp = F.pad(g.float(), (0, 0, 0, NT * BT - T))
    return gp.view(B, NT, BT, H).cumsum(2).view(B, NT * BT, H)[:, :T].contiguous()


def _chunk_local_reverse_cumsum(x: torch.Tensor, BT: int) -> torch.Tensor:
    """Adjoint of :func:`_chunk_local_cumsum`: sums from t to the end of t's chunk."""
    B, T, H = x.shape
    NT = triton.cdiv(T, BT)
    xp = F.pad(x, (0, 0, 0, NT * BT - T)).view(B, NT, BT, H)
    return xp.flip(2).cumsum(2).flip(2).reshape(B, NT * BT, H)[:, :T]


def fused_recurrent_fwd(q, k, v, beta, g, scale, h0, output_final_state, store_states):
    """Returns ``o [B, T, H, V]``, the final state (or None) and the pre-token states ``[B, H, T, K, V]``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _tiles(K, V)
    NV = triton.cdiv(V, BV)
    o = torch.empty_like(v)
    ht = q.new_empty(B, H, K, V, dtype=torch.float32) if output_final_state else None
    hs = q.new_empty(B, H, T, K, V, dtype=torch.float32) if store_states else None
    fused_recurrent_fwd_kernel[(NV, B * H)](
        q, k, v, beta, g, h0, o, ht, hs, scale, T,
        H=H, K=K, V=V, BK=BK, BV=BV, USE_G=g is not None, USE_H0=h0 is not None,
        STORE_HT=output_final_state, STORE_HS=store_states, num_warps=_num_warps(BK, BV),
    )
    return o, ht, hs


def fused_recurrent_bwd(q, k, v, beta, g, hs, do, dht, scale, need_dh0):
    """Returns fp32 ``dq, dk, dv, dbeta, dg (or None), dh0 (or None)``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _tiles(K, V)
    NV = triton.cdiv(V, BV)
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = torch.empty(NV, B, T, H, K, **f32)
    dk = torch.empty(NV, B, T, H, K, **f32)
    dv = torch.empty(B, T, H, V, **f32)
    dbeta = torch.empty(NV, B, T, H, **f32)
    dg = torch.empty(NV, B, T, H, **f32) if g is not None else None
    dh0 = torch.empty(B, H, K, V, **f32) if need_dh0 else None
    fused_recurrent_bwd_kernel[(NV, B * H)](
        q, k, v, beta, g, hs, do, dht, dq, dk, dv, dbeta, dg, dh0, scale, T, B * T * H,
        H=H, K=K, V=V, BK=BK, BV=BV, USE_G=g is not None, USE_DHT=dht is not None, STORE_DH0=need_dh0,
        num_warps=_num_warps(BK, BV),
    )
    return dq.sum(0), dk.sum(0), dv, dbeta.sum(0), (dg.sum(0) if dg is not None else None), dh0


def chunk_fwd(q, k, v, beta, gcum, scale, h0, output_final_state, BT=CHUNK_SIZE):
    """Returns ``o``, the final state (or None) and the tensors the backward pass reuses."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _tiles(K, V)
    NT, NV = triton.cdiv(T, BT), triton.cdiv(V, BV)
    nw = _num_warps(BK, BV)
    f32 = dict(dtype=torch.float32, device=q.device)
    use_g = gcum is not None
    tm = torch.empty(B, T, H, BT, **f32)
    wk = torch.empty(B, T, H, K, **f32)
    wv = torch.empty(B, T, H, V, **f32)
    chunk_prepare_fwd_kernel[(NT, B * H)](
        k, v, beta, gcum, tm, wk, wv, T, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=use_g, num_warps=nw,
    )
    h = torch.empty(B, H, NT, K, V, **f32)
    u = torch.empty(B, T, H, V, **f32)
    ht = torch.empty(B, H, K, V, **f32) if output_final_state else None
    chunk_state_fwd_kernel[(NV, B * H)](
        k, wk, wv, gcum, h0, h, u, ht, T, NT, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=use_g, USE_H0=h0 is not None, STORE_HT=output_final_state, num_warps=nw,
    )
    o = torch.empty_like(v)
    chunk_output_fwd_kernel[(NV, NT, B * H)](
        q, k, u, gcum, h, o, scale, T, NT, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=use_g, num_warps=nw,
    )
    return o, ht, (tm, wk, wv, u, h)


def chunk_bwd(q, k, v, beta, gcum, saved, do, dht, scale, need_dh0, BT=CHUNK_SIZE):
    """Returns fp32 ``dq, dk, dv, dbeta, db (gradient of gcum, or None), dh0 (or None)``."""
    tm, wk, wv, u, h = saved
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _tiles(K, V)
    NT, NV = triton.cdiv(T, BT), triton.cdiv(V, BV)
    nw = _num_warps(BK, BV)
    f32 = dict(dtype=torch.float32, device=q.device)
    use_g = gcum is not None
    dhs = torch.empty(B, H, NT, K, V, **f32)
    du = torch.empty(B, T, H, V, **f32)
    dh0 = torch.empty(B, H, K, V, **f32) if need_dh0 else None
    chunk_state_bwd_kernel[(NV, B * H)](
        q, k, wk, gcum, do, dht, dhs, du, dh0, scale, T, NT, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=use_g, USE_DHT=dht is not None, STORE_DH0=need_dh0, num_warps=nw,
    )
    dq = torch.empty(B, T, H, K, **f32)
    dk = torch.empty(B, T, H, K, **f32)
    dv = torch.empty(B, T, H, V, **f32)
    dbeta = torch.empty(B, T, H, **f32)
    db = torch.empty(B, T, H, **f32) if use_g else None
    chunk_bwd_kernel[(NT, B * H)](
        q, k, v, beta, gcum, tm, wk, wv, u, h, dhs, do, du, dq, dk, dv, dbeta, db, scale, T, NT,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=use_g, num_warps=nw,
    )
    return dq, dk, dv, dbeta, db, dh0


def _grad_of(x: torch.Tensor | None, dx: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None or dx is None else dx.to(x.dtype)


class FusedRecurrentDeltaRuleFunction(torch.autograd.Function):
    """Token-by-token forward; the backward replays the tokens in reverse from the stored pre-token states."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, scale, initial_state, output_final_state):
        q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
        g = g.contiguous() if g is not None else None
        h0 = initial_state.contiguous() if initial_state is not None else None
        needs_grad = any(x is not None and x.requires_grad for x in (q, k, v, beta, g, initial_state))
        o, ht, hs = fused_recurrent_fwd(q, k, v, beta, g, scale, h0, output_final_state, needs_grad)
        ctx.save_for_backward(q, k, v, beta, g, h0, hs)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, h0, hs = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dht = dht.contiguous() if dht is not None else None
        dq, dk, dv, dbeta, dg, dh0 = fused_recurrent_bwd(q, k, v, beta, g, hs, do, dht, ctx.scale, h0 is not None)
        return (_grad_of(q, dq), _grad_of(k, dk), _grad_of(v, dv), _grad_of(beta, dbeta), _grad_of(g, dg), None,
                _grad_of(h0, dh0), None)


class ChunkDeltaRuleFunction(torch.autograd.Function):
    """Chunked forward; the backward reuses Tm, W_k, W_v, U and the chunk-start states of the forward pass."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, scale, initial_state, output_final_state):
        q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
        h0 = initial_state.contiguous() if initial_state is not None else None
        gcum = _chunk_local_cumsum(g, CHUNK_SIZE) if g is not None else None
        o, ht, saved = chunk_fwd(q, k, v, beta, gcum, scale, h0, output_final_state)
        ctx.save_for_backward(q, k, v, beta, gcum, h0, *saved)
        ctx.scale = scale
        ctx.g_dtype = g.dtype if g is not None else None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, gcum, h0, *saved = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dht = dht.contiguous() if dht is not None else None
        dq, dk, dv, dbeta, db, dh0 = chunk_bwd(q, k, v, beta, gcum, saved, do, dht, ctx.scale, h0 is not None)
        dg = _chunk_local_reverse_cumsum(db, CHUNK_SIZE).to(ctx.g_dtype) if db is not None else None
        return (_grad_of(q, dq), _grad_of(k, dk), _grad_of(v, dv), _grad_of(beta, dbeta), dg, None,
                _grad_of(h0, dh0), None)


def _check(q, k, v, beta, g, initial_state, op: str) -> None:
    if any(x is not None and x.dtype == torch.float64 for x in (q, k, v, beta, g, initial_state)):
        raise ValueError(f"{op}: float64 inputs are not supported by the Triton kernels (they accumulate in "
                         "float32); use backend='chunk' or backend='naive'.")
    if q.shape[-1] > MAX_HEAD_DIM_K:
        raise ValueError(f"{op}: the Triton kernels keep the whole key dim in one tile and support K <= "
                         f"{MAX_HEAD_DIM_K}; got K = {q.shape[-1]}. Use backend='chunk'.")


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

    When gradients are needed it stores every pre-token state (``B * H * T * K * V`` floats): meant for short T.
    """
    _check(q, k, v, beta, g, initial_state, "fused_recurrent_delta_rule")
    if cu_seqlens is not None:
        return varlen_padded(fused_recurrent_delta_rule, (q, k, v), g, scale, initial_state, output_final_state,
                             cu_seqlens, beta=beta)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return FusedRecurrentDeltaRuleFunction.apply(q, k, v, beta, g, scale, initial_state, output_final_state)


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
    """Chunkwise-parallel Triton path (chunks of 64 tokens). Shapes as in :func:`triton_delta_rule`."""
    _check(q, k, v, beta, g, initial_state, "triton_chunk_delta_rule")
    if cu_seqlens is not None:
        return varlen_padded(triton_chunk_delta_rule, (q, k, v), g, scale, initial_state, output_final_state,
                             cu_seqlens, beta=beta)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return ChunkDeltaRuleFunction.apply(q, k, v, beta, g, scale, initial_state, output_final_state)


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
    """Causal (gated) delta rule in Triton; picks the fused recurrent kernel for short inputs.

    Args:
        q, k: ``[B, T, H, K]`` (K <= 128); v: ``[B, T, H, V]``; beta, g: ``[B, T, H]`` (g: log-decay or None);
        initial_state: ``[N, H, K, V]`` float32 (N = B, or the number of sequences in cu_seqlens);
        cu_seqlens: ``[N + 1]`` offsets of sequences packed along T (B == 1).

    Returns:
        ``o [B, T, H, V]`` in v's dtype and the float32 final state ``[N, H, K, V]`` (or None).
    """
    _check(q, k, v, beta, g, initial_state, "triton_delta_rule")
    if cu_seqlens is not None:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        longest = int(lengths.max().item())
    else:
        longest = q.shape[1]
    fn = fused_recurrent_delta_rule if longest <= RECURRENT_MAX_T else triton_chunk_delta_rule
    return fn(q, k, v, beta, g=g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens)
