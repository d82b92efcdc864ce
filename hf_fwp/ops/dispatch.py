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


def resolve_backend(backend: str, x: torch.Tensor, op: str) -> str:
    """Map ``"auto"`` to ``"triton"`` for CUDA tensors when Triton is importable, else ``"chunk"``."""
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "chunk"
    if backend == "triton" and not triton_available():
        raise ValueError(f"{op}: backend='triton' needs the `triton` package (Linux); use backend='chunk' instead.")
    return backend
