"""(Gated) linear attention: ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)``."""

from __future__ import annotations

import torch

from .ops_dispatch import floor_gate, resolve_backend
from .ops_linear_attn_reference import chunk_linear_attention, naive_linear_attention
from .ops_utils import causal_nonfinite, check_chunk_size, check_flag, check_gate_values, check_inputs, check_scale

__all__ = ["linear_attention", "naive_linear_attention", "chunk_linear_attention"]


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal (gated) linear attention, the ``linear`` and ``gated_linear`` FWP rules.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: optional per-head log-decay ``[B, T, H]`` (entries <= 0; -inf, a hard reset, and anything below
            ``GATE_FLOOR`` = -80 act as -80, i.e. exp(g) ~ 1.8e-35); None means no decay. The torch backends
            refuse g > 0 with a ValueError; the Triton backend does not read values to check them (that would
            sync the GPU once per call). NaN inputs give NaN from their token on, as the recurrence does.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` float32 (``[N, H, K, V]`` with ``cu_seqlens``).
        output_final_state: also return the state after the last token.
        cu_seqlens: optional ``[N + 1]`` int offsets of N sequences packed along T (then B must be 1).
        backend: ``"naive"`` (token loop), ``"chunk"`` (chunkwise torch), ``"triton"`` or ``"auto"``
            (triton for CUDA tensors; on CPU the token loop for T <= 16, i.e. decoding, and chunk otherwise).
        chunk_size: chunk length of the ``"chunk"`` backend.

    Returns:
        ``(o, S)``: o ``[B, T, H, V]`` in v's dtype and the float32 final state ``[B, H, K, V]`` or None.
    """
    check_inputs(q, k, v, None, g, initial_state, cu_seqlens, backend, "linear_attention")
    check_chunk_size(chunk_size, "linear_attention")
    check_flag(output_final_state, "output_final_state", "linear_attention")
    scale = check_scale(scale, "linear_attention")
    kwargs = dict(g=floor_gate(g), scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens)
    backend = resolve_backend(backend, q, "linear_attention")
    if backend in ("naive", "chunk"):
        check_gate_values(None, g, "linear_attention")
    if backend == "naive":
        return naive_linear_attention(q, k, v, **kwargs)
    if backend == "chunk":
        def run(q, k, v, beta, g):
            return chunk_linear_attention(q, k, v, chunk_size=chunk_size, **{**kwargs, "g": g})

        return causal_nonfinite(run, q, k, v, None, kwargs["g"], output_final_state, cu_seqlens)
    from .ops_linear_attn_triton import triton_linear_attention

    return triton_linear_attention(q, k, v, **kwargs)
