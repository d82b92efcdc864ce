"""The decoding step as one Triton kernel per layer (twin: :func:`hf_fwp.modeling.ops_step_reference.torch_fwp_step`).

Grid ``(cdiv(V, BV), B * Hs)`` over the ``Hs`` state heads: each program holds the whole key extent and BV value
columns of one head's fp32 state in registers (``BK * BV <= 2048`` values), reads k, v, beta and g once,
optionally L2-normalises k and q, applies decay and the rule's write, writes its state block back in place, and
reads it out for the G = H / Hs query heads that share it (G = 1 unless states are shared by grouped queries). Decoding is
memory-bound (the state is read and written once per token), so small value blocks buy parallelism at batch 1.

It is registered as the custom op ``hf_fwp::fwp_step`` (``hf_fwp::fwp_step_<hash>`` in a remote-code copy) (``state`` declared mutated), so ``torch.compile`` keeps
it as one opaque node instead of tracing the launcher, and CUDA graphs can capture it: one fixed config (no
autotuning), no host sync, no allocation but the output.
"""

from __future__ import annotations

import hashlib

import torch
# In a try block: transformers' remote-code loader treats imports outside one as required packages, and Triton
# (Linux only) is optional; the dispatchers import this module only when Triton imports.
try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - platforms without Triton
    raise ImportError("the Triton kernels need the `triton` package (Linux); use backend='chunk'.") from error

from .ops_triton_common import SCALAR_CONFIGS, launch

# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def fwp_step_kernel(q, k, v, beta, g, s, o, scale, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, G: tl.constexpr, USE_BETA: tl.constexpr, USE_G: tl.constexpr,
                    L2NORM: tl.constexpr):
    # One program per (value block, batch * state head): it writes the state once, then its G queries read it.
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    b_k = tl.load(k + i_nh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + i_nh * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    if L2NORM:
        b_k = b_k / tl.maximum(tl.sqrt(tl.sum(b_k * b_k)), 1e-6)
    p_s = s + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    b_s = tl.load(p_s, mask=m_s, other=0.0)
    if USE_G:
        b_s = b_s * tl.exp(tl.load(g + i_nh).to(tl.float32))
    if USE_BETA:
        b_u = (b_v - tl.sum(b_k[:, None] * b_s, axis=0)) * tl.load(beta + i_nh).to(tl.float32)
    else:
        b_u = b_v
    b_s = b_s + b_k[:, None] * b_u[None, :]
    tl.store(p_s, b_s, mask=m_s)
    for j in tl.static_range(G):
        i_q = i_nh * G + j
        b_q = tl.load(q + i_q * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        if L2NORM:
            b_q = b_q / tl.maximum(tl.sqrt(tl.sum(b_q * b_q)), 1e-6)
        b_o = tl.sum(b_q[:, None] * b_s, axis=0) * scale
        tl.store(o + i_q * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------


def step_tiles(K: int, V: int) -> tuple[int, int]:
    """``(BK, BV)``: the whole key extent, and value blocks small enough for registers (at most 2048 fp32 values
    a program) and many programs per head at batch 1."""
    BK = triton.next_power_of_2(K)
    return BK, max(1, min(triton.next_power_of_2(V), 8, 2048 // BK))


def launch_step(q, k, v, beta, g, state, o, scale: float, qk_l2norm: bool) -> None:
    B, _, H, K = q.shape
    Hs, V = k.shape[2], v.shape[-1]
    BK, BV = step_tiles(K, V)
    launch(fwp_step_kernel, lambda meta: (triton.cdiv(V, BV), B * Hs), SCALAR_CONFIGS, key=[],
           q=q, k=k, v=v, beta=state if beta is None else beta, g=state if g is None else g, s=state, o=o,
           scale=scale, K=K, V=V, BK=BK, BV=BV, G=H // Hs, USE_BETA=beta is not None, USE_G=g is not None,
           L2NORM=qk_l2norm)


# ---------------------------------------------------------------------------------------------------------
# Custom op (what torch.compile and CUDA graphs see)
# ---------------------------------------------------------------------------------------------------------


# A model folder loaded with trust_remote_code runs its own copy of this module next to an installed hf-fwp; each
# copy registers its own op name (an op name can be registered once per process).
_OP_NAME = "hf_fwp::fwp_step" if __name__ == "hf_fwp.modeling.ops_step_triton" else (
    "hf_fwp::fwp_step_" + hashlib.sha1(__name__.encode()).hexdigest()[:16])


@torch.library.custom_op(_OP_NAME, mutates_args=("state",))
def _fwp_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor | None,
                 g: torch.Tensor | None, state: torch.Tensor, scale: float, qk_l2norm: bool) -> torch.Tensor:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    beta = None if beta is None else beta.contiguous()
    g = None if g is None else g.contiguous()
    o = v.new_empty(q.shape[:3] + v.shape[-1:])  # [B, 1, H, V]: one output per query head
    launch_step(q, k, v, beta, g, state, o, scale, qk_l2norm)
    return o


@_fwp_step_op.register_fake
def _(q, k, v, beta, g, state, scale, qk_l2norm):
    return v.new_empty(q.shape[:3] + v.shape[-1:])


# ---------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------


def triton_fwp_step(q, k, v, state, *, beta=None, g=None, scale: float, qk_l2norm: bool = False) -> torch.Tensor:
    """:func:`hf_fwp.modeling.ops_step.fwp_step` on the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``);
    inputs validated by the caller. No autograd: decoding runs without gradients."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, beta, g, state)):
        raise ValueError("fwp_step: the Triton step has no backward; run decoding under torch.no_grad() or use "
                         "backend='torch'.")
    return _fwp_step_op(q, k, v, beta, g, state, scale, qk_l2norm)
