"""Layout helpers for the pure-torch chunkwise-parallel path.

Inputs arrive as ``[B, T, H, D]``; the chunk path works chunk-major on ``[N, G, C, D]`` (N chunks of C tokens,
G = B * H heads), so that the sequential scan over chunks reads contiguous ``[G, ...]`` slices and every batched
product is a plain 3-D ``bmm``. The tail is zero padded, which is exact: a zero key writes nothing, a zero
log-decay keeps the state and a zero beta skips the delta update.
"""

from __future__ import annotations

import torch


def to_chunks(x: torch.Tensor | None, chunk_size: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``[B, T, H, D]`` -> ``[N, B * H, C, D]`` and ``[B, T, H]`` -> ``[N, B * H, C]``, cast to ``dtype``."""
    if x is None:
        return None
    B, T, H = x.shape[:3]
    feat = tuple(x.shape[3:])
    N = -(-T // chunk_size)
    full = T // chunk_size
    # One strided copy per input, written straight into the padded chunk-major buffer (no separate pad).
    out = x.new_zeros((N, B, H, chunk_size) + feat, dtype=dtype)
    perm = (1, 0, 3, 2) + tuple(range(4, 4 + len(feat)))
    if full:
        out[:full] = x[:, : full * chunk_size].reshape((B, full, chunk_size, H) + feat).permute(perm)
    if full < N:
        rem = T - full * chunk_size
        out[full, :, :, :rem] = x[:, full * chunk_size :].transpose(1, 2)
    return out.reshape((N, B * H, chunk_size) + feat)


def from_chunks(o: torch.Tensor, B: int, T: int, dtype: torch.dtype) -> torch.Tensor:
    """``[N, B * H, C, V]`` -> ``[B, T, H, V]`` in ``dtype``, dropping the padded tail."""
    N, G, C, V = o.shape
    o = o.reshape(N, B, G // B, C, V).permute(1, 0, 3, 2, 4).reshape(B, N * C, G // B, V)
    return o[:, :T].to(dtype)


def causal_mask(chunk_size: int, device) -> torch.Tensor:
    """``[C, C]`` bool, True on and below the diagonal."""
    return torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=device).tril()


def decay_terms(g: torch.Tensor | None, chunk_size: int, device, dtype):
    """Decay factors of each chunk, built in log space so that strong decays never overflow.

    Given the chunked log-decay ``g [N, G, C]`` (or None for no decay) returns

    * ``mask [N, G, C, C]``: ``exp(b_t - b_i)`` for ``i <= t`` and 0 above the diagonal, where ``b`` is the
      within-chunk cumulative log-decay (without decay: the ``[C, C]`` lower triangle of ones);
    * ``gamma [N, G, C]``: ``exp(b_t)``, the decay from the chunk start to t (None without decay);
    * ``tail [N, G, C]``: ``exp(b_C - b_t)``, the decay from t to the chunk end (None without decay);
    * ``chunk [N, G]``: ``exp(b_C)``, the whole chunk's decay (None without decay).
    """
    causal = causal_mask(chunk_size, device)
    if g is None:
        return causal.to(dtype), None, None, None
    b = g.cumsum(-1)
    # Mask the exponent (not the result): above the diagonal b_t - b_i > 0 and could overflow to inf.
    mask = (b[..., :, None] - b[..., None, :]).masked_fill_(~causal, float("-inf")).exp_()
    last = b[..., -1:]
    return mask, b.exp(), (last - b).exp(), last[..., 0].exp()
