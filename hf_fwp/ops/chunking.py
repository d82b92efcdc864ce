"""Layout helpers for the pure-torch chunkwise-parallel path.

Inputs arrive as ``[B, T, H, D]``; the chunk path works on ``[B, H, N, C, D]`` (N chunks of C tokens), right
padded with zeros. Zero padding is exact: a zero key writes nothing, a zero log-decay keeps the state and a
zero beta skips the delta update, so the final state is unchanged by the padded tail.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_chunks(x: torch.Tensor | None, chunk_size: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``[B, T, H, D]`` -> ``[B, H, N, C, D]`` and ``[B, T, H]`` -> ``[B, H, N, C]``, cast to ``dtype``."""
    if x is None:
        return None
    T = x.shape[1]
    pad = (-T) % chunk_size
    x = x.to(dtype).transpose(1, 2)
    if x.dim() == 4:
        x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(x.shape[0], x.shape[1], -1, chunk_size, x.shape[-1])
    x = F.pad(x, (0, pad))
    return x.reshape(x.shape[0], x.shape[1], -1, chunk_size)


def from_chunks(o: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, H, N, C, V]`` -> ``[B, T, H, V]`` in ``dtype``, dropping the padded tail."""
    B, H, N, C, V = o.shape
    return o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2).to(dtype)


def decay_terms(g: torch.Tensor | None, chunk_size: int, device, dtype):
    """Decay factors of a chunk, built in log space so that strong decays never overflow.

    Given the chunked log-decay ``g [B, H, N, C]`` (or None for no decay) returns

    * ``mask [.., C, C]``: ``exp(b_t - b_i)`` for ``i <= t`` and 0 above the diagonal, where ``b`` is the
      within-chunk cumulative log-decay (an all-ones lower triangle without decay);
    * ``gamma [.., C]``: ``exp(b_t)``, the decay from the chunk start to t (None without decay);
    * ``tail [.., C]``: ``exp(b_C - b_t)``, the decay from t to the chunk end (None without decay);
    * ``chunk_log [..]``: ``b_C``, the whole chunk's log-decay (None without decay).
    """
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=device).tril()
    if g is None:
        return causal.to(dtype), None, None, None
    b = g.cumsum(-1)
    # Mask the exponent (not the result): above the diagonal b_t - b_i > 0 and could overflow to inf.
    diff = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf"))
    return diff.exp(), b.exp(), (b[..., -1:] - b).exp(), b[..., -1]
