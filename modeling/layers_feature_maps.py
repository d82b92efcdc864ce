"""Feature maps phi applied to queries and keys of an FWP layer, per head.

Every map takes ``[B, T, H, D]`` and returns ``[B, T, H, feature_dim(name, D, width)]``. Learned maps hold their
heads' weights stacked in one parameter, ``weight [H, width, D]`` (``nn.Linear``'s order per head; ``width``
defaults to ``D``) and, for T2R, ``bias [H, width]``: two tensors per map instead of one per head, because a
compiled decode step checks and passes every parameter on every token (on SmolLM2-135M, 12 per-head tensors per
layer cost about 1.5 ms of an 18 ms token).
PEFT targets them as parameters (``LoraConfig(target_parameters=["feature_map_q.weight", ...])``, one LoRA per
head). State dicts of the earlier per-head layout (``layers.<h>.weight``) still load through ``load_state_dict``.

| name           | phi(x)                                   | out dim | notes |
|----------------|------------------------------------------|---------|-------|
| identity       | x                                        | D       | Gated DeltaNet style (pair with L2 norm) |
| elu_plus_one   | elu(x) + 1                               | D       | Katharopoulos et al. linear transformer |
| relu           | relu(x)                                  | D       | |
| silu           | silu(x)                                  | D       | |
| dpfp           | DPFP with nu=1: relu([x, -x]) products   | 2D      | Schlag et al. deterministic projection |
| hedgehog       | softmax([xW, -xW]) over the features     | 2 width | learned; W starts at identity |
| t2r            | relu(xW + b)                             | width   | learned; W starts at identity, b at 0 |

A learned map wider than its input (``width > D``, ``FWPConfig.feature_map_dim``) starts with the identity in its
first ``D`` rows and random orthogonal blocks below (identical copies would get identical gradients and stay
copies); a narrower one starts as the projection on the first ``width`` coordinates.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers_linear import single_row_on_cpu

FEATURE_MAPS = ("identity", "elu_plus_one", "relu", "silu", "dpfp", "hedgehog", "t2r")
LEARNED_FEATURE_MAPS = ("hedgehog", "t2r")


def feature_dim(name: str, head_dim: int, width: int | None = None) -> int:
    """Output size of the feature map ``name`` for inputs of size ``head_dim`` (``width``: a learned map's
    projection size, default ``head_dim``; fixed maps ignore it)."""
    if name in LEARNED_FEATURE_MAPS and width is not None:
        head_dim = width
    return 2 * head_dim if name in ("dpfp", "hedgehog") else head_dim


class FeatureMap(nn.Module):
    """phi for one of :data:`FEATURE_MAPS`; learned maps hold ``weight [H, width, D]`` (and ``bias [H, width]`` for
    T2R), ``width`` defaulting to ``D``."""

    def __init__(self, name: str, num_heads: int, head_dim: int, width: int | None = None):
        super().__init__()
        if name not in FEATURE_MAPS:
            raise ValueError(f"Unknown feature map {name!r}; choose one of {FEATURE_MAPS}.")
        if width is not None and (name not in LEARNED_FEATURE_MAPS or width < 1):
            raise ValueError(f"width {width!r} needs a learned feature map {LEARNED_FEATURE_MAPS} and a size >= 1; "
                             f"{name!r} has none (leave width None).")
        self.name = name
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.width = width or head_dim
        if name in LEARNED_FEATURE_MAPS:
            self.weight = nn.Parameter(torch.empty(num_heads, self.width, head_dim))
            self.bias = nn.Parameter(torch.empty(num_heads, self.width)) if name == "t2r" else None
            self.register_load_state_dict_pre_hook(_stack_per_head_keys)
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Learned maps start at W = I (b = 0): T2R then equals relu, Hedgehog softmax([x, -x]). Wider maps add
        random orthogonal blocks below the identity (see the module docstring)."""
        if self.name in LEARNED_FEATURE_MAPS:
            D, m = self.head_dim, self.width
            self.weight[:, :D].copy_(torch.eye(D)[:m])
            if m > D:
                for h in range(self.num_heads):
                    nn.init.orthogonal_(self.weight[h, D:])
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "identity":
            return x
        if self.name == "elu_plus_one":
            return F.elu(x) + 1.0
        if self.name == "relu":
            return F.relu(x)
        if self.name == "silu":
            return F.silu(x)
        if self.name == "dpfp":
            r = F.relu(torch.cat([x, -x], dim=-1))
            # nu = 1: elementwise products of the features with their neighbours (rolled by one).
            return r * r.roll(shifts=1, dims=-1)
        y = self._per_head_linear(x)
        if self.name == "t2r":
            return F.relu(y)
        return torch.softmax(torch.cat([y, -y], dim=-1).float(), dim=-1).to(x.dtype)

    def _per_head_linear(self, x: torch.Tensor) -> torch.Tensor:
        """``y[..., h, :] = weight[h] @ x[..., h, :] (+ bias[h])`` for ``x [B, T, H, D]``."""
        B, T, H, D = x.shape
        if single_row_on_cpu(x[..., 0, :]):
            # One compiled decode row on CPU: a fused product-and-sum streams the weights faster than bmm.
            y = (self.weight * x.reshape(H, 1, D)).sum(-1).view(B, T, H, -1)
        else:
            # One bmm over the heads ([H, B*T, D] @ [H, D, out]): for a decoded token the reshapes are views, and
            # bmm costs a fraction of einsum's per-call overhead on CPU.
            y = torch.bmm(x.reshape(B * T, H, D).transpose(0, 1), self.weight.transpose(1, 2))
            y = y.transpose(0, 1).reshape(B, T, H, -1)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        width = f", width={self.width}" if self.width != self.head_dim else ""
        return f"{self.name}, heads={self.num_heads}, head_dim={self.head_dim}{width}"


def _stack_per_head_keys(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: ``layers.<h>.weight`` / ``layers.<h>.bias`` (one ``nn.Linear`` per head, the layout
    before the heads were stacked) -> ``weight [H, D, D]`` / ``bias [H, D]``. Keys of missing heads are left for
    ``load_state_dict`` to report."""
    for leaf in ("weight", "bias"):
        keys = [f"{prefix}layers.{h}.{leaf}" for h in range(module.num_heads)]
        if f"{prefix}{leaf}" not in state_dict and all(k in state_dict for k in keys):
            state_dict[f"{prefix}{leaf}"] = torch.stack([state_dict.pop(k) for k in keys])
