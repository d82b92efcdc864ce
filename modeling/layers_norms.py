"""Normalisation layers: RMSNorm, its SiLU-gated variant for FWP outputs, and a backbone norm factory."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32 (the Llama formulation: weight * x / rms(x))."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(RMSNorm):
    """``RMSNorm(x) * silu(gate)``: the per-head output norm of Gated DeltaNet-style FWP layers."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        y = super().forward(x)
        return y if gate is None else y * F.silu(gate.to(y.dtype))


def build_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    """``"rms"`` -> :class:`RMSNorm`, ``"layer"`` -> ``nn.LayerNorm`` (with bias, as GPT-2)."""
    if norm_type == "rms":
        return RMSNorm(dim, eps)
    if norm_type == "layer":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"Unknown norm_type {norm_type!r}; use 'rms' or 'layer'.")
