"""Softmax attention layers (full or sliding window) with the transformers 5.x KV cache."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers_linear import Linear
from .layers_norms import RMSNorm
from .layers_rotary import apply_rotary


def attention_allowed(B: int, T: int, L: int, *, past, kv_offset, window: int | None,
                      key_mask: torch.Tensor | None, device) -> torch.Tensor:
    """Which keys each query may see: bool ``[B or 1, 1, T, L]`` for SDPA.

    Query t is the token at absolute position ``past + t``; key j is the token at ``kv_offset + j`` (what a cache
    layer's ``get_mask_sizes`` reports before its update: a dynamic cache returns the last keys, a static one its
    whole buffer, whose slots past the current token are excluded by causality). ``window`` w lets a query see
    keys in ``(pos - w, pos]``. ``key_mask`` ``[B, past + T]`` marks real (1) vs padding (0) tokens by absolute
    position. ``past`` and ``kv_offset`` may be ints or 0-dim tensors (static caches count in tensors).
    """
    q_pos = torch.arange(T, device=device)[:, None] + past
    k_pos = torch.arange(L, device=device)[None, :] + kv_offset
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    allowed = allowed[None]
    if key_mask is not None:
        # Slots beyond the current token (static buffers) are already excluded; clamp to index the mask.
        real = key_mask.bool().gather(1, k_pos.clamp(0, key_mask.shape[1] - 1).expand(B, L))
        # A padding query would see no key at all (softmax of nothing is NaN): let every query see itself.
        allowed = (allowed & real[:, None, :]) | (k_pos == q_pos)[None]
    return allowed[:, None]


def softmax_attention(q, k, v, *, past: int, window: int | None, key_mask: torch.Tensor | None,
                      kv_offset: int | None = None, mask: torch.Tensor | None = None, dropout: float = 0.0,
                      with_mass: bool = False):
    """Causal softmax attention over cached keys.

    q ``[B, Hq, T, D]`` are the tokens at positions ``past .. past + T - 1``; k, v ``[B, Hkv, L, D]`` are the
    tokens from position ``kv_offset`` on (default ``past + T - L``: the last L tokens, as a dynamic cache returns
    them). ``key_mask`` ``[B, past + T]`` marks real (1) vs padding (0) tokens; ``window`` w lets query t see keys in
    ``(t - w, t]``. ``mask``, when given, is a ready bool ``[B, 1, T, L]`` mask (built outside a compiled decode
    step by :func:`attention_allowed`) and replaces all of that. Returns ``[B, T, Hq, D]``.

    ``with_mass=True`` also returns each query's softmax mass relative to its largest score,
    ``sum_j exp(s_j - max_j s_j)`` ``[B, T, Hq]`` (float32, in ``[1, L]``): what a hybrid layer with a shared
    normaliser (LoLCATs) weighs the window against the FWP branch with. SDPA does not report it, so that path
    computes the scores itself (same masks, no dropout).
    """
    B, Hq, T, D = q.shape
    L = k.shape[2]
    sdpa = dict(dropout_p=dropout, enable_gqa=Hq != k.shape[1])  # grouped heads without copying k and v
    attend = _attention_with_mass if with_mass else (
        lambda q, k, v, allowed: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, **sdpa))
    if mask is not None:
        return _heads_second(attend(q, k, v, mask))
    last_keys = kv_offset is None or kv_offset + L == past + T
    if kv_offset is None:
        kv_offset = past + T - L
    if key_mask is None and last_keys and ((window is None and L == T) or (T == 1 and (window is None or L <= window))):
        # Plain causal attention over the last keys, or a decoded token that sees all of them: no mask to build.
        if not with_mass:
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, **sdpa).transpose(1, 2)
        allowed = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
        return _heads_second(attend(q, k, v, allowed))
    if window is not None and T > window and L - T < window and last_keys:
        key_mask = None if key_mask is None else key_mask[:, -L:]
        return _banded_attention(q, k, v, window=window, key_mask=key_mask, attend=attend)
    allowed = attention_allowed(B, T, L, past=past, kv_offset=kv_offset, window=window, key_mask=key_mask,
                                device=q.device)
    return _heads_second(attend(q, k, v, allowed))


def _heads_second(out):
    """``[B, H, T, D]`` (and mass ``[B, H, T]``) -> ``[B, T, H, D]`` (and ``[B, T, H]``)."""
    if isinstance(out, tuple):
        return out[0].transpose(1, 2), out[1].transpose(1, 2)
    return out.transpose(1, 2)


def _attention_with_mass(q, k, v, allowed):
    """Masked softmax attention that also returns the mass of each query's weights relative to its largest one.

    q ``[..., Hq, T, D]``, k, v ``[..., Hkv, L, D]`` (query head h reads key/value head ``h // (Hq // Hkv)``, as
    SDPA's ``enable_gqa``), ``allowed`` bool, broadcastable to ``[..., 1, T, L]`` (every query sees at least one
    key). Returns ``o [..., Hq, T, D]`` (q's dtype) and ``mass [..., Hq, T]`` (float32, or float64 for float64 q).
    """
    Hq, T, D = q.shape[-3:]
    Hkv = k.shape[-3]
    dt = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dt).unflatten(-3, (Hkv, Hq // Hkv))  # [..., Hkv, G, T, D]
    s = (qg @ k.to(dt).unsqueeze(-3).transpose(-1, -2)) * D**-0.5  # [..., Hkv, G, T, L]
    s = s.masked_fill(~allowed.unsqueeze(-3), float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    mass = p.sum(-1)
    o = (p @ v.to(dt).unsqueeze(-3)) / mass[..., None]
    return o.flatten(-4, -3).to(q.dtype), mass.flatten(-3, -2)


def _banded_attention(q, k, v, *, window: int, key_mask: torch.Tensor | None, attend):
    """Sliding-window attention in blocks of ``window`` queries: block b sees only the 2 * window keys that end
    with it, so the cost is O(T * window) instead of O(T * L) for a masked full product.

    Shapes as in :func:`softmax_attention` (grouped-query k/v heads are read in place by SDPA's ``enable_gqa``, not
    copied per query head); the last T of the L keys belong to the queries and the ``L - T < window`` before them
    are cached. Query i of a block and key j of its key block (which starts ``window`` positions before the query
    block) are allowed when ``i < j <= i + window``. ``attend(q, k, v, allowed)`` attends one batch of blocks
    (SDPA, or :func:`_attention_with_mass`, whose mass comes back ``[B, T, H]``).
    """
    B, H, T, D = q.shape
    L, w = k.shape[2], window
    off = L - T  # cached keys before the first query
    NB = -(-T // w)
    # Key j of block b is key index off + b*w + j - w: pad w on the left, enough on the right for the last block.
    right = NB * w + w - (L + w - off)

    def blocks(x, fill=0.0):
        x = F.pad(x, (0, 0, w - off, max(right, 0)), value=fill)  # now index 0 <-> key index off - w
        # [B, NB, Hkv, 2w, D]: heads third from last, where SDPA's enable_gqa pairs them with the query heads.
        return x.unfold(2, 2 * w, w).transpose(-1, -2)[:, :, :NB].transpose(1, 2)

    qb = F.pad(q, (0, 0, 0, NB * w - T)).view(B, H, NB, w, D).transpose(1, 2)  # [B, NB, H, w, D]
    i = torch.arange(w, device=q.device)[:, None]
    j = torch.arange(2 * w, device=q.device)[None, :]
    key_idx = off + torch.arange(NB, device=q.device)[:, None, None] * w + j[None] - w  # [NB, 1, 2w]
    allowed = ((j > i) & (j <= i + w))[None] & (key_idx >= 0) & (key_idx < L)  # [NB, w, 2w]
    allowed = allowed[None].expand(B, NB, w, 2 * w)
    if key_mask is not None:
        km = F.pad(key_mask.bool()[:, None, :, None], (0, 0, w - off, max(right, 0)), value=False)
        km = km.unfold(2, 2 * w, w)[:, 0, :NB, 0]  # [B, NB, 2w]
        # A padding query would see no key at all (softmax of nothing is NaN): let every query see itself.
        allowed = (allowed & km[:, :, None, :]) | (j == i + w)[None, None]
    # Blocks join the batch: 4-D inputs take SDPA's flash kernel on CPU (5-D ones fell back to its math path,
    # 2.6x slower at 4k tokens).
    out = attend(qb.flatten(0, 1), blocks(k).flatten(0, 1), blocks(v).flatten(0, 1),
                 allowed.reshape(B * NB, 1, w, 2 * w))
    o, mass = out if isinstance(out, tuple) else (out, None)
    o = o.view(B, NB, H, w, D).transpose(2, 3).reshape(B, NB * w, H, D)[:, :T]  # -> [B, T, H, D]
    return o if mass is None else (o, mass.view(B, NB, H, w).transpose(2, 3).reshape(B, NB * w, H)[:, :T])


class QKVProjections(nn.Module):
    """q/k/v/o projections with Llama names (what converters and LoRA target) and optional q/k RMSNorm (Qwen3)."""

    def __init__(self, config):
        super().__init__()
        H, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, D
        self.q_proj = Linear(config.hidden_size, H * D, bias=config.attention_bias)
        self.k_proj = Linear(config.hidden_size, Hkv * D, bias=config.attention_bias)
        self.v_proj = Linear(config.hidden_size, Hkv * D, bias=config.attention_bias)
        self.o_proj = Linear(H * D, config.hidden_size, bias=config.attention_output_bias)

    def project(self, x: torch.Tensor):
        """``x [B, T, hidden]`` -> q ``[B, T, H, D]``, k, v ``[B, T, Hkv, D]``."""
        B, T, _ = x.shape
        return (self.q_proj(x).view(B, T, self.num_heads, self.head_dim),
                self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim),
                self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim))


class SoftmaxBranch(nn.Module):
    """The softmax part of a layer: q/k norm, RoPE, the KV cache and attention (shared by softmax and hybrid)."""

    def __init__(self, config, layer_idx: int, window: int | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = window
        self.dropout = config.attention_dropout
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, q, k, v, *, position_embeddings, cache, past, key_mask, mask=None, with_mass=False):
        """q ``[B, T, H, D]``, k, v ``[B, T, Hkv, D]`` -> ``[B, T, H, D]`` (and the mass ``[B, T, H]`` with
        ``with_mass``, see :func:`softmax_attention`). ``key_mask`` ``[B, past + T]`` or None; ``mask`` a ready 4-D
        mask for the keys the cache returns (then ``past`` and ``key_mask`` are unused)."""
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        kv_offset = None
        if cache is not None:
            if mask is None:
                # Where the returned keys start: static caches return whole buffers, sliding ones the window.
                kv_offset = cache.get_mask_sizes(q.shape[2], self.layer_idx)[1]
            k, v = cache.update(k, v, self.layer_idx)
        return softmax_attention(q, k, v, past=past, window=self.window, key_mask=key_mask, kv_offset=kv_offset,
                                 mask=mask, dropout=self.dropout if self.training else 0.0, with_mass=with_mass)


class SoftmaxAttention(QKVProjections):
    """Full (``window=None``) or sliding-window softmax attention layer."""

    def __init__(self, config, layer_idx: int, window: int | None = None):
        super().__init__(config)
        self.layer_idx = layer_idx
        self.softmax = SoftmaxBranch(config, layer_idx, window)

    def forward(self, x, *, position_embeddings=None, cache=None, past: int = 0, attention_mask=None, mask=None):
        """``x [B, T, hidden]``; ``attention_mask [B, past + T]`` (1 = token, 0 = padding) or None; ``mask`` a
        ready 4-D mask (see :meth:`SoftmaxBranch.forward`)."""
        B, T, _ = x.shape
        q, k, v = self.project(x)
        o = self.softmax(q, k, v, position_embeddings=position_embeddings, cache=cache, past=past,
                         key_mask=attention_mask, mask=mask)
        return self.o_proj(o.reshape(B, T, -1))
