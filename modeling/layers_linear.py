"""``Linear``: ``nn.Linear`` with a decode path that streams its weight at memory speed on CPU.

At batch 1 a decoded token multiplies one row by every weight matrix of the model, so a CPU decode step is bound by
how fast the weights stream from memory. PyTorch's CPU ``linear`` of a single row (a BLAS gemv) measured
15.8 GB/s on this project's 2-core machine, one core's worth, against 42.8 GB/s for the same product written as
an elementwise product and a row sum that ``torch.compile`` turns into one vectorised, multi-threaded reduction
(a 49152 x 576 matrix, SmolLM2's LM head: 6.9 ms against 2.6 ms). Compiled decoding of SmolLM2-135M went from 37
to 19 ms per token with it. Eager calls, several rows and other devices keep ``nn.Linear``'s own path (eagerly the
product would be materialised).

It is an ``nn.Linear`` (same parameters, state-dict keys and ``isinstance``), so converters, PEFT and LoRA
(whose wrapper calls this layer as its base) see the usual module.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def single_row_on_cpu(x: torch.Tensor) -> bool:
    """Whether a compiled graph is computing one row ``x [..., in]`` on the CPU (where the reduction form wins)."""
    return torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.shape[-1]


class Linear(nn.Linear):
    """``nn.Linear``; compiled on CPU with a single input row, ``y = (W * x).sum(-1) + b`` (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not single_row_on_cpu(x):
            return F.linear(x, self.weight, self.bias)
        y = (self.weight * x.reshape(1, -1).to(self.weight.dtype)).sum(-1)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], -1)
