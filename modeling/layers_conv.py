"""Short causal depthwise convolution with a streaming state, for FWP layers' q/k/v."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ShortConvolution(nn.Conv1d):
    """Depthwise causal conv over time: ``[B, T, C] -> [B, T, C]``, optionally followed by SiLU.

    ``state`` holds the last ``kernel_size - 1`` inputs ``[B, C, W - 1]`` (zeros at the start of a sequence), so
    calling the layer on a sequence in pieces gives the same result as one call on the whole sequence.
    """

    def __init__(self, channels: int, kernel_size: int, activation: str | None = "silu", bias: bool = False):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias, padding=0)
        if activation not in (None, "silu"):
            raise ValueError(f"ShortConvolution activation must be None or 'silu', got {activation!r}.")
        self.activation = activation

    @torch.no_grad()
    def init_identity(self) -> None:
        """Make the conv the identity map (weight 1 on the current token), e.g. for converted models."""
        self.weight.zero_()
        self.weight[:, 0, -1] = 1.0
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(y [B, T, C], new_state [B, C, W - 1])``."""
        B, T, C = x.shape
        W = self.kernel_size[0]
        xt = x.transpose(1, 2)
        if state is None:
            state = xt.new_zeros(B, C, W - 1)
        full = torch.cat([state.to(xt.dtype), xt], dim=-1)
        y = F.conv1d(full, self.weight, self.bias, groups=C).transpose(1, 2)
        if self.activation == "silu":
            y = F.silu(y)
        return y, full[..., full.shape[-1] - (W - 1) :]
