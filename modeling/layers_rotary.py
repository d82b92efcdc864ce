"""Rotary position embeddings, driven by transformers' ``rope_parameters`` (default, linear, dynamic, yarn, llama3...)."""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update


class RotaryEmbedding(nn.Module):
    """``forward(x, position_ids [B, T]) -> (cos, sin)`` each ``[B, T, head_dim]`` in x's dtype."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        if self.rope_type == "default":
            inv_freq, self.attention_scaling = self.default_parameters(config)
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def default_parameters(config, device=None, **kwargs):
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    # transformers' dynamic RoPE update calls this name to recompute default frequencies.
    compute_default_rope_parameters = default_parameters

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_dim: int = 1) -> torch.Tensor:
    """Rotate ``x`` by ``cos, sin [B, T, D]``; ``x`` is ``[B, heads, T, D]`` (``heads_dim=1``, softmax layers) or
    ``[B, T, heads, D]`` (``heads_dim=2``, the FWP layout)."""
    cos, sin = cos.unsqueeze(heads_dim), sin.unsqueeze(heads_dim)
    return x * cos + rotate_half(x) * sin
