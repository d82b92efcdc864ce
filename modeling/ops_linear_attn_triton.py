"""Triton kernels for (gated) linear attention, forward and backward.

Rule (per head, S is K x V): ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale * q_t)``.

Two algorithms share one interface:

* chunked (long inputs): per chunk of ``BT`` tokens with within-chunk cumulative log-decay ``b``,
  ``O = (scale Q K^T * M) V + scale (exp(b) Q) S_n`` and ``S_{n+1} = exp(b_C) S_n + (exp(b_C - b) K)^T V``,
  where ``M[t, i] = exp(b_t - b_i)`` for ``i <= t``. Every exponent is <= 0, so strong decays underflow to 0
  instead of overflowing. The sequential state kernels (split over K and V blocks: the rule has no coupling across
  K) store the chunk-start states; the output, dv and dq/dk kernels are the ones the delta rule shares
  (:mod:`hf_fwp.modeling.ops_triton_common`);
* fused recurrent (short inputs, decoding): one token at a time with the state in registers.

All kernels see the packed layout of :mod:`hf_fwp.modeling.ops_triton_common`, so variable-length batches run natively.
Gate gradients: ``dL/dB_t = q_t . dq_t - k_t . dk_t`` for the sequence-wide cumulative log-decay ``B`` (q and k
enter the rule only as ``exp(B_t) q_t`` and ``exp(-B_i) k_i``), plus ``<S_T, dS_T>`` at a sequence's last token;
``dg`` is its reverse cumulative sum.
"""

from __future__ import annotations

import functools

import torch
# In a try block: transformers' remote-code loader treats imports outside one as required packages, and Triton
# (Linux only) is optional; the dispatchers import this module only when Triton imports.
try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - platforms without Triton
    raise ImportError("the Triton kernels need the `triton` package (Linux); use backend='chunk'.") from error

from .ops_dispatch import TRITON_FUSED_MAX_LEN
from .ops_triton_common import (
    Seqs,
    by_dtype,
    chunk_dqk,
    chunk_gates,
    chunk_dv,
    chunk_local_cumsum,
    chunk_output,
    configs,
    dg_from_terms,
    dot_config,
    fused_tiles,
    launch,
    load_tile,
    mma,
    promote_qkv,
    refuse_float64,
    seq_bounds,
    store_dtype,
    store_tile,
    tile,
)

# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def _chunk_state_fwd_kernel(k, v, gc, h, h0, ht, cu_seqlens, chunk_offsets,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                            DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Chunk-start states of one sequence and head, one ``[BK, BV]`` block per program.

    k: ``[T_all, H, K]``; v: ``[T_all, H, V]``; gc: ``[T_all, H]`` fp32 within-chunk cumsum; h: ``[NC, H, K, V]``
    (state before each chunk, compute dtype); h0, ht: ``[N, H, K, V]`` fp32. Grid ``(cdiv(K, BK), cdiv(V, BV), N * H)``.
    """
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, NT, boc = seq_bounds(cu_seqlens, chunk_offsets, i_n, BT)
    p_k = k + (bos * H + i_h) * K
    p_v = v + (bos * H + i_h) * V

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += load_tile(h0 + i_nh * K * V, i_k * BK, i_v * BV, K, V, V, 1, BK, BV).to(tl.float32)
    for i_t in range(NT):
        store_tile(h + ((boc + i_t) * H + i_h) * K * V, b_h, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
        b_k = load_tile(p_k, i_k * BK, i_t * BT, K, T, 1, H * K, BK, BT)  # k^T
        b_v = load_tile(p_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        if USE_G:
            b_g, b_glast = chunk_gates(gc, bos, i_h, i_t, T, H, BT)
            o_t = i_t * BT + tl.arange(0, BT)
            # Rows past the sequence end hold zero keys; masking their exponent keeps every exp argument <= 0.
            b_k = b_k * tl.exp(tl.where(o_t < T, b_glast - b_g, 0.0))[None, :]
            b_h *= tl.exp(b_glast)
        b_h += mma(b_k, b_v, DOT_DTYPE, DOT_PREC)
    if STORE_HT:
        store_tile(ht + i_nh * K * V, b_h, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)


@triton.jit
def _chunk_state_bwd_kernel(q, do, gc, dh, dht, dh0, cu_seqlens, chunk_offsets, scale,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            USE_G: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                            DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Reverse state recurrence: ``dh[c]`` is the gradient of the state at the END of chunk c.

    ``dS_n = exp(b_C) dS_{n+1} + scale (exp(b) Q)^T dO``. q: ``[T_all, H, K]``; do: ``[T_all, H, V]``;
    dh: ``[NC, H, K, V]`` (compute dtype); dht, dh0: ``[N, H, K, V]`` fp32. Grid ``(cdiv(K, BK), cdiv(V, BV), N * H)``.
    """
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, NT, boc = seq_bounds(cu_seqlens, chunk_offsets, i_n, BT)
    p_q = q + (bos * H + i_h) * K
    p_do = do + (bos * H + i_h) * V

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += load_tile(dht + i_nh * K * V, i_k * BK, i_v * BV, K, V, V, 1, BK, BV).to(tl.float32)
    for i_s in range(NT):
        i_t = NT - 1 - i_s
        store_tile(dh + ((boc + i_t) * H + i_h) * K * V, b_dh, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
        b_q = load_tile(p_q, i_k * BK, i_t * BT, K, T, 1, H * K, BK, BT)  # q^T
        b_do = load_tile(p_do, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        if USE_G:
            b_g, b_glast = chunk_gates(gc, bos, i_h, i_t, T, H, BT)
            b_q = b_q * tl.exp(b_g)[None, :]
            b_dh *= tl.exp(b_glast)
        b_dh += mma(b_q, b_do, DOT_DTYPE, DOT_PREC) * scale
    if STORE_DH0:
        store_tile(dh0 + i_nh * K * V, b_dh, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)


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

# The state passes split K and V; BK x BV sets both the parallelism and the register-resident state.
state_configs = by_dtype(
    configs(({"BK": 64, "BV": 64}, 4, 1), ({"BK": 64, "BV": 64}, 4, 2), ({"BK": 32, "BV": 64}, 4, 2),
            ({"BK": 64, "BV": 32}, 4, 2), ({"BK": 32, "BV": 32}, 2, 2), ({"BK": 64, "BV": 64}, 8, 3)),
    configs(({"BK": 64, "BV": 64}, 8, 1), ({"BK": 32, "BV": 64}, 4, 1), ({"BK": 32, "BV": 32}, 4, 1)))
_KEY = ["H", "K", "V", "USE_G", "DOT_DTYPE"]


def _state_grid(K: int, V: int, NH: int):
    return lambda m: (triton.cdiv(K, m["BK"]), triton.cdiv(V, m["BV"]), NH)


@functools.lru_cache(maxsize=None)
def _state_tiles(K: int, V: int, dtype: torch.dtype) -> list:
    """The state configs for ``dtype`` with tiles clamped to the head dims (a 64-wide tile over a 16-wide head only
    wastes registers), duplicates dropped; cached so each shape keeps one list (and one autotuner)."""
    out, seen = [], set()
    for c in state_configs(dtype):
        meta = {"BK": min(c.kwargs["BK"], tile(K)), "BV": min(c.kwargs["BV"], tile(V))}
        key = (meta["BK"], meta["BV"], c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(meta, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


def _chunk_state_fwd(k, v, gc, h0, seqs: Seqs, store_final: bool):
    """-> chunk-start states ``h [NC, H, K, V]`` (compute dtype) and the final state ``[N, H, K, V]`` fp32 (or
    None)."""
    _, H, K = k.shape
    V = v.shape[-1]
    h = k.new_empty(seqs.NC, H, K, V, dtype=store_dtype(k.dtype))
    ht = k.new_empty(seqs.N, H, K, V, dtype=torch.float32) if store_final else None
    launch(_chunk_state_fwd_kernel, _state_grid(K, V, seqs.N * H), _state_tiles(K, V, k.dtype), _KEY,
           k=k, v=v, gc=gc, h=h, h0=h0, ht=ht, cu_seqlens=seqs.cu_seqlens, chunk_offsets=seqs.chunk_offsets,
           H=H, K=K, V=V, BT=seqs.BT, USE_G=gc is not None, USE_H0=h0 is not None, STORE_HT=store_final,
           **dot_config(k.dtype))
    return h, ht


def _chunk_state_bwd(q, do, gc, dht, scale: float, seqs: Seqs, store_dh0: bool):
    """-> ``dh [NC, H, K, V]`` (gradient of each chunk's end state, compute dtype) and ``dh0 [N, H, K, V]`` fp32
    (or None)."""
    _, H, K = q.shape
    V = do.shape[-1]
    dh = q.new_empty(seqs.NC, H, K, V, dtype=store_dtype(q.dtype))
    dh0 = q.new_empty(seqs.N, H, K, V, dtype=torch.float32) if store_dh0 else None
    launch(_chunk_state_bwd_kernel, _state_grid(K, V, seqs.N * H), _state_tiles(K, V, q.dtype), _KEY,
           q=q, do=do, gc=gc, dh=dh, dht=dht, dh0=dh0, cu_seqlens=seqs.cu_seqlens, chunk_offsets=seqs.chunk_offsets,
           scale=scale, H=H, K=K, V=V, BT=seqs.BT, USE_G=gc is not None, USE_DHT=dht is not None,
           STORE_DH0=store_dh0, **dot_config(q.dtype))
    return dh, dh0


def _fused_recurrent_fwd(q, k, v, g, h0, scale: float, seqs: Seqs, store_final: bool):
    _, H, K = q.shape
    V = v.shape[-1]
    BK, BV, num_warps = fused_tiles(K, V)
    o = torch.empty_like(v)
    ht = q.new_empty(seqs.N, H, K, V, dtype=torch.float32) if store_final else None
    launch(_fused_recurrent_fwd_kernel, lambda m: (triton.cdiv(V, BV), seqs.N * H), configs(({}, num_warps, 1)), [],
           q=q, k=k, v=v, g=g, o=o, h0=h0, ht=ht, cu_seqlens=seqs.cu_seqlens, scale=scale, H=H, K=K, V=V, BK=BK,
           BV=BV, USE_G=g is not None, USE_H0=h0 is not None, STORE_HT=store_final)
    return o, ht


def _fused_recurrent_bwd(q, k, v, g, do, h0, dht, scale: float, seqs: Seqs, store_dh0: bool):
    """-> dq, dk fp32 ``[T_all, H, K]``, dv ``[T_all, H, V]`` and dh0 (or None)."""
    T_all, H, K = q.shape
    V = v.shape[-1]
    BK, BV, num_warps = fused_tiles(K, V)
    NV = triton.cdiv(V, BV)
    dq = q.new_empty(NV, T_all, H, K, dtype=torch.float32)
    dk = q.new_empty(NV, T_all, H, K, dtype=torch.float32)
    dv = torch.empty_like(v)
    dh0 = q.new_empty(seqs.N, H, K, V, dtype=torch.float32) if store_dh0 else None
    launch(_fused_recurrent_bwd_kernel, lambda m: (NV, seqs.N * H), configs(({}, num_warps, 1)), [],
           q=q, k=k, v=v, g=g, do=do, dq=dq, dk=dk, dv=dv, h0=h0, dht=dht, dh0=dh0, cu_seqlens=seqs.cu_seqlens,
           scale=scale, T_all=T_all, H=H, K=K, V=V, BK=BK, BV=BV, USE_G=g is not None, USE_H0=h0 is not None,
           USE_DHT=dht is not None, STORE_DH0=store_dh0)
    return dq.sum(0), dk.sum(0), dv, dh0


# ---------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------


class _ChunkLinearAttentionFunction(torch.autograd.Function):
    """Chunked path on packed tensors: q, k ``[T_all, H, K]``, v ``[T_all, H, V]``, g ``[T_all, H]`` or None,
    initial_state ``[N, H, K, V]`` fp32 or None -> o ``[T_all, H, V]``, final state ``[N, H, K, V]`` or None."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, seqs, output_final_state):
        gc = chunk_local_cumsum(g, seqs) if g is not None else None
        # The final state is needed by dg even when the caller does not want it.
        store_final = output_final_state or g is not None
        h, ht = _chunk_state_fwd(k, v, gc, initial_state, seqs, store_final)
        o = chunk_output(q, k, v, gc, h, scale, seqs)
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
        gc = chunk_local_cumsum(g, seqs) if g is not None else None
        h, _ = _chunk_state_fwd(k, v, gc, initial_state, seqs, False)
        dh, dh0 = _chunk_state_bwd(q, do, gc, dht, scale, seqs, initial_state is not None)
        dv = chunk_dv(q, k, do, gc, dh, scale, seqs)
        dq, dk, _, dB = chunk_dqk(q, k, v, do, gc, h, dh, scale, seqs)
        dg = dg_from_terms(dB, ht, dht, seqs, g.dtype) if g is not None and ctx.needs_input_grad[3] else None
        return dq.to(q.dtype), dk.to(k.dtype), dv, dg, dh0, None, None, None


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
            dg = dg_from_terms(dB[None], ht, dht, seqs, g.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv, dg, dh0, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------


def _run(fn, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, seqs=None):
    refuse_float64("triton linear attention", q=q, k=k, v=v, g=g, initial_state=initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    if seqs is None:
        seqs = Seqs(B, T, cu_seqlens, q.device)
    v_dtype = v.dtype
    q, k, v = promote_qkv(q, k, v)
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
    seqs = Seqs(B, T, cu_seqlens, q.device)
    fused = seqs.max_len <= TRITON_FUSED_MAX_LEN
    fn = _FusedRecurrentLinearAttentionFunction if fused else _ChunkLinearAttentionFunction
    return _run(fn, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, seqs=seqs)
