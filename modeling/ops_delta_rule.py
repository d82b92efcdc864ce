"""(Gated) delta rule: ``S_t = A_t + beta_t k_t (v_t - A_t^T k_t)^T`` with ``A_t = exp(g_t) S_{t-1}``."""

from __future__ import annotations

import torch

from .ops_delta_rule_reference import chunk_delta_rule, naive_delta_rule
from .ops_dispatch import TRITON_DELTA_MAX_K, TRITON_FUSED_MAX_LEN, floor_gate, resolve_backend
from .ops_utils import causal_nonfinite, check_chunk_size, check_flag, check_gate_values, check_inputs, check_scale

__all__ = ["delta_rule", "naive_delta_rule", "chunk_delta_rule"]


def delta_rule(
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
    backend: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal (gated) delta rule, the ``delta`` (DeltaNet) and ``gated_delta`` (Gated DeltaNet) FWP rules.

    Args:
        q, k: ``[B, T, H, K]`` (k is usually L2-normalised: the op does not normalise); v: ``[B, T, H, V]``.
        beta: writing strength ``[B, T, H]``, in (0, 1), or (0, 2) to allow negative eigenvalues.
        g: optional per-head log-decay ``[B, T, H]`` (entries <= 0; -inf, a hard reset, and anything below
            ``GATE_FLOOR`` = -80 act as -80, i.e. exp(g) ~ 1.8e-35); None means no decay. The torch backends
            refuse g > 0 and beta outside [0, 2] with a ValueError; the Triton backend does not read values to
            check them (that would sync the GPU once per call). NaN inputs give NaN from their token on, as the
            recurrence does.
        scale, initial_state, output_final_state, cu_seqlens, backend, chunk_size: as in
            :func:`hf_fwp.ops.linear_attention`.

    Returns:
        ``(o, S)``: o ``[B, T, H, V]`` in v's dtype and the float32 final state ``[B, H, K, V]`` or None.
    """
    if beta is None:
        raise ValueError("delta_rule: `beta` (writing strength [B, T, H]) is required; for no delta correction use "
                         "linear_attention.")
    check_inputs(q, k, v, beta, g, initial_state, cu_seqlens, backend, "delta_rule")
    check_chunk_size(chunk_size, "delta_rule")
    check_flag(output_final_state, "output_final_state", "delta_rule")
    scale = check_scale(scale, "delta_rule")
    kwargs = dict(g=floor_gate(g), scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens)
    requested = backend
    backend = resolve_backend(backend, q, "delta_rule")
    wide = q.shape[-1] > TRITON_DELTA_MAX_K and q.shape[1] > TRITON_FUSED_MAX_LEN
    if requested == "auto" and backend == "triton" and wide:
        backend = "chunk"  # the chunked Triton kernels hold at most 256 key columns per program
    if backend in ("naive", "chunk"):
        check_gate_values(beta, g, "delta_rule")
    if backend == "naive":
        return naive_delta_rule(q, k, v, beta, **kwargs)
    if backend == "chunk":
        def run(q, k, v, beta, g):
            return chunk_delta_rule(q, k, v, beta, chunk_size=chunk_size, **{**kwargs, "g": g})

        return causal_nonfinite(run, q, k, v, beta, kwargs["g"], output_final_state, cu_seqlens)
    from .ops_delta_rule_triton import triton_delta_rule

    return triton_delta_rule(q, k, v, beta, **kwargs)
