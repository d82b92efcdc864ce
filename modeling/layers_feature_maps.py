"""Feature maps phi applied to queries and keys of an FWP layer, per head.

Every map takes ``[B, T, H, D]`` and returns ``[B, T, H, feature_dim(name, D)]``. Learned maps are built from
``nn.Linear`` (one per head, under stable names ``layers.<h>``) so that PEFT can target them.

| name           | phi(x)                                   | out dim | notes |
|----------------|------------------------------------------|---------|-------|
| identity       | x                                        | D       | Gated DeltaNet style (pair with L2 norm) |
| elu_plus_one   | elu(x) + 1                               | D       | Katharopoulos et al. linear transformer |
| relu           | relu(x)                                  | D       | |
| silu           | silu(x)                                  | D       | |
| dpfp           | DPFP with nu=1: relu([x, -x]) products   | 2D      | Schlag et al. deterministic projection |
| hedgehog       | softmax([xW, -xW]) over the features     | 2D      | learned; W starts at identity |
| t2r            | relu(xW + b)                             | D       | learned; W starts at identity, b at 0 |
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers_linear import single_row_on_cpu

FEATURE_MAPS = ("identity", "elu_plus_one", "relu", "silu", "dpfp", "hedgehog", "t2r")
LEARNED_FEATURE_MAPS = ("hedgehog", "t2r")


def feature_dim(name: str, head_dim: int) -> int:
    """Output size of the feature map ``name`` for inputs of size ``head_dim``."""
    return 2 * head_dim if name in ("dpfp", "hedgehog") else head_dim


class FeatureMap(nn.Module):
    """phi for one of :data:`FEATURE_MAPS`; learned maps hold one ``nn.Linear(D, D)`` per head."""

    def __init__(self, name: str, num_heads: int, head_dim: int):
        super().__init__()
        if name not in FEATURE_MAPS:
            raise ValueError(f"Unknown feature map {name!r}; choose one of {FEATURE_MAPS}.")
        self.name = name
        self.num_heads = num_heads
        self.head_dim = head_dim
        if name in LEARNED_FEATURE_MAPS:
            self.layers = nn.ModuleList(nn.Linear(head_dim, head_dim, bias=name == "t2r") for _ in range(num_heads))
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Learned maps start at W = I (b = 0): T2R then equals relu, Hedgehog softmax([x, -x])."""
        for layer in getattr(self, "layers", []):
            layer.weight.copy_(torch.eye(self.head_dim))
            if layer.bias is not None:
                layer.bias.zero_()

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
        """``y[..., h, :] = layers[h](x[..., h, :])``: one batched product over the heads when the layers are plain
        ``nn.Linear`` (a per-head loop costs 2 * H small matmuls per layer and token when decoding); the loop only
        when a layer is wrapped (e.g. by a PEFT adapter), so the wrapper's forward runs."""
        layers = self.layers
        if all(type(layer) is nn.Linear for layer in layers):
            B, T, H, D = x.shape
            if single_row_on_cpu(x[..., 0, :]):
                # One compiled decode row on CPU: a fused product-and-sum streams the weights faster than bmm.
                y = (self._stacked("weight") * x.reshape(H, 1, D)).sum(-1).view(B, T, H, -1)
                return y + self._stacked("bias") if layers[0].bias is not None else y
            # One bmm over the heads ([H, B*T, D] @ [H, D, out]): for a decoded token the reshapes are views, and
            # bmm costs a fraction of einsum's per-call overhead on CPU.
            y = torch.bmm(x.reshape(B * T, H, D).transpose(0, 1), self._stacked("weight").transpose(1, 2))
            y = y.transpose(0, 1).reshape(B, T, H, -1)
            if layers[0].bias is not None:
                y = y + self._stacked("bias")
            return y
        return torch.stack([layer(x[:, :, h]) for h, layer in enumerate(layers)], dim=2)

    def _stacked(self, name: str) -> torch.Tensor:
        """The heads' ``weight`` or ``bias`` stacked ``[H, ...]``. Without autograd (decoding) the stack is kept
        until a parameter moves or changes (its storage or version counter), not rebuilt for every token."""
        params = [getattr(layer, name) for layer in self.layers]
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return torch.stack(params)
        key = tuple((p.data_ptr(), p._version) for p in params)
        cache = self.__dict__.setdefault("_stack_cache", {})
        if name not in cache or cache[name][0] != key:
            cache[name] = (key, torch.stack(params))
        return cache[name][1]

    def extra_repr(self) -> str:
        return f"{self.name}, heads={self.num_heads}, head_dim={self.head_dim}"
