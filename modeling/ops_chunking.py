"""Layout helpers for the pure-torch chunkwise-parallel path.

Inputs arrive as ``[B, T, H, D]``; the chunk path works one block of chunks at a time, chunk-major
``[nb, G, C, D]`` (nb chunks of C tokens, G = B * H heads), so that the sequential scan reads contiguous
``[G, ...]`` slices and every batched product is a plain 3-D ``bmm``. The tail is zero padded, which is exact:
a zero key writes nothing, a zero log-decay keeps the state and a zero beta skips the delta update.
"""

from __future__ import annotations

import torch


# Below this cumulative log-decay inside a chunk, exp(+-b) no longer fits float32 comfortably and the decay mask is
# built in log space instead of as an outer product (about 1e13 of headroom at -30).
FACTOR_LIMIT = -30.0


def block_decay(k: torch.Tensor, g: torch.Tensor | None, for_backward: bool):
    """Decay factors of one block of chunks, never exponentiating a positive number that could overflow.

    ``k [nb, G, C, K]``, ``g [nb, G, C]`` (chunked log-decay, or None for no decay). With ``b`` the within-chunk
    cumulative log-decay, returns ``(mask, gamma, tail, chunk, right)``:

    * ``gamma [nb, G, C]``: ``exp(b_t)``; ``tail``: ``exp(b_C - b_t)``; ``chunk [nb, G]``: ``exp(b_C)`` (None without
      decay);
    * ``mask``: the causal decay mask ``M[t, i] = exp(b_t - b_i)`` (``i <= t``, 0 above) as ``[nb, G, C, C]``, built
      in log space; without decay the ``[C, C]`` lower triangle of ones;
    * ``right``: the right operand of ``(.) right^T`` products.

    The mask enters only through ``A = Q K^T * M`` and ``L = K K^T * M``. When the block's decay is mild and no
    gradient is needed, ``mask`` is None and the decay is folded into the operands instead, ``right = k / Gamma``
    (the caller scales the left operand by ``Gamma``), which skips every [C, C] exp and mask pass. Without decay
    in the forward ``mask`` is None too (the caller applies the causal triangle).
    """
    C = k.shape[2]
    if g is None:
        mask = torch.ones(C, C, dtype=k.dtype, device=k.device).tril_() if for_backward else None
        return mask, None, None, None, k
    b = g.cumsum(-1)
    last = b[..., -1:]
    gamma, tail, chunk = b.exp(), (last - b).exp(), last[..., 0].exp()
    if not for_backward and last.min().item() >= FACTOR_LIMIT:
        return None, gamma, tail, chunk, k * (-b).exp()[..., None]
    causal = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
    # Mask the exponent (not the result): above the diagonal b_t - b_i > 0 and could overflow to inf.
    mask = (b[..., :, None] - b[..., None, :]).masked_fill_(~causal, float("-inf")).exp_()
    return mask, gamma, tail, chunk, k


def bmm_ng(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched matmul over leading ``[n, G]`` dims through one 3-D bmm (views, no copies for contiguous input)."""
    n, G = a.shape[:2]
    return torch.bmm(a.reshape(n * G, *a.shape[2:]), b.reshape(n * G, *b.shape[2:])).view(n, G, a.shape[2], b.shape[3])


def blocks(T: int, chunk_size: int, chunks_per_block: int):
    """``(first_chunk, num_chunks, first_token)`` for consecutive blocks of chunks covering T tokens.

    The chunk paths work one block at a time so that every intermediate stays small (cache resident, reused by
    the allocator); full-size ``[N, G, C, C]`` temporaries cost more in page faults than in arithmetic on CPU.
    """
    N = -(-T // chunk_size)
    for n0 in range(0, N, chunks_per_block):
        nb = min(chunks_per_block, N - n0)
        yield n0, nb, n0 * chunk_size


def gather_block(x: torch.Tensor | None, t0: int, nb: int, chunk_size: int, dtype: torch.dtype):
    """Tokens ``[t0, t0 + nb * C)`` of ``x [B, T, H, *]`` as a chunk-major ``[nb, B * H, C, *]`` block in ``dtype``
    (zero padded past T), written in one strided copy."""
    if x is None:
        return None
    B, T, H = x.shape[:3]
    feat = tuple(x.shape[3:])
    C = chunk_size
    out = torch.empty((nb, B, H, C) + feat, dtype=dtype, device=x.device)
    full = min(nb, (T - t0) // C)
    perm = (1, 0, 3, 2) + tuple(range(4, 4 + len(feat)))
    if full:
        out[:full].copy_(x[:, t0 : t0 + full * C].reshape((B, full, C, H) + feat).permute(perm))
    if full < nb:
        rem = T - (t0 + full * C)
        out[full:].zero_()
        out[full, :, :, :rem].copy_(x[:, t0 + full * C :].transpose(1, 2))
    return out.view((nb, B * H, C) + feat)


def scatter_block(out: torch.Tensor, y: torch.Tensor, t0: int) -> None:
    """Write a chunk-major block ``y [nb, B * H, C, *]`` back into ``out [B, T, H, *]`` at token ``t0``
    (dropping the padding past T, casting to ``out``'s dtype)."""
    B, T, H = out.shape[:3]
    feat = tuple(out.shape[3:])
    nb, _, C = y.shape[:3]
    y = y.view((nb, B, H, C) + feat)
    perm = (1, 0, 3, 2) + tuple(range(4, 4 + len(feat)))
    full = min(nb, (T - t0) // C)
    if full:
        out[:, t0 : t0 + full * C].view((B, full, C, H) + feat).copy_(y[:full].permute(perm))
    if full < nb:
        rem = T - (t0 + full * C)
        out[:, t0 + full * C :].copy_(y[full, :, :, :rem].transpose(1, 2))


def chunks_per_block(G: int, target: int = 64) -> int:
    """How many chunks one block holds so that it batches about ``target`` [C, C] matrices."""
    return max(1, target // max(G, 1))
