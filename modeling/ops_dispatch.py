"""Backend resolution shared by the public ops."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports (it ships for Linux only); says nothing about a GPU being present."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


# Up to this many tokens the CPU path runs the token recurrence: decoding steps and short prompts cost a few small
# ops that way, against a full padded chunk for the chunk path.
RECURRENT_MAX_LEN = 16


def resolve_backend(backend: str, x: torch.Tensor, op: str) -> str:
    """Map ``"auto"`` to ``"triton"`` for CUDA tensors when Triton is importable; elsewhere to ``"naive"`` (the
    token recurrence) for ``T <= RECURRENT_MAX_LEN`` and ``"chunk"`` otherwise. ``x`` is q ``[B, T, H, K]``."""
    if backend == "auto":
        if x.is_cuda and triton_available():
            return "triton"
        return "naive" if x.shape[1] <= RECURRENT_MAX_LEN else "chunk"
    if backend == "triton" and not triton_available():
        raise ValueError(f"{op}: backend='triton' needs the `triton` package (Linux); use backend='chunk' instead.")
    return backend


# Sequences up to this long run the Triton ops' fused recurrent kernels (any head dim), longer ones the chunked ones.
TRITON_FUSED_MAX_LEN = 64

# The Triton delta rule's sequential passes hold the key dim as at most 4 register tiles of 64; wider keys take the
# pure-torch chunk path under backend="auto".
TRITON_DELTA_MAX_K = 256


# Log-decays below this act as a hard reset: exp(-80) ~ 1.8e-35 wipes any fp32 state, while chunked backends still
# take differences of within-chunk cumulative sums exactly (-inf there gives inf - inf = NaN, and -1e4 loses
# every digit of the decays that follow). Every backend clamps g here, so all of them agree.
GATE_FLOOR = -80.0


def floor_gate(g):
    """``g`` with entries below :data:`GATE_FLOOR` (including -inf) raised to it; None stays None."""
    return None if g is None else g.clamp_min(GATE_FLOOR)
