"""Triton kernels for (gated) linear attention, forward and backward.

Rule (per head, S is K x V): ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale * q_t)``.

Two algorithms share one interface:

* chunked (long inputs): per chunk of ``BT`` tokens with within-chunk cumulative log-decay ``b``,
  ``O = (scale Q K^T * M) V + scale (exp(b) Q) S_n`` and ``S_{n+1} = exp(b_C) S_n + (exp(b_C - b) K)^T V``,
  where ``M[t, i] = exp(b_t - b_i)`` for ``i <= t``. Every exponent is <= 0, so strong decays underflow to 0
  instead of overflowing. A sequential state kernel stores the chunk-start states, everything else is
  parallel over chunks;
* fused recurrent (short inputs, decoding): one token at a time with the state in registers.

All kernels see the packed layout: ``[B, T, H, D]`` inputs are viewed as ``[B * T, H, D]`` and described by
offsets ``cu_seqlens [N + 1]`` (``N = B`` sequences of length T unless the caller packs its own), so
variable-length batches run natively. Chunk-level tensors (chunk-start states ``h``, their gradients ``dh``)
are ``[NC, H, K, V]`` float32 with ``NC`` the total number of chunks over all sequences.

The log-decay gradient uses ``dL/dB_t = q_t . dq_t - k_t . dk_t`` for the cumulative log-decay ``B`` (q and k
enter the rule only as ``exp(B_t) q_t`` and ``exp(-B_i) k_i``), plus ``<S_T, dS_T>`` at a sequence's last
token from the final state's ``exp(B_T)`` factor; ``dg`` is its reverse cumulative sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_fwp.ops.utils import triton_interpreted

# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptr, off_r, off_c, n_r, n_c, stride_r, stride_c, BR: tl.constexpr, BC: tl.constexpr):
    """Zero-filled ``[BR, BC]`` tile of the ``[n_r, n_c]`` matrix at ``ptr``; a transposed view is just swapped
    strides."""
    o_r = off_r + tl.arange(0, BR)
    o_c = off_c + tl.arange(0, BC)
    mask = (o_r < n_r)[:, None] & (o_c < n_c)[None, :]
    return tl.load(ptr + o_r[:, None] * stride_r + o_c[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, b_x, off_r, off_c, n_r, n_c, stride_r, stride_c, BR: tl.constexpr, BC: tl.constexpr):
    o_r = off_r + tl.arange(0, BR)
    o_c = off_c + tl.arange(0, BC)
    mask = (o_r < n_r)[:, None] & (o_c < n_c)[None, :]
    tl.store(ptr + o_r[:, None] * stride_r + o_c[None, :] * stride_c, b_x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_vec(ptr, off, n, stride, BR: tl.constexpr):
    o_r = off + tl.arange(0, BR)
    return tl.load(ptr + o_r * stride, mask=o_r < n, other=0.0)


@triton.jit
def _store_vec(ptr, b_x, off, n, stride, BR: tl.constexpr):
    o_r = off + tl.arange(0, BR)
    tl.store(ptr + o_r * stride, b_x.to(ptr.dtype.element_ty), mask=o_r < n)


@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """``a @ b`` with both operands cast to the compute dtype and an fp32 accumulator."""
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=DOT_PREC, out_dtype=tl.float32)


@triton.jit
def _chunk_local_cumsum_kernel(g, gc, cu_seqlens, chunk_idx, H: tl.constexpr, BT: tl.constexpr):
    """Within-chunk inclusive cumsum of the log-decay. g: ``[T_all, H]`` any float; gc: ``[T_all, H]`` fp32."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_idx + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_idx + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    b_g = _load_vec(g + bos * H + i_h, i_t * BT, T, H, BT).to(tl.float32)
    _store_vec(gc + bos * H + i_h, tl.cumsum(b_g, axis=0), i_t * BT, T, H, BT)


