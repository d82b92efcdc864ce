"""One decoding step of any FWP rule with the state updated in place (:func:`fwp_step`).

Generation calls it for every FWP layer and token, so it is built for that: no allocation of the state's size,
no host sync, no autotuning (safe inside CUDA graphs and ``torch.compile(fullgraph=True)``), and on CUDA a single
Triton kernel per layer that also L2-normalises q and k.
"""

from __future__ import annotations

import torch

from .ops_dispatch import floor_gate, triton_available
from .ops_step_reference import torch_fwp_step
from .ops_utils import check_scale

__all__ = ["fwp_step", "torch_fwp_step"]


def fwp_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    *,
    beta: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    qk_l2norm: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """One token of the rule given by ``beta`` (delta rules when given) and ``g`` (gated rules when given).

    Args:
        q: ``[B, 1, H, K]``; k: ``[B, 1, Hs, K]``; v: ``[B, 1, Hs, V]``; beta, g: ``[B, 1, Hs]`` or None (g <= 0 is
            a log-decay). ``Hs`` state heads, usually ``H``; with ``H = G * Hs`` the G query heads ``j*G ..
            j*G+G-1`` read state ``j`` (states shared like grouped-query attention shares keys and values).
        state: ``[B, Hs, K, V]`` contiguous float32 (float64 is accepted for reference checks; the Triton kernel
            takes float32 only), **updated in place** (e.g. a cache layer's fixed buffer), so it must not require
            grad. Values are not checked (a per-token check would cost a sync): g > 0 or beta outside [0, 2]
            give what the recurrence gives, as NaN inputs do.
        scale: query scale, default ``K ** -0.5``.
        qk_l2norm: L2-normalise q and k inside the step (fused into the Triton kernel).
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (triton for CUDA tensors when it imports).

    Returns:
        o ``[B, 1, H, V]`` in v's dtype.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("state", state), ("beta", beta), ("g", g)):
        if not isinstance(t, torch.Tensor) and (t is not None or name not in ("beta", "g")):
            raise ValueError(f"fwp_step: `{name}` must be a torch.Tensor; got {type(t).__name__}.")
        if name in ("beta", "g") and t is not None and not t.is_floating_point():
            raise ValueError(f"fwp_step: `{name}` must be a floating tensor; got dtype {t.dtype}.")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"fwp_step: q, k and v must be 4-D [B, 1, heads, dim]; got {q.dim()}-D, {k.dim()}-D and "
                         f"{v.dim()}-D tensors.")
    if not (q.is_floating_point() and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"fwp_step: q, k and v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
    B, T, H, K = q.shape
    Hs = k.shape[2]
    if T != 1 or k.shape != (B, 1, Hs, K) or Hs < 1 or H % Hs or v.shape[:3] != (B, 1, Hs):
        raise ValueError(
            f"fwp_step: q must be [B, 1, H, K], k [B, 1, Hs, K] and v [B, 1, Hs, V] (one token; H a multiple of Hs); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}. Use linear_attention / delta_rule for "
            "sequences."
        )
    if state.shape != (B, Hs, K, v.shape[-1]) or state.dtype not in (torch.float32, torch.float64) or not state.is_contiguous():
        raise ValueError(
            f"fwp_step: `state` must be a contiguous float32 [B, Hs, K, V] = {(B, Hs, K, v.shape[-1])} tensor (it is "
            f"updated in place); got shape {tuple(state.shape)}, dtype {state.dtype}, contiguous={state.is_contiguous()}."
        )
    if state.requires_grad:
        raise ValueError("fwp_step: `state` requires grad, but it is updated in place; pass a state that does not "
                         "(e.g. state.detach()), and use linear_attention / delta_rule to train through a sequence.")
    for name, t in (("beta", beta), ("g", g)):
        if t is not None and tuple(t.shape) != (B, 1, Hs):
            raise ValueError(f"fwp_step: `{name}` must be [B, 1, Hs] = {(B, 1, Hs)}; got {tuple(t.shape)}.")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"fwp_step: backend={backend!r} is not one of ('auto', 'torch', 'triton').")
    scale = check_scale(scale, "fwp_step")
    scale = K**-0.5 if scale is None else scale
    if backend == "auto":
        backend = "triton" if state.is_cuda and state.dtype == torch.float32 and triton_available() else "torch"
    g = floor_gate(g)  # as the sequence ops do, so that a hard reset (-inf) decodes as it prefills
    if backend == "torch":
        return torch_fwp_step(q, k, v, state, beta=beta, g=g, scale=scale, qk_l2norm=qk_l2norm)
    from .ops_step_triton import triton_fwp_step

    return triton_fwp_step(q, k, v, state, beta=beta, g=g, scale=scale, qk_l2norm=qk_l2norm)
