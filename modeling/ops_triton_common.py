"""What both Triton families share: packed-sequence tables, tile helpers, launch configs and the chunk kernels whose
math is the same for linear attention and the delta rule.

Layout. Every kernel sees packed tensors: q, k ``[T_all, H, K]``, v ``[T_all, H, V]``, gates ``[T_all, H]``,
described by :class:`Seqs` (``cu_seqlens`` offsets and a ``(sequence, chunk)`` table), so variable-length batches
run natively and a ``[B, T, ...]`` batch is just B sequences of length T. Chunk-level tensors (chunk-start states
``h``, end-of-chunk state gradients ``dh``) are ``[NC, H, K, V]`` with NC the total number of chunks.

Shared chunk math (per chunk of BT tokens, within-chunk cumulative log-decay ``b``, causal decay
``M[t, i] = exp(b_t - b_i)`` for ``i <= t``, chunk-start state ``h``; ``x`` is v for linear attention and the
delta rule's corrected values ``v_new`` for the delta rule)::

    O  = scale (exp(b) Q h + (Q K^T * M) X)                                       (output kernel)
    dX = scale (Q K^T * M)^T dO [+ exp(b_C - b) K dh]                             (dv kernel)
    dQ = scale (exp(b) dO h^T + (dO X^T * M) K)
    dK = exp(b_C - b) X dh^T + scale (dO X^T * M)^T Q                             (dqk kernel)

Gate gradients use a change of variables instead of per-term bookkeeping: with the sequence-wide cumulative
log-decay ``B``, both rules depend on ``B`` only through ``exp(B_t) q_t``, ``exp(-B_t) x_t`` (x = k for linear
attention, x = v for the delta rule) and the final state ``exp(B_T) S~_T``. So
``dL/dB_t = q_t . dq_t - x_t . dx_t`` (+ ``<S_T, dS_T>`` at a sequence's last token) and ``dg`` is the reverse
cumulative sum of that over the sequence (:func:`dg_from_terms`).

Precision. bf16/fp16 inputs feed ``tl.dot`` in their own dtype with fp32 accumulation (tensor cores); fp32 inputs
keep fp32 accuracy (``tf32x3``: three tf32 tensor-core products). States and every recurrence accumulate in fp32; stored chunk states use the compute
dtype (half the bytes for bf16). Under ``TRITON_INTERPRET=1`` bf16 dots are emulated in fp32.

Launch configs. Each kernel has a list of candidate :class:`triton.Config`; the first is the safe one (it fits the
shared memory of sm_80, sm_86/89 and sm_90 for head dims up to 256, checked ahead of time by
``tests/ops/test_triton_fit.py``) and is used under the interpreter or with ``HF_FWP_AUTOTUNE=0``; on a GPU the
list is autotuned per shape key (configs that do not fit are skipped by Triton's autotuner).
"""

from __future__ import annotations

import os

import torch
# In a try block: transformers' remote-code loader treats imports outside one as required packages, and Triton
# (Linux only) is optional; the dispatchers import this module only when Triton imports.
try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - platforms without Triton
    raise ImportError("the Triton kernels need the `triton` package (Linux); use backend='chunk'.") from error

from .ops_utils import triton_interpreted

BT = 64  # chunk length: 4 sub-blocks of 16 for the delta rule's triangular solve, tensor-core friendly

# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def load_tile(ptr, off_r, off_c, n_r, n_c, stride_r, stride_c, BR: tl.constexpr, BC: tl.constexpr):
    """Zero-filled ``[BR, BC]`` tile of the ``[n_r, n_c]`` matrix at ``ptr``; a transposed view is just swapped
    strides."""
    o_r = off_r + tl.arange(0, BR)
    o_c = off_c + tl.arange(0, BC)
    mask = (o_r < n_r)[:, None] & (o_c < n_c)[None, :]
    return tl.load(ptr + o_r[:, None] * stride_r + o_c[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, b_x, off_r, off_c, n_r, n_c, stride_r, stride_c, BR: tl.constexpr, BC: tl.constexpr):
    o_r = off_r + tl.arange(0, BR)
    o_c = off_c + tl.arange(0, BC)
    mask = (o_r < n_r)[:, None] & (o_c < n_c)[None, :]
    tl.store(ptr + o_r[:, None] * stride_r + o_c[None, :] * stride_c, b_x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_vec(ptr, off, n, stride, BR: tl.constexpr):
    o_r = off + tl.arange(0, BR)
    return tl.load(ptr + o_r * stride, mask=o_r < n, other=0.0)


@triton.jit
def store_vec(ptr, b_x, off, n, stride, BR: tl.constexpr):
    o_r = off + tl.arange(0, BR)
    tl.store(ptr + o_r * stride, b_x.to(ptr.dtype.element_ty), mask=o_r < n)


@triton.jit
def mma(a, b, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """``a @ b`` with both operands cast to the compute dtype and an fp32 accumulator."""
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=DOT_PREC, out_dtype=tl.float32)


@triton.jit
def chunk_bounds(cu_seqlens, chunk_idx, i_c):
    """(sequence, chunk within it, first token, length) of global chunk ``i_c``."""
    i_n = tl.load(chunk_idx + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_idx + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    return i_n, i_t, bos, T


@triton.jit
def seq_bounds(cu_seqlens, chunk_offsets, i_n, BT: tl.constexpr):
    """(first token, length, number of chunks, first global chunk) of sequence ``i_n``."""
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    boc = tl.load(chunk_offsets + i_n).to(tl.int64)
    return bos, T, tl.cdiv(T, BT), boc


@triton.jit
def chunk_gates(gc, bos, i_h, i_t, T, H: tl.constexpr, BT: tl.constexpr):
    """Cumulative log-decay of one chunk ``[BT]`` (0 past the end) and its value at the chunk's last token."""
    b_g = load_vec(gc + bos * H + i_h, i_t * BT, T, H, BT)
    last = tl.minimum(i_t * BT + BT, T) - 1
    return b_g, tl.load(gc + (bos + last) * H + i_h)


@triton.jit
def chunk_local_cumsum_kernel(g, gc, cu_seqlens, chunk_idx, H: tl.constexpr, BT: tl.constexpr):
    """Within-chunk inclusive cumsum of the log-decay. g: ``[T_all, H]`` any float; gc: ``[T_all, H]`` fp32."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_t, bos, T = chunk_bounds(cu_seqlens, chunk_idx, i_c)
    b_g = load_vec(g + bos * H + i_h, i_t * BT, T, H, BT).to(tl.float32)
    store_vec(gc + bos * H + i_h, tl.cumsum(b_g, axis=0), i_t * BT, T, H, BT)


@triton.jit
def reverse_cumsum_kernel(dB, dg, dgt, cu_seqlens, T_all, H: tl.constexpr, NB: tl.constexpr, BT: tl.constexpr,
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
            b_x += load_vec(dB + (i_b * T_all + bos) * H + i_h, i_t * BT, T, H, BT)
        store_vec(dg + bos * H + i_h, tl.cumsum(b_x, axis=0, reverse=True) + b_carry, i_t * BT, T, H, BT)
        b_carry += tl.sum(b_x, axis=0)


@triton.jit
def chunk_output_kernel(q, k, x, gc, h, o, cu_seqlens, chunk_idx, scale,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        USE_G: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """``O = scale (exp(b) Q h + (Q K^T * M) X)`` for one chunk and V block.

    q, k: ``[T_all, H, K]``; x, o: ``[T_all, H, V]``; h: ``[NC, H, K, V]``. Grid ``(cdiv(V, BV), NC, H)``.
    """
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_t, bos, T = chunk_bounds(cu_seqlens, chunk_idx, i_c)
    p_q = q + (bos * H + i_h) * K
    p_k = k + (bos * H + i_h) * K
    p_h = h + (i_c * H + i_h).to(tl.int64) * K * V

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_q = load_tile(p_q, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
        b_k = load_tile(p_k, i_k * BK, i_t * BT, K, T, 1, H * K, BK, BT)  # k^T
        b_h = load_tile(p_h, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
        b_o += mma(b_q, b_h, DOT_DTYPE, DOT_PREC)
        b_A += mma(b_q, b_k, DOT_DTYPE, DOT_PREC)

    o_i = tl.arange(0, BT)
    # Rows past the sequence end are masked too: their zero-filled gates would make b_t - b_i > 0 there.
    causal = (o_i[:, None] >= o_i[None, :]) & (i_t * BT + o_i < T)[:, None]
    if USE_G:
        b_g = load_vec(gc + bos * H + i_h, i_t * BT, T, H, BT)
        b_o *= tl.exp(b_g)[:, None]
        # Mask the exponent, not the product: above the diagonal b_t - b_i > 0 can overflow.
        b_A *= tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], float("-inf")))
    else:
        b_A = tl.where(causal, b_A, 0.0)
    b_x = load_tile(x + (bos * H + i_h) * V, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
    b_o = (b_o + mma(b_A, b_x, DOT_DTYPE, DOT_PREC)) * scale
    store_tile(o + (bos * H + i_h) * V, b_o, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)


@triton.jit
def chunk_dv_kernel(q, k, do, gc, dh, dv, cu_seqlens, chunk_idx, scale,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    USE_G: tl.constexpr, USE_DH: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """``dX = scale (Q K^T * M)^T dO [+ exp(b_C - b) (K dh)]`` for one chunk and V block.

    The delta rule calls it without dh (its state term is added in the sequential backward pass).
    q, k: ``[T_all, H, K]``; do, dv: ``[T_all, H, V]``; dh: ``[NC, H, K, V]``. Grid ``(cdiv(V, BV), NC, H)``.
    """
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_t, bos, T = chunk_bounds(cu_seqlens, chunk_idx, i_c)
    p_q = q + (bos * H + i_h) * K
    p_k = k + (bos * H + i_h) * K

    b_At = tl.zeros([BT, BT], dtype=tl.float32)  # [i, t] = k_i . q_t
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_k = load_tile(p_k, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
        b_q = load_tile(p_q, i_k * BK, i_t * BT, K, T, 1, H * K, BK, BT)  # q^T
        b_At += mma(b_k, b_q, DOT_DTYPE, DOT_PREC)
        if USE_DH:
            b_dh = load_tile(dh + (i_c * H + i_h).to(tl.int64) * K * V, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
            b_dv += mma(b_k, b_dh, DOT_DTYPE, DOT_PREC)

    o_i = tl.arange(0, BT)
    anticausal = (o_i[:, None] <= o_i[None, :]) & (i_t * BT + o_i < T)[None, :]
    if USE_G:
        b_g, b_glast = chunk_gates(gc, bos, i_h, i_t, T, H, BT)
        if USE_DH:
            b_dv *= tl.exp(tl.where(i_t * BT + o_i < T, b_glast - b_g, 0.0))[:, None]
        b_At *= tl.exp(tl.where(anticausal, b_g[None, :] - b_g[:, None], float("-inf")))
    else:
        b_At = tl.where(anticausal, b_At, 0.0)
    b_do = load_tile(do + (bos * H + i_h) * V, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
    b_dv += mma(b_At * scale, b_do, DOT_DTYPE, DOT_PREC)
    store_tile(dv + (bos * H + i_h) * V, b_dv, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)


@triton.jit
def chunk_dqk_kernel(q, k, x, do, gc, h, dh, dx, dq, dk, dw, dB, cu_seqlens, chunk_idx, scale, T_all,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     USE_G: tl.constexpr, DELTA: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """dq and dk of one chunk and K block, plus this block's share of the gate terms ``dB``.

    ``dQ = scale (exp(b) dO h^T + (dO X^T * M) K)``, ``dK = exp(b_C - b) X dh^T + scale (dO X^T * M)^T Q``.
    For the delta rule (``DELTA``) also ``dW = -dX h^T`` (dx: gradient of the corrected values, fp32), and dB gets
    ``q . dq`` only (its ``-v . dv`` share comes from the WY backward); for linear attention dB gets
    ``q . dq - k . dk``. q, k, dq, dk, dw: ``[T_all, H, K]`` (dq, dk, dw fp32); x, do, dx: ``[T_all, H, V]``;
    h, dh: ``[NC, H, K, V]``; dB: ``[cdiv(K, BK), T_all, H]`` fp32. Grid ``(cdiv(K, BK), NC, H)``.
    """
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_t, bos, T = chunk_bounds(cu_seqlens, chunk_idx, i_c)
    p_x = x + (bos * H + i_h) * V
    p_do = do + (bos * H + i_h) * V
    p_h = h + (i_c * H + i_h).to(tl.int64) * K * V
    p_dh = dh + (i_c * H + i_h).to(tl.int64) * K * V

    b_dA = tl.zeros([BT, BT], dtype=tl.float32)  # [t, i] = do_t . x_i
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        b_xt = load_tile(p_x, i_v * BV, i_t * BT, V, T, 1, H * V, BV, BT)
        b_do = load_tile(p_do, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        # Transposed [BV, BK] views of the K x V states.
        b_ht = load_tile(p_h, i_v * BV, i_k * BK, V, K, 1, V, BV, BK)
        b_dht = load_tile(p_dh, i_v * BV, i_k * BK, V, K, 1, V, BV, BK)
        b_dA += mma(b_do, b_xt, DOT_DTYPE, DOT_PREC)
        b_dq += mma(b_do, b_ht, DOT_DTYPE, DOT_PREC)
        b_dk += mma(tl.trans(b_xt), b_dht, DOT_DTYPE, DOT_PREC)
        if DELTA:
            b_dx = load_tile(dx + (bos * H + i_h) * V, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
            b_dw -= mma(b_dx, b_ht, DOT_DTYPE, DOT_PREC)

    b_q = load_tile(q + (bos * H + i_h) * K, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
    b_k = load_tile(k + (bos * H + i_h) * K, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
    o_i = tl.arange(0, BT)
    causal = (o_i[:, None] >= o_i[None, :]) & (i_t * BT + o_i < T)[:, None]
    if USE_G:
        b_g, b_glast = chunk_gates(gc, bos, i_h, i_t, T, H, BT)
        b_dq *= tl.exp(b_g)[:, None]
        b_dk *= tl.exp(tl.where(i_t * BT + o_i < T, b_glast - b_g, 0.0))[:, None]
        b_dA *= tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], float("-inf")))
    else:
        b_dA = tl.where(causal, b_dA, 0.0)
    b_dA *= scale
    b_dq = b_dq * scale + mma(b_dA, b_k, DOT_DTYPE, DOT_PREC)
    b_dk += mma(tl.trans(b_dA), b_q, DOT_DTYPE, DOT_PREC)

    store_tile(dq + (bos * H + i_h) * K, b_dq, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
    store_tile(dk + (bos * H + i_h) * K, b_dk, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
    if DELTA:
        store_tile(dw + (bos * H + i_h) * K, b_dw, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
    if USE_G:
        # From the fp32 gradients, not the stored ones: dg is a long sum of these terms.
        b_dB = b_q.to(tl.float32) * b_dq
        if not DELTA:
            b_dB -= b_k.to(tl.float32) * b_dk
        store_vec(dB + (i_k * T_all + bos) * H + i_h, tl.sum(b_dB, axis=1), i_t * BT, T, H, BT)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------


class Seqs:
    """Packed-sequence tables shared by all launchers.

    cu_seqlens ``[N + 1]`` int32 token offsets; chunk_idx ``[NC, 2]`` int32 (sequence, chunk within it);
    chunk_offsets ``[N + 1]`` int32 first global chunk of each sequence; max_len the longest sequence.
    """

    def __init__(self, B: int, T: int, cu_seqlens: torch.Tensor | None, device: torch.device, BT: int = BT):
        if cu_seqlens is None:
            nt = triton.cdiv(T, BT)
            self.N, self.max_len, self.NC = B, T, B * nt
            self.cu_seqlens = torch.arange(B + 1, device=device, dtype=torch.int32) * T
            seq = torch.arange(B, device=device, dtype=torch.int32).repeat_interleave(nt)
            chunk = torch.arange(nt, device=device, dtype=torch.int32).repeat(B)
            self.chunk_offsets = torch.arange(B + 1, device=device, dtype=torch.int32) * nt
        else:
            # One host read of the offsets; everything after it is on the device.
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


def tile(d: int, cap: int = 64) -> int:
    """Tile width for a head dim: a power of two in [16, cap]."""
    return min(cap, max(16, triton.next_power_of_2(d)))


def dot_config(dtype: torch.dtype) -> dict:
    """Compute dtype and precision of every tl.dot for inputs of ``dtype``."""
    dot_dtype = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
    if dtype == torch.bfloat16 and triton_interpreted():
        # The interpreter multiplies bf16 tiles as their raw uint16 bits; emulate them in fp32 there.
        dot_dtype = tl.float32
    # fp32 inputs keep fp32 accuracy on tensor cores with three tf32 products (plain tf32 loses ~3 digits, and
    # "ieee" falls back to CUDA-core FMAs that spill registers); half inputs ignore the setting.
    return dict(DOT_DTYPE=dot_dtype, DOT_PREC="tf32x3" if dot_dtype == tl.float32 else None)


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of stored chunk states and intermediates for inputs of ``dtype``: the compute dtype."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def configs(*specs: tuple) -> list:
    """``(meta, num_warps, num_stages)`` tuples -> triton.Config list; the first is the safe default."""
    return [triton.Config(dict(meta), num_warps=w, num_stages=s) for meta, w, s in specs]


def by_dtype(half: list, fp32: list):
    """Config lists for half (bf16/fp16) and fp32 inputs: fp32 tiles split into three tf32 products need more
    registers, so their safe config uses 8 warps and no software pipelining (shared memory)."""
    return lambda dtype: fp32 if dtype == torch.float32 else half


# Chunk-parallel kernels: tiles are fixed by the head dims; the tuner picks warps and pipelining depth.
parallel_configs = by_dtype(configs(({}, 4, 2), ({}, 4, 3), ({}, 8, 2), ({}, 8, 3), ({}, 4, 1), ({}, 2, 2)),
                            configs(({}, 8, 1), ({}, 4, 1), ({}, 8, 2)))
# Tiny per-token kernels (cumsums): one warp is plenty.
SCALAR_CONFIGS = configs(({}, 1, 1))

_TUNERS: dict = {}
# Set by hf_fwp.ops.triton_fit to capture launches (for ahead-of-time compilation) instead of running them.
RECORDER: list | None = None


def autotune_enabled() -> bool:
    return not triton_interpreted() and os.environ.get("HF_FWP_AUTOTUNE", "1") != "0"


def launch(kernel, grid, cfgs: list, key: list[str], **args) -> None:
    """Launch ``kernel`` with every argument by name.

    ``grid`` maps a config's meta-parameters to the launch grid. On a GPU the configs are autotuned per ``key``
    (kernel argument names); under the interpreter, with ``HF_FWP_AUTOTUNE=0`` or a single config, the first
    config runs.
    """
    if RECORDER is not None:
        RECORDER.append((kernel, args, cfgs))
        return
    if len(cfgs) == 1 or not autotune_enabled():
        cfg = cfgs[0]
        kernel[grid(cfg.kwargs)](**args, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return
    # One tuner per kernel and config list (lists differ by input dtype and by clamped tile sizes).
    tkey = (kernel, tuple((tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in cfgs))
    tuner = _TUNERS.get(tkey)
    if tuner is None:
        tuner = _TUNERS[tkey] = triton.autotune(configs=cfgs, key=key)(kernel)
    tuner[grid](**args)


def chunk_local_cumsum(g: torch.Tensor, seqs: Seqs) -> torch.Tensor:
    """g ``[T_all, H]`` -> within-chunk cumsum ``[T_all, H]`` fp32."""
    T_all, H = g.shape
    gc = torch.empty(T_all, H, device=g.device, dtype=torch.float32)
    launch(chunk_local_cumsum_kernel, lambda m: (seqs.NC, H), SCALAR_CONFIGS, [],
           g=g, gc=gc, cu_seqlens=seqs.cu_seqlens, chunk_idx=seqs.chunk_idx, H=H, BT=seqs.BT)
    return gc


def dg_from_terms(dB: torch.Tensor, ht, dht, seqs: Seqs, dtype: torch.dtype) -> torch.Tensor:
    """dB ``[NB, T_all, H]`` fp32 -> dg ``[T_all, H]`` in ``dtype``: reverse cumsum per sequence, plus the final
    state term ``<S_T, dS_T>`` at each sequence's last token."""
    NB, T_all, H = dB.shape
    dgt = (ht * dht).sum((-2, -1)).contiguous() if dht is not None else None
    dg = dB.new_empty(T_all, H, dtype=dtype)
    launch(reverse_cumsum_kernel, lambda m: (seqs.N * H,), SCALAR_CONFIGS, [],
           dB=dB, dg=dg, dgt=dgt, cu_seqlens=seqs.cu_seqlens, T_all=T_all, H=H, NB=NB, BT=seqs.BT,
           USE_DGT=dgt is not None)
    return dg


def chunk_output(q, k, x, gc, h, scale: float, seqs: Seqs) -> torch.Tensor:
    """-> o ``[T_all, H, V]`` in x's dtype (see :func:`chunk_output_kernel`)."""
    _, H, K = q.shape
    V = x.shape[-1]
    BK, BV = tile(K), tile(V)
    o = torch.empty_like(x)
    launch(chunk_output_kernel, lambda m: (triton.cdiv(V, BV), seqs.NC, H), parallel_configs(q.dtype),
           ["H", "K", "V", "USE_G", "DOT_DTYPE"],
           q=q, k=k, x=x, gc=gc, h=h, o=o, cu_seqlens=seqs.cu_seqlens, chunk_idx=seqs.chunk_idx, scale=scale,
           H=H, K=K, V=V, BT=seqs.BT, BK=BK, BV=BV, USE_G=gc is not None, **dot_config(q.dtype))
    return o


def chunk_dv(q, k, do, gc, dh, scale: float, seqs: Seqs, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """-> dX ``[T_all, H, V]`` (in ``out_dtype``, default do's) (see :func:`chunk_dv_kernel`); dh may be None."""
    _, H, K = q.shape
    V = do.shape[-1]
    BK, BV = tile(K), tile(V)
    dv = torch.empty_like(do, dtype=out_dtype or do.dtype)
    launch(chunk_dv_kernel, lambda m: (triton.cdiv(V, BV), seqs.NC, H), parallel_configs(q.dtype),
           ["H", "K", "V", "USE_G", "USE_DH", "DOT_DTYPE"],
           q=q, k=k, do=do, gc=gc, dh=dh, dv=dv, cu_seqlens=seqs.cu_seqlens, chunk_idx=seqs.chunk_idx, scale=scale,
           H=H, K=K, V=V, BT=seqs.BT, BK=BK, BV=BV, USE_G=gc is not None, USE_DH=dh is not None,
           **dot_config(q.dtype))
    return dv


def chunk_dqk(q, k, x, do, gc, h, dh, scale: float, seqs: Seqs, dx=None):
    """-> fp32 dq, dk ``[T_all, H, K]``, dw (delta rule, when ``dx`` is given, else None) and the per-K-block gate
    terms ``[NK, T_all, H]`` (or None without gates) (see :func:`chunk_dqk_kernel`)."""
    T_all, H, K = q.shape
    V = x.shape[-1]
    BK, BV = tile(K), tile(V)
    NK = triton.cdiv(K, BK)
    f32 = dict(dtype=torch.float32, device=q.device)
    dq, dk = torch.empty(T_all, H, K, **f32), torch.empty(T_all, H, K, **f32)
    dw = torch.empty(T_all, H, K, **f32) if dx is not None else None
    dB = torch.empty(NK, T_all, H, **f32) if gc is not None else None
    launch(chunk_dqk_kernel, lambda m: (NK, seqs.NC, H), parallel_configs(q.dtype),
           ["H", "K", "V", "USE_G", "DELTA", "DOT_DTYPE"],
           q=q, k=k, x=x, do=do, gc=gc, h=h, dh=dh, dx=dx, dq=dq, dk=dk, dw=dw, dB=dB, cu_seqlens=seqs.cu_seqlens,
           chunk_idx=seqs.chunk_idx, scale=scale, T_all=T_all, H=H, K=K, V=V, BT=seqs.BT, BK=BK, BV=BV,
           USE_G=gc is not None, DELTA=dx is not None, **dot_config(q.dtype))
    return dq, dk, dw, dB


def fused_tiles(K: int, V: int) -> tuple[int, int, int]:
    """BK, BV and warps of the fused recurrent kernels: the whole key dim lives in one program, BV shrinks to keep
    the register-resident state near 4K floats (at K = 256, BV = 16)."""
    BK = max(16, triton.next_power_of_2(K))
    BV = min(triton.next_power_of_2(V), max(8, 4096 // BK))
    return BK, BV, max(1, min(4, BK * BV // 1024))


def promote_qkv(q, k, v):
    """``[B, T, H, D]`` inputs -> packed contiguous ``[B * T, H, D]`` in one dtype (tl.dot needs matching operands)."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    B, T, H = q.shape[:3]
    return tuple(x.to(dtype).reshape(B * T, H, x.shape[-1]).contiguous() for x in (q, k, v))


def refuse_float64(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype == torch.float64:
            raise ValueError(
                f"{op}: `{name}` is float64, which the Triton kernels do not support (they accumulate in float32); "
                "use backend='chunk' or backend='naive' for float64 (e.g. gradcheck)."
            )