@triton.jit
def _chunk_state_fwd_kernel(k, v, gc, h, h0, ht, cu_seqlens, chunk_offsets,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                            DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Chunk-start states of one sequence and head, one ``[BK, BV]`` block per program.

    k: ``[T_all, H, K]``; v: ``[T_all, H, V]``; gc: ``[T_all, H]`` fp32 within-chunk cumsum; h: ``[NC, H, K, V]``
    fp32 (state before each chunk); h0, ht: ``[N, H, K, V]`` fp32. Grid ``(cdiv(K, BK), cdiv(V, BV), N * H)``.
    """
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    NT = tl.cdiv(T, BT)
    boc = tl.load(chunk_offsets + i_n).to(tl.int64)
    p_k = k + (bos * H + i_h) * K
    p_v = v + (bos * H + i_h) * V

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += _load_tile(h0 + i_nh * K * V, i_k * BK, i_v * BV, K, V, V, 1, BK, BV).to(tl.float32)
    for i_t in range(NT):
        _store_tile(h + ((boc + i_t) * H + i_h) * K * V, b_h, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
        b_k = _load_tile(p_k, i_k * BK, i_t * BT, K, T, 1, H * K, BK, BT)  # k^T
        b_v = _load_tile(p_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        if USE_G:
            last = tl.minimum(i_t * BT + BT, T) - 1
            b_glast = tl.load(gc + (bos + last) * H + i_h)
            b_g = _load_vec(gc + bos * H + i_h, i_t * BT, T, H, BT)
            o_t = i_t * BT + tl.arange(0, BT)
            # Rows past the sequence end hold zero keys; masking their exponent keeps every exp argument <= 0.
            b_k = b_k * tl.exp(tl.where(o_t < T, b_glast - b_g, 0.0))[None, :]
            b_h *= tl.exp(b_glast)
        b_h += _dot(b_k, b_v, DOT_DTYPE, DOT_PREC)
    if STORE_HT:
        _store_tile(ht + i_nh * K * V, b_h, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)


@triton.jit
def _chunk_output_fwd_kernel(q, k, v, gc, h, o, cu_seqlens, chunk_idx, scale,
                             H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                             USE_G: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Outputs of one chunk: intra-chunk attention plus the inter-chunk read of the chunk-start state.

    q, k: ``[T_all, H, K]``; v, o: ``[T_all, H, V]``; h: ``[NC, H, K, V]`` fp32. Grid ``(cdiv(V, BV), NC, H)``.
    """
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(chunk_idx + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_idx + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    p_q = q + (bos * H + i_h) * K
    p_k = k + (bos * H + i_h) * K
    p_h = h + (i_c * H + i_h).to(tl.int64) * K * V

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_q = _load_tile(p_q, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
        b_k = _load_tile(p_k, i_k * BK, i_t * BT, K, T, 1, H * K, BK, BT)  # k^T
        b_h = _load_tile(p_h, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
        b_o += _dot(b_q, b_h, DOT_DTYPE, DOT_PREC)
        b_A += _dot(b_q, b_k, DOT_DTYPE, DOT_PREC)

    o_i = tl.arange(0, BT)
    causal = o_i[:, None] >= o_i[None, :]
    if USE_G:
        b_g = _load_vec(gc + bos * H + i_h, i_t * BT, T, H, BT)
        b_o *= tl.exp(b_g)[:, None]
        # Mask the exponent, not the product: above the diagonal b_t - b_i > 0 can overflow.
        b_A *= tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], float("-inf")))
    else:
        b_A = tl.where(causal, b_A, 0.0)
    b_v = _load_tile(v + (bos * H + i_h) * V, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
    b_o = (b_o + _dot(b_A, b_v, DOT_DTYPE, DOT_PREC)) * scale
    _store_tile(o + (bos * H + i_h) * V, b_o, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)


@triton.jit
def _chunk_state_bwd_kernel(q, do, gc, dh, dht, dh0, cu_seqlens, chunk_offsets, scale,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            USE_G: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                            DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Reverse state recurrence: ``dh[c]`` is the gradient of the state at the END of chunk c.

    ``dS_n = exp(b_C) dS_{n+1} + scale (exp(b) Q)^T dO``. q: ``[T_all, H, K]``; do: ``[T_all, H, V]``;
    dh: ``[NC, H, K, V]`` fp32; dht, dh0: ``[N, H, K, V]`` fp32. Grid ``(cdiv(K, BK), cdiv(V, BV), N * H)``.
    """
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    NT = tl.cdiv(T, BT)
    boc = tl.load(chunk_offsets + i_n).to(tl.int64)
    p_q = q + (bos * H + i_h) * K
    p_do = do + (bos * H + i_h) * V

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += _load_tile(dht + i_nh * K * V, i_k * BK, i_v * BV, K, V, V, 1, BK, BV).to(tl.float32)
    for i_s in range(NT):
        i_t = NT - 1 - i_s
        _store_tile(dh + ((boc + i_t) * H + i_h) * K * V, b_dh, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
        b_q = _load_tile(p_q, i_k * BK, i_t * BT, K, T, 1, H * K, BK, BT)  # q^T
        b_do = _load_tile(p_do, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        if USE_G:
            last = tl.minimum(i_t * BT + BT, T) - 1
            b_glast = tl.load(gc + (bos + last) * H + i_h)
            b_g = _load_vec(gc + bos * H + i_h, i_t * BT, T, H, BT)
            b_q = b_q * tl.exp(b_g)[None, :]
            b_dh *= tl.exp(b_glast)
        b_dh += _dot(b_q, b_do, DOT_DTYPE, DOT_PREC) * scale
    if STORE_DH0:
        _store_tile(dh0 + i_nh * K * V, b_dh, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)


@triton.jit
def _chunk_dv_kernel(q, k, do, gc, dh, dv, cu_seqlens, chunk_idx, scale,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     USE_G: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """``dV = scale (Q K^T * M)^T dO + exp(b_C - b) (K dh)`` for one chunk.

    q, k: ``[T_all, H, K]``; do, dv: ``[T_all, H, V]``; dh: ``[NC, H, K, V]`` fp32. Grid ``(cdiv(V, BV), NC, H)``.
    """
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(chunk_idx + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_idx + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    p_q = q + (bos * H + i_h) * K
    p_k = k + (bos * H + i_h) * K
    p_dh = dh + (i_c * H + i_h).to(tl.int64) * K * V

    b_At = tl.zeros([BT, BT], dtype=tl.float32)  # [i, t] = k_i . q_t
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_k = _load_tile(p_k, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
        b_q = _load_tile(p_q, i_k * BK, i_t * BT, K, T, 1, H * K, BK, BT)  # q^T
        b_dh = _load_tile(p_dh, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
        b_At += _dot(b_k, b_q, DOT_DTYPE, DOT_PREC)
        b_dv += _dot(b_k, b_dh, DOT_DTYPE, DOT_PREC)

    o_i = tl.arange(0, BT)
    anticausal = o_i[:, None] <= o_i[None, :]
    if USE_G:
        last = tl.minimum(i_t * BT + BT, T) - 1
        b_glast = tl.load(gc + (bos + last) * H + i_h)
        b_g = _load_vec(gc + bos * H + i_h, i_t * BT, T, H, BT)
        b_dv *= tl.exp(tl.where(i_t * BT + o_i < T, b_glast - b_g, 0.0))[:, None]
        b_At *= tl.exp(tl.where(anticausal, b_g[None, :] - b_g[:, None], float("-inf")))
    else:
        b_At = tl.where(anticausal, b_At, 0.0)
    b_do = _load_tile(do + (bos * H + i_h) * V, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
    b_dv += _dot(b_At * scale, b_do, DOT_DTYPE, DOT_PREC)
    _store_tile(dv + (bos * H + i_h) * V, b_dv, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)


@triton.jit
def _chunk_dqk_kernel(q, k, v, do, gc, h, dh, dq, dk, dB, cu_seqlens, chunk_idx, scale, T_all,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      USE_G: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """dq and dk of one chunk and K block, plus this block's share of ``q . dq - k . dk``.

    ``dQ = scale (exp(b) (dO h^T) + (dO V^T * M) K)``, ``dK = exp(b_C - b) (V dh^T) + scale (dO V^T * M)^T Q``.
    q, k, dq, dk: ``[T_all, H, K]``; v, do: ``[T_all, H, V]``; h, dh: ``[NC, H, K, V]`` fp32;
    dB: ``[cdiv(K, BK), T_all, H]`` fp32. Grid ``(cdiv(K, BK), NC, H)``.
    """
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(chunk_idx + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_idx + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    p_v = v + (bos * H + i_h) * V
    p_do = do + (bos * H + i_h) * V
    p_h = h + (i_c * H + i_h).to(tl.int64) * K * V
    p_dh = dh + (i_c * H + i_h).to(tl.int64) * K * V

    b_dA = tl.zeros([BT, BT], dtype=tl.float32)  # [t, i] = do_t . v_i
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        b_vt = _load_tile(p_v, i_v * BV, i_t * BT, V, T, 1, H * V, BV, BT)
        b_do = _load_tile(p_do, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        # Transposed [BV, BK] views of the K x V states.
        b_ht = _load_tile(p_h, i_v * BV, i_k * BK, V, K, 1, V, BV, BK)
        b_dht = _load_tile(p_dh, i_v * BV, i_k * BK, V, K, 1, V, BV, BK)
        b_dA += _dot(b_do, b_vt, DOT_DTYPE, DOT_PREC)
        b_dq += _dot(b_do, b_ht, DOT_DTYPE, DOT_PREC)
        b_dk += _dot(tl.trans(b_vt), b_dht, DOT_DTYPE, DOT_PREC)

    b_q = _load_tile(q + (bos * H + i_h) * K, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
    b_k = _load_tile(k + (bos * H + i_h) * K, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
    o_i = tl.arange(0, BT)
    causal = o_i[:, None] >= o_i[None, :]
    if USE_G:
        last = tl.minimum(i_t * BT + BT, T) - 1
        b_glast = tl.load(gc + (bos + last) * H + i_h)
        b_g = _load_vec(gc + bos * H + i_h, i_t * BT, T, H, BT)
        b_dq *= tl.exp(b_g)[:, None]
        b_dk *= tl.exp(tl.where(i_t * BT + o_i < T, b_glast - b_g, 0.0))[:, None]
        b_dA *= tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], float("-inf")))
    else:
        b_dA = tl.where(causal, b_dA, 0.0)
    b_dA *= scale
    b_dq = b_dq * scale + _dot(b_dA, b_k, DOT_DTYPE, DOT_PREC)
    b_dk += _dot(tl.trans(b_dA), b_q, DOT_DTYPE, DOT_PREC)

    _store_tile(dq + (bos * H + i_h) * K, b_dq, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
    _store_tile(dk + (bos * H + i_h) * K, b_dk, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
    if USE_G:
        # Use the fp32 gradients, not the stored (possibly bf16) ones: dg is a long sum of these terms.
        b_dB = tl.sum(b_q.to(tl.float32) * b_dq - b_k.to(tl.float32) * b_dk, axis=1)
        _store_vec(dB + (i_k * T_all + bos) * H + i_h, b_dB, i_t * BT, T, H, BT)


@triton.jit
def _reverse_cumsum_kernel(dB, dg, dgt, cu_seqlens, T_all, H: tl.constexpr, NB: tl.constexpr, BT: tl.constexpr,
                           USE_DGT: tl.constexpr):
    """``dg_t = sum_{s >= t} dB_s`` within each sequence, starting from the final-state term ``dgt``.

    dB: ``[NB, T_all, H]`` fp32 partial sums (added here); dg: ``[T_all, H]``; dgt: ``[N, H]`` fp32.
    Grid ``(N * H,)``.
    """
    i_nh = tl.program_id(0)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    NT = tl.cdiv(T, BT)
    # Kept as a vector so the loop-carried value has one type in every iteration.
    b_carry = tl.zeros([BT], dtype=tl.float32)
    if USE_DGT:
        b_carry += tl.load(dgt + i_nh)
    for i_s in range(NT):
        i_t = NT - 1 - i_s
        b_x = tl.zeros([BT], dtype=tl.float32)
        for i_b in range(NB):
            b_x += _load_vec(dB + (i_b * T_all + bos) * H + i_h, i_t * BT, T, H, BT)
        _store_vec(dg + bos * H + i_h, tl.cumsum(b_x, axis=0, reverse=True) + b_carry, i_t * BT, T, H, BT)
        b_carry += tl.sum(b_x, axis=0)


@triton.jit
def _fused_recurrent_fwd_kernel(q, k, v, g, o, h0, ht, cu_seqlens, scale,
                                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                BK: tl.constexpr, BV: tl.constexpr,
                                USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr):
    """Token-by-token recurrence, state ``[BK >= K, BV]`` in registers.

    q, k: ``[T_all, H, K]``; v, o: ``[T_all, H, V]``; g: ``[T_all, H]``; h0, ht: ``[N, H, K, V]`` fp32.
    Grid ``(cdiv(V, BV), N * H)``.
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

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh * K * V + o_k[:, None] * V + o_v[None, :], mask=m_h, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        b_q = tl.load(q + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        if USE_G:
            b_h *= tl.exp(tl.load(g + t * H + i_h).to(tl.float32))
        b_h += b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0)
        tl.store(o + (t * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + i_nh * K * V + o_k[:, None] * V + o_v[None, :], b_h, mask=m_h)


@triton.jit
def _fused_recurrent_bwd_kernel(q, k, v, g, do, dq, dk, dv, h0, dht, dh0, cu_seqlens, scale, T_all,
                                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                BK: tl.constexpr, BV: tl.constexpr,
                                USE_G: tl.constexpr, USE_H0: tl.constexpr, USE_DHT: tl.constexpr,
                                STORE_DH0: tl.constexpr):
    """Backward of the token-by-token recurrence for one V block.

    dq, dk: ``[cdiv(V, BV), T_all, H, K]`` fp32 partial sums over V blocks; dv: ``[T_all, H, V]``; dht, dh0:
    ``[N, H, K, V]`` fp32; other shapes as in the forward. Grid ``(cdiv(V, BV), N * H)``.
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

    # dq_t = scale S_t do_t needs the forward states, which are replayed rather than stored.
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh * K * V + o_k[:, None] * V + o_v[None, :], mask=m_h, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_do = tl.load(do + (t * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        if USE_G:
            b_h *= tl.exp(tl.load(g + t * H + i_h).to(tl.float32))
        b_h += b_k[:, None] * b_v[None, :]
        b_dq = tl.sum(b_h * b_do[None, :], axis=1) * scale
        tl.store(dq + ((i_v * T_all + t) * H + i_h) * K + o_k, b_dq, mask=m_k)

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_nh * K * V + o_k[:, None] * V + o_v[None, :], mask=m_h, other=0.0).to(tl.float32)
    for i_s in range(eos - bos):
        t = eos - 1 - i_s
        b_q = tl.load(q + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_do = tl.load(do + (t * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_dh += b_q[:, None] * b_do[None, :]
        b_dk = tl.sum(b_dh * b_v[None, :], axis=1)
        b_dv = tl.sum(b_dh * b_k[:, None], axis=0)
        tl.store(dk + ((i_v * T_all + t) * H + i_h) * K + o_k, b_dk, mask=m_k)
        tl.store(dv + (t * H + i_h) * V + o_v, b_dv.to(dv.dtype.element_ty), mask=m_v)
        if USE_G:
            b_dh *= tl.exp(tl.load(g + t * H + i_h).to(tl.float32))
    if STORE_DH0:
        tl.store(dh0 + i_nh * K * V + o_k[:, None] * V + o_v[None, :], b_dh, mask=m_h)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------

_BT = 64  # chunk length: the smallest tile that keeps tl.dot on tensor cores for every operand
_MAX_TILE = 64  # BK/BV cap so a chunk kernel's tiles fit in shared memory on current GPUs
_FUSED_MAX_LEN = 64  # sequences up to this long use the fused recurrent path


class _Seqs:
    """Packed-sequence tables shared by all launchers.

    cu_seqlens ``[N + 1]`` int32 token offsets; chunk_idx ``[NC, 2]`` int32 (sequence, chunk within it);
    chunk_offsets ``[N + 1]`` int32 first global chunk of each sequence; max_len the longest sequence.
    """

    def __init__(self, B: int, T: int, cu_seqlens: torch.Tensor | None, device: torch.device, BT: int = _BT):
        if cu_seqlens is None:
            nt = triton.cdiv(T, BT)
            self.N, self.max_len, self.NC = B, T, B * nt
            self.cu_seqlens = torch.arange(B + 1, device=device, dtype=torch.int32) * T
            seq = torch.arange(B, device=device, dtype=torch.int32).repeat_interleave(nt)
            chunk = torch.arange(nt, device=device, dtype=torch.int32).repeat(B)
            self.chunk_offsets = torch.arange(B + 1, device=device, dtype=torch.int32) * nt
        else:
            offsets = cu_seqlens.tolist()
            lengths = [b - a for a, b in zip(offsets, offsets[1:])]
            nts = [triton.cdiv(n, BT) for n in lengths]
            self.N, self.max_len, self.NC = len(lengths), max(lengths), sum(nts)
            self.cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
            seq = torch.repeat_interleave(torch.arange(self.N, dtype=torch.int32), torch.tensor(nts))
            chunk = torch.cat([torch.arange(n, dtype=torch.int32) for n in nts])
            chunk_offsets = torch.tensor([0] + nts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            seq, chunk, self.chunk_offsets = seq.to(device), chunk.to(device), chunk_offsets.to(device)
        self.chunk_idx = torch.stack([seq, chunk], dim=1).contiguous()
        self.BT = BT


def _tile(d: int) -> int:
    return min(_MAX_TILE, max(16, triton.next_power_of_2(d)))


def _dot_config(dtype: torch.dtype) -> dict:
    """Compute dtype and precision of every tl.dot for inputs of ``dtype``."""
    dot_dtype = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
    if dtype == torch.bfloat16 and triton_interpreted():
        # The interpreter multiplies bf16 tiles as their raw uint16 bits; emulate them in fp32 there.
        dot_dtype = tl.float32
    # fp32 inputs must stay fp32-exact (the default TF32 loses ~3 digits); half inputs ignore the setting.
    return dict(DOT_DTYPE=dot_dtype, DOT_PREC="ieee" if dot_dtype == tl.float32 else None)


def _chunk_local_cumsum(g: torch.Tensor, seqs: _Seqs) -> torch.Tensor:
    """g ``[T_all, H]`` -> within-chunk cumsum ``[T_all, H]`` fp32."""
    T_all, H = g.shape
    gc = torch.empty(T_all, H, device=g.device, dtype=torch.float32)
    _chunk_local_cumsum_kernel[(seqs.NC, H)](g, gc, seqs.cu_seqlens, seqs.chunk_idx, H=H, BT=seqs.BT,
                                             num_warps=1)
    return gc


def _chunk_state_fwd(k, v, gc, h0, seqs: _Seqs, store_final: bool):
    """-> chunk-start states ``h [NC, H, K, V]`` and the final state ``[N, H, K, V]`` (or None), fp32."""
    _, H, K = k.shape
    V = v.shape[-1]
    BK, BV = _tile(K), _tile(V)
    h = k.new_empty(seqs.NC, H, K, V, dtype=torch.float32)
    ht = k.new_empty(seqs.N, H, K, V, dtype=torch.float32) if store_final else None
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), seqs.N * H)
    _chunk_state_fwd_kernel[grid](
        k, v, gc, h, h0, ht, seqs.cu_seqlens, seqs.chunk_offsets, H=H, K=K, V=V, BT=seqs.BT, BK=BK, BV=BV,
        USE_G=gc is not None, USE_H0=h0 is not None, STORE_HT=store_final, **_dot_config(k.dtype),
        num_warps=4,
    )
    return h, ht


def _chunk_output_fwd(q, k, v, gc, h, scale: float, seqs: _Seqs) -> torch.Tensor:
    """-> o ``[T_all, H, V]`` in v's dtype."""
    _, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _tile(K), _tile(V)
    o = torch.empty_like(v)
    _chunk_output_fwd_kernel[(triton.cdiv(V, BV), seqs.NC, H)](
        q, k, v, gc, h, o, seqs.cu_seqlens, seqs.chunk_idx, scale, H=H, K=K, V=V, BT=seqs.BT, BK=BK, BV=BV,
        USE_G=gc is not None, **_dot_config(q.dtype), num_warps=4,
    )
    return o


def _chunk_state_bwd(q, do, gc, dht, scale: float, seqs: _Seqs, store_dh0: bool):
    """-> ``dh [NC, H, K, V]`` (gradient of each chunk's end state) and ``dh0 [N, H, K, V]`` (or None), fp32."""
    _, H, K = q.shape
    V = do.shape[-1]
    BK, BV = _tile(K), _tile(V)
    dh = q.new_empty(seqs.NC, H, K, V, dtype=torch.float32)
    dh0 = q.new_empty(seqs.N, H, K, V, dtype=torch.float32) if store_dh0 else None
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), seqs.N * H)
    _chunk_state_bwd_kernel[grid](
        q, do, gc, dh, dht, dh0, seqs.cu_seqlens, seqs.chunk_offsets, scale, H=H, K=K, V=V, BT=seqs.BT,
        BK=BK, BV=BV, USE_G=gc is not None, USE_DHT=dht is not None, STORE_DH0=store_dh0,
        **_dot_config(q.dtype), num_warps=4,
    )
    return dh, dh0


def _chunk_dv(q, k, do, gc, dh, scale: float, seqs: _Seqs) -> torch.Tensor:
    _, H, K = q.shape
    V = do.shape[-1]
    BK, BV = _tile(K), _tile(V)
    dv = torch.empty_like(do)
    _chunk_dv_kernel[(triton.cdiv(V, BV), seqs.NC, H)](
        q, k, do, gc, dh, dv, seqs.cu_seqlens, seqs.chunk_idx, scale, H=H, K=K, V=V, BT=seqs.BT, BK=BK, BV=BV,
        USE_G=gc is not None, **_dot_config(q.dtype), num_warps=4,
    )
    return dv


def _chunk_dqk(q, k, v, do, gc, h, dh, scale: float, seqs: _Seqs):
    """-> dq, dk ``[T_all, H, K]`` and the per-K-block ``q . dq - k . dk`` terms ``[NK, T_all, H]`` (or None)."""
    T_all, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _tile(K), _tile(V)
    NK = triton.cdiv(K, BK)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dB = q.new_empty(NK, T_all, H, dtype=torch.float32) if gc is not None else None
    _chunk_dqk_kernel[(NK, seqs.NC, H)](
        q, k, v, do, gc, h, dh, dq, dk, dB, seqs.cu_seqlens, seqs.chunk_idx, scale, T_all, H=H, K=K, V=V,
        BT=seqs.BT, BK=BK, BV=BV, USE_G=gc is not None, **_dot_config(q.dtype), num_warps=4,
    )
    return dq, dk, dB


def _dg_from_terms(dB: torch.Tensor, ht, dht, seqs: _Seqs, dtype: torch.dtype) -> torch.Tensor:
    """dB ``[NB, T_all, H]`` fp32 -> dg ``[T_all, H]`` in ``dtype`` (reverse cumsum per sequence)."""
    NB, T_all, H = dB.shape
    dgt = (ht * dht).sum((-2, -1)).contiguous() if dht is not None else None
    dg = dB.new_empty(T_all, H, dtype=dtype)
    _reverse_cumsum_kernel[(seqs.N * H,)](dB, dg, dgt, seqs.cu_seqlens, T_all, H=H, NB=NB, BT=seqs.BT,
                                          USE_DGT=dgt is not None, num_warps=1)
    return dg


def _fused_tiles(K: int, V: int):
    BK = triton.next_power_of_2(K)
    # The whole key dim lives in one program; shrink BV to keep the register-resident state near 4K floats.
    BV = min(triton.next_power_of_2(V), max(8, 4096 // BK))
    return BK, BV, max(1, min(4, BK * BV // 1024))


def _fused_recurrent_fwd(q, k, v, g, h0, scale: float, seqs: _Seqs, store_final: bool):
    _, H, K = q.shape
    V = v.shape[-1]
    BK, BV, num_warps = _fused_tiles(K, V)
    o = torch.empty_like(v)
    ht = q.new_empty(seqs.N, H, K, V, dtype=torch.float32) if store_final else None
    _fused_recurrent_fwd_kernel[(triton.cdiv(V, BV), seqs.N * H)](
        q, k, v, g, o, h0, ht, seqs.cu_seqlens, scale, H=H, K=K, V=V, BK=BK, BV=BV, USE_G=g is not None,
        USE_H0=h0 is not None, STORE_HT=store_final, num_warps=num_warps,
    )
    return o, ht


def _fused_recurrent_bwd(q, k, v, g, do, h0, dht, scale: float, seqs: _Seqs, store_dh0: bool):
    """-> dq, dk fp32 ``[T_all, H, K]``, dv ``[T_all, H, V]`` and dh0 (or None)."""
    T_all, H, K = q.shape
    V = v.shape[-1]
    BK, BV, num_warps = _fused_tiles(K, V)
    NV = triton.cdiv(V, BV)
    dq = q.new_empty(NV, T_all, H, K, dtype=torch.float32)
    dk = q.new_empty(NV, T_all, H, K, dtype=torch.float32)
    dv = torch.empty_like(v)
    dh0 = q.new_empty(seqs.N, H, K, V, dtype=torch.float32) if store_dh0 else None
    _fused_recurrent_bwd_kernel[(NV, seqs.N * H)](
        q, k, v, g, do, dq, dk, dv, h0, dht, dh0, seqs.cu_seqlens, scale, T_all, H=H, K=K, V=V, BK=BK, BV=BV,
        USE_G=g is not None, USE_H0=h0 is not None, USE_DHT=dht is not None, STORE_DH0=store_dh0,
        num_warps=num_warps,
    )
    return dq.sum(0), dk.sum(0), dv, dh0


# ---------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------


class _ChunkLinearAttentionFunction(torch.autograd.Function):
    """Chunked path on packed tensors: q, k ``[T_all, H, K]``, v ``[T_all, H, V]``, g ``[T_all, H]`` or None,
    initial_state ``[N, H, K, V]`` fp32 or None -> o ``[T_all, H, V]``, final state ``[N, H, K, V]`` or None."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, seqs, output_final_state):
        gc = _chunk_local_cumsum(g, seqs) if g is not None else None
        # The final state is needed by dg even when the caller does not want it.
        store_final = output_final_state or g is not None
        h, ht = _chunk_state_fwd(k, v, gc, initial_state, seqs, store_final)
        o = _chunk_output_fwd(q, k, v, gc, h, scale, seqs)
        # h is recomputed in backward: it is NC * K * V floats per head, more than the inputs themselves.
        ctx.save_for_backward(q, k, v, g, initial_state, ht)
        ctx.scale, ctx.seqs = scale, seqs
        ctx.set_materialize_grads(False)
        return o, (ht if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, initial_state, ht = ctx.saved_tensors
        scale, seqs = ctx.scale, ctx.seqs
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dht = None if dht is None else dht.float().contiguous()
        gc = _chunk_local_cumsum(g, seqs) if g is not None else None
        h, _ = _chunk_state_fwd(k, v, gc, initial_state, seqs, False)
        dh, dh0 = _chunk_state_bwd(q, do, gc, dht, scale, seqs, initial_state is not None)
        dv = _chunk_dv(q, k, do, gc, dh, scale, seqs)
        dq, dk, dB = _chunk_dqk(q, k, v, do, gc, h, dh, scale, seqs)
        dg = _dg_from_terms(dB, ht, dht, seqs, g.dtype) if g is not None and ctx.needs_input_grad[3] else None
        return dq, dk, dv, dg, dh0, None, None, None


class _FusedRecurrentLinearAttentionFunction(torch.autograd.Function):
    """Fused recurrent path; same packed interface as :class:`_ChunkLinearAttentionFunction`."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, seqs, output_final_state):
        store_final = output_final_state or g is not None
        o, ht = _fused_recurrent_fwd(q, k, v, g, initial_state, scale, seqs, store_final)
        ctx.save_for_backward(q, k, v, g, initial_state, ht)
        ctx.scale, ctx.seqs = scale, seqs
        ctx.set_materialize_grads(False)
        return o, (ht if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, initial_state, ht = ctx.saved_tensors
        scale, seqs = ctx.scale, ctx.seqs
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dht = None if dht is None else dht.float().contiguous()
        dq, dk, dv, dh0 = _fused_recurrent_bwd(q, k, v, g, do, initial_state, dht, scale, seqs,
                                               initial_state is not None)
        dg = None
        if g is not None and ctx.needs_input_grad[3]:
            dB = (q.float() * dq - k.float() * dk).sum(-1)
            dg = _dg_from_terms(dB[None], ht, dht, seqs, g.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv, dg, dh0, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------


def _run(fn, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, seqs=None):
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("initial_state", initial_state)):
        if t is not None and t.dtype == torch.float64:
            raise ValueError(
                f"triton linear attention: `{name}` is float64, which the Triton kernels do not support; "
                "use backend='chunk' or backend='naive' for float64 (e.g. gradcheck)."
            )
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    if seqs is None:
        seqs = _Seqs(B, T, cu_seqlens, q.device)
    v_dtype = v.dtype
    # tl.dot needs both operands in one dtype; mixed inputs compute in their promoted dtype.
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = (x.to(dtype).reshape(B * T, H, x.shape[-1]).contiguous() for x in (q, k, v))
    g = None if g is None else g.reshape(B * T, H).contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht = fn.apply(q, k, v, g, h0, scale, seqs, output_final_state)
    return o.reshape(B, T, H, V).to(v_dtype), ht


def fused_recurrent_linear_attention(
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
    """(Gated) linear attention one token at a time in a single Triton kernel (short inputs, decoding).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (fp16, bf16 or fp32).
        g: optional log-decay ``[B, T, H]`` (entries <= 0).
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` float32 (``[N, H, K, V]`` with ``cu_seqlens``).
        output_final_state: also return the state after the last token.
        cu_seqlens: optional ``[N + 1]`` offsets of N sequences packed along T (B must be 1).

    Returns:
        ``(o, S)``: o ``[B, T, H, V]`` in v's dtype, final state ``[B or N, H, K, V]`` float32 or None.
    """
    return _run(_FusedRecurrentLinearAttentionFunction, q, k, v, g, scale, initial_state, output_final_state,
                cu_seqlens)


def chunk_triton_linear_attention(
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
    """(Gated) linear attention with the chunked Triton kernels (chunk length 64); arguments and returns as in
    :func:`fused_recurrent_linear_attention`."""
    return _run(_ChunkLinearAttentionFunction, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def triton_linear_attention(
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
    """(Gated) linear attention in Triton: the fused recurrent kernel when every sequence has at most 64 tokens
    (decoding, short prompts), the chunked kernels otherwise. Arguments and returns as in
    :func:`fused_recurrent_linear_attention`."""
    B, T = q.shape[:2]
    seqs = _Seqs(B, T, cu_seqlens, q.device)
    fn = _FusedRecurrentLinearAttentionFunction if seqs.max_len <= _FUSED_MAX_LEN else _ChunkLinearAttentionFunction
    return _run(fn, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, seqs=seqs)
