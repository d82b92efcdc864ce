"""The FWP layer: projections, short conv, feature maps, beta / decay gates, the FWP op, output norm and gate.

One class for every rule (``config.fwp_rule``); with ``hybrid=True`` the same q/k/v also feed a sliding-window
softmax branch, joined to the FWP per head by a mix or by one shared normaliser (``config.hybrid_combine``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers_conv import ShortConvolution
from .layers_feature_maps import FeatureMap, feature_dim
from .layers_linear import Linear
from .layers_norms import GatedRMSNorm
from .layers_rotary import apply_rotary
from .layers_softmax_attention import QKVProjections, SoftmaxBranch
from .ops_delta_rule import delta_rule
from .ops_linear_attn import linear_attention
from .ops_step import fwp_step


def _expand_heads(t: torch.Tensor, G: int) -> torch.Tensor:
    """``[B, T, h, ...]`` -> ``[B, T, h * G, ...]``, head j repeated G times in place (head i reads head i // G)."""
    B, T, h = t.shape[:3]
    return t[:, :, :, None].expand(B, T, h, G, *t.shape[3:]).reshape(B, T, h * G, *t.shape[3:])


def read_fwp_state(cache, layer_idx: int):
    """``(recurrent state, conv state)`` of an FWP layer from a transformers linear-attention cache layer (None when
    the layer has not written yet). Reads the layer directly: ``Cache.get_recurrent_state`` only reports states
    once a conv state was written through ``update_conv_state``."""
    if cache is None:
        return None, None
    layer = cache.layers[layer_idx]
    S = layer.recurrent_states[0] if layer.is_recurrent_states_initialized[0] else None
    conv = layer.conv_states[0] if layer.is_conv_states_initialized[0] else None
    return S, conv


def read_write_delay(cache, layer_idx: int, writes: torch.Tensor, window: int) -> torch.Tensor:
    """The FWP writes a shared-normaliser hybrid layer applies now: each token's write waits ``window`` tokens.

    ``writes [B, T, Hs, F]`` (float32, or float64) are the new tokens' packed writes; the cache (state 1 of the
    layer, a fixed ``[B, window, Hs, F]`` buffer updated in place) holds the last ``window`` tokens' writes, zeros
    (no-op writes) before the first. Returns ``[B, T, Hs, F]``: the writes of the tokens ``window`` positions
    before the new ones.
    """
    B, T, Hs, F_ = writes.shape
    layer = None if cache is None else cache.layers[layer_idx]
    if layer is not None and getattr(layer, "number_of_states", 1) < 2:
        raise ValueError("This cache has one state per layer, but shared-normaliser hybrid layers need two (their "
                         "delayed FWP writes): build it from the model's config (FWPCache(config), "
                         "DynamicCache(config=config) or StaticCache(config=config, ...)).")
    if layer is not None and layer.is_recurrent_states_initialized[1]:
        waiting = layer.recurrent_states[1]
    else:
        waiting = writes.new_zeros(B, window, Hs, F_)
    seq = torch.cat([waiting, writes], dim=1)
    if layer is not None:
        if not layer.is_recurrent_states_initialized[1]:
            layer.lazy_initialization(recurrent_states=waiting, state_idx=1)
        layer.recurrent_states[1].copy_(seq[:, T:].detach())
    return seq[:, :T]


def write_fwp_state(cache, layer_idx: int, S: torch.Tensor | None, conv: torch.Tensor | None) -> None:
    """Store the new states in place (static addresses, as transformers' linear-attention layers expect); S None
    means the state was already updated in its buffer."""
    layer = cache.layers[layer_idx]
    if conv is not None:
        if not layer.is_conv_states_initialized[0]:
            layer.lazy_initialization(conv_states=conv)
        layer.conv_states[0].copy_(conv.detach())
    if S is None:
        return
    if not layer.is_recurrent_states_initialized[0]:
        layer.lazy_initialization(recurrent_states=S)
    layer.recurrent_states[0].copy_(S.detach())


class FWPAttention(QKVProjections):
    """An FWP (fast weight programmer) attention layer, ``[B, T, hidden] -> [B, T, hidden]``.

    Module names are stable (LoRA / converter targets): ``q_proj k_proj v_proj o_proj`` (Llama layout),
    ``conv`` (short conv over [q | k | v]), ``feature_map_q`` / ``feature_map_k``, ``b_proj`` (beta),
    ``a_proj`` + ``A_log`` + ``dt_bias`` (decay gate), ``o_norm``, ``g_proj`` (output gate),
    ``mix_logit`` and ``softmax`` (hybrid layers).
    """

    def __init__(self, config, layer_idx: int, hybrid: bool = False):
        super().__init__(config)
        self.config = config
        self.layer_idx = layer_idx
        self.rule = config.fwp_rule
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        # Heads that own a fast-weight state (and its key map, beta and gate): every query head, or each kv head.
        self.state_heads = Hs = Hkv if config.fwp_state_heads == "kv" else H
        self.feat_dim = feature_dim(config.feature_map, D, config.feature_map_dim)
        if config.use_short_conv:
            self.conv = ShortConvolution((H + 2 * Hkv) * D, config.conv_size, config.conv_activation)
        width = config.feature_map_dim
        self.feature_map_q = FeatureMap(config.feature_map, H, D, width)
        self.feature_map_k = (self.feature_map_q if config.share_feature_map
                              else FeatureMap(config.feature_map, Hs, D, width))
        if config.fwp_delta:
            self.b_proj = Linear(config.hidden_size, Hs, bias=True)
        if config.fwp_gated:
            self.a_proj = Linear(config.hidden_size, Hs, bias=False)
            self.A_log = nn.Parameter(torch.zeros(Hs))
            self.dt_bias = nn.Parameter(torch.zeros(Hs))
        if config.use_output_norm:
            self.o_norm = GatedRMSNorm(D, config.rms_norm_eps)
        if config.use_output_gate:
            self.g_proj = Linear(config.hidden_size, H * D, bias=False)
        # Shared-normaliser hybrids: the FWP reads only tokens older than the window, weighed with softmax's mass.
        self.shared_normalizer = hybrid and config.hybrid_combine == "shared_normalizer"
        if hybrid:
            self.softmax = SoftmaxBranch(config, layer_idx, config.layer_window("hybrid_sliding"))
            self.mix_logit = nn.Parameter(torch.zeros(H))
        self.reset_fwp_parameters()

    @torch.no_grad()
    def reset_fwp_parameters(self) -> None:
        """Initialise what a pretrained softmax layer does not have (documented defaults):

        * beta: ``b_proj`` weight 0 and bias 0, so beta starts at 0.5 (1.0 with negative eigenvalues allowed);
        * decay: ``a_proj`` weight 0 and, through ``A_log`` and ``dt_bias``, ``config.decay_init``: Mamba2's
          ``A ~ U(1, 16)``, ``dt ~ logU(1e-3, 1e-1)`` (per-head decays between about exp(-1.6) and exp(-1e-3) per
          token), or ``"slow"``: ``A = 1``, ``dt ~ logU(1e-4, 1e-2)`` (between exp(-1e-2) and exp(-1e-4));
        * learned feature maps: identity (see ``FeatureMap.reset_parameters``);
        * hybrid mixing: lambda = ``config.hybrid_mix_init`` for every head (small: start close to the softmax window).
        """
        H = self.state_heads
        if hasattr(self, "b_proj"):
            self.b_proj.weight.zero_()
            self.b_proj.bias.zero_()
        if hasattr(self, "a_proj"):
            self.a_proj.weight.zero_()
            if self.config.decay_init == "slow":
                self.A_log.zero_()
                dt = torch.exp(torch.empty(H).uniform_(math.log(1e-4), math.log(1e-2)))
            else:
                self.A_log.copy_(torch.empty(H).uniform_(1.0, 16.0).log())
                dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)))
            self.start_decays(dt)
        if hasattr(self, "mix_logit"):
            p = self.config.hybrid_mix_init
            self.mix_logit.fill_(math.log(p / (1 - p)))
        self.feature_map_q.reset_parameters()
        self.feature_map_k.reset_parameters()

    @torch.no_grad()
    def start_decays(self, dt: torch.Tensor) -> None:
        """Set ``dt_bias [Hs]`` so that ``softplus(dt_bias) = dt`` (with ``a_proj`` at 0: log-decay ``-A * dt``)."""
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, x, *, position_embeddings=None, cache=None, past: int = 0, attention_mask=None, mask=None):
        """``x [B, T, hidden]``; ``attention_mask [B, past + T]`` (1 = token, 0 = padding) or None; ``mask`` a ready
        4-D mask for the softmax branch of a hybrid layer (see :meth:`SoftmaxBranch.forward`).

        Padding tokens never touch the state: their q/k/v are zeroed before the conv and their k, v, beta and
        log-decay after it, so a padded row computes exactly what the row computes alone.

        Under autocast (bf16 mixed precision) only the q/k/v projections run in the autocast dtype; the rest of the
        layer (conv, feature maps, gates, the FWP and its normaliser, the softmax branch, ``o_proj``) runs in
        float32. In bf16 the converted layer trained to a far worse fit: on SmolLM2, 20 steps of attention transfer
        left a summed per-layer error of 80.3 against 42.1 in float32, and 42.2 with this split
        (benchmarks/results/recipe_experiments.md).
        """
        q, k, v = self.project(x)
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                pe = None if position_embeddings is None else tuple(t.float() for t in position_embeddings)
                mask = mask.float() if mask is not None and mask.is_floating_point() else mask
                return self._after_projections(x.float(), q.float(), k.float(), v.float(), pe, cache, past,
                                               attention_mask, mask)
        return self._after_projections(x, q, k, v, position_embeddings, cache, past, attention_mask, mask)

    def _after_projections(self, x, q, k, v, position_embeddings, cache, past, attention_mask, mask):
        """:meth:`forward` from the projected ``q [B, T, H, D]``, ``k``, ``v [B, T, Hkv, D]`` on."""
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        mods = self._modules  # membership here costs far less than hasattr, which raises for a missing module
        pad = None if attention_mask is None else attention_mask[:, -T:].to(x.dtype)
        S0, conv0 = read_fwp_state(cache, self.layer_idx)
        fq, fk, fv, conv_state = self._features(q, k, v, position_embeddings, pad, conv0)
        Hs = self.state_heads
        # Decoding: one token into the cached state, updated in place by a single fused step (no state copies).
        step = T == 1 and S0 is not None and not torch.is_grad_enabled()
        # The step L2-normalises inside its kernel, except where the keys are written a window later.
        norm_in_step = step and not self.shared_normalizer
        if self.config.qk_l2norm and not norm_in_step:
            fq, fk = F.normalize(fq, dim=-1, eps=1e-6), F.normalize(fk, dim=-1, eps=1e-6)
        beta, g = self._gates(x)
        if self.config.normalize_attention:
            fv = F.pad(fv, (0, 1), value=1.0)  # the denominator's column of ones
        if pad is not None:
            fk, fv = fk * pad[..., None, None], fv * pad[..., None, None]
            beta = None if beta is None else beta * pad[..., None]
            g = None if g is None else g * pad[..., None]
        if self.shared_normalizer:
            fk, fv, g = self._delayed(fk, fv, g, cache)
        scale = self.config.fwp_scale if self.config.fwp_scale is not None else self.feat_dim**-0.5
        if step:
            # The step has torch and Triton backends: the sequence ops' torch paths (naive, chunk) map to torch.
            backend = {"naive": "torch", "chunk": "torch"}.get(self.config.fwp_backend, self.config.fwp_backend)
            o, S = fwp_step(fq, fk, fv, S0, beta=beta, g=g, scale=scale,
                            qk_l2norm=self.config.qk_l2norm and norm_in_step, backend=backend), None
        else:
            G = H // Hs
            if G > 1:
                # The sequence ops pair each query head with its own state: give every query head a copy of its
                # group's inputs (identical writes keep the copies identical) and keep one copy of the state.
                fk, fv, beta, g = (None if t is None else _expand_heads(t, G) for t in (fk, fv, beta, g))
                S0 = None if S0 is None else S0.repeat_interleave(G, dim=1)
            kwargs = dict(g=g, scale=scale, initial_state=S0, output_final_state=cache is not None,
                          backend=self.config.fwp_backend, chunk_size=self.config.chunk_size)
            if beta is None:
                o, S = linear_attention(fq, fk, fv, **kwargs)
            else:
                o, S = delta_rule(fq, fk, fv, beta.to(fq.dtype), **kwargs)
            if G > 1 and S is not None:
                S = S[:, ::G].contiguous()
        if self.config.normalize_attention and not self.shared_normalizer:
            o = o[..., :D] / o[..., D:].clamp_min(1e-6)
        if "o_norm" in mods:
            gate = self.g_proj(x).view(B, T, H, D) if "g_proj" in mods else None
            o = self.o_norm(o, gate)
        if cache is not None:
            write_fwp_state(cache, self.layer_idx, S, conv_state)
        if self.shared_normalizer:
            o_soft, mass = self.softmax(q, k, v, position_embeddings=position_embeddings, cache=cache, past=past,
                                        key_mask=attention_mask, mask=mask, with_mass=True)
            lam = torch.sigmoid(self.mix_logit.to(mass.dtype))
            w_soft = (1 - lam) * mass  # [B, T, H]; >= 1 - lam > 0, so the division below is safe
            num = w_soft[..., None] * o_soft.to(mass.dtype) + lam[:, None] * o[..., :D].to(mass.dtype)
            o = (num / (w_soft + lam * o[..., D].to(mass.dtype))[..., None]).to(x.dtype)
        elif "softmax" in mods:
            o_soft = self.softmax(q, k, v, position_embeddings=position_embeddings, cache=cache, past=past,
                                  key_mask=attention_mask, mask=mask)
            o = torch.lerp(o_soft, o, torch.sigmoid(self.mix_logit).to(o.dtype)[:, None])  # (1 - lam) soft + lam fwp
        return self.o_proj(o.reshape(B, T, H * D))

    def _features(self, q, k, v, position_embeddings, pad, conv0):
        """The conv (padding zeroed first), RoPE if configured, kv heads expanded to the state heads, and the
        feature maps: ``fq [B, T, H, K]``, ``fk [B, T, Hs, K]``, ``fv [B, T, Hs, D]`` and the conv's new state."""
        B, T = q.shape[:2]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        conv_state = None
        if "conv" in self._modules:
            qkv = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)
            if pad is not None:
                qkv = qkv * pad[..., None]
            qkv, conv_state = self.conv(qkv, conv0)
            qf, kf, vf = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            fq, fk, fv = qf.view(B, T, H, D), kf.view(B, T, Hkv, D), vf.view(B, T, Hkv, D)
        else:
            fq, fk, fv = q, k, v
        if self.config.fwp_rotary:
            cos, sin = position_embeddings
            fq, fk = apply_rotary(fq, cos, sin, heads_dim=2), apply_rotary(fk, cos, sin, heads_dim=2)
        if Hkv != self.state_heads:
            # State head h reads kv head h // G: one expanded copy each (cheaper than repeat_interleave).
            fk, fv = (_expand_heads(t, self.state_heads // Hkv) for t in (fk, fv))
        return self.feature_map_q(fq), self.feature_map_k(fk), fv, conv_state

    def _gates(self, x):
        """``beta [B, T, Hs]`` (delta rules) and the log-decay ``g [B, T, Hs]`` (gated rules), float32, or None."""
        beta = g = None
        if "b_proj" in self._modules:
            beta = torch.sigmoid(self.b_proj(x).float()) * (2.0 if self.config.allow_neg_eigval else 1.0)
        if "a_proj" in self._modules:
            g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        return beta, g

    def attention_weights(self, x, *, position_embeddings=None) -> torch.Tensor:
        """The attention matrix this layer's FWP applies to its (conv'd) values, ``[B, H, T, T]`` (float32 or
        wider), rows summing to 1: ``phi(q_t) . phi(k_s) * exp(g_{s+1} + ... + g_t)`` for ``s <= t``, normalised per
        row. It is what the recurrence computes, written out (quadratic in ``T``: for attention transfer on short
        blocks).
        ``x [B, T, hidden]`` unpadded. Only for ``linear_attention`` layers of normalised linear rules
        (``normalize_attention``; no delta rule, whose writes are not a weighted sum of values)."""
        if not self.config.normalize_attention or "b_proj" in self._modules or "softmax" in self._modules:
            raise ValueError("attention_weights needs a linear_attention layer of a normalised linear rule "
                             "(normalize_attention=True, fwp_rule 'linear' or 'gated_linear').")
        q, k, v = self.project(x)
        dt = torch.promote_types(x.dtype, torch.float32)  # float32 under autocast, as in forward()
        with torch.autocast(x.device.type, enabled=False):
            pe = None if position_embeddings is None else tuple(t.to(dt) for t in position_embeddings)
            fq, fk, _, _ = self._features(q.to(dt), k.to(dt), v.to(dt), pe, None, None)
            if self.config.qk_l2norm:
                fq, fk = F.normalize(fq, dim=-1, eps=1e-6), F.normalize(fk, dim=-1, eps=1e-6)
            _, g = self._gates(x.to(dt))
            G = self.num_heads // self.state_heads
            if G > 1:  # each query head reads its state head's keys and decays, as in forward()
                fk, g = (None if t is None else _expand_heads(t, G) for t in (fk, g))
            scores = torch.einsum("bthk,bshk->bhts", fq, fk)
            T = x.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            if g is None:
                scores = scores * causal
            else:
                c = g.to(dt).cumsum(1).transpose(1, 2)  # [B, H, T]
                log_decay = (c[..., :, None] - c[..., None, :]).masked_fill(~causal, float("-inf"))
                scores = scores * log_decay.exp()
            return scores / scores.sum(-1, keepdim=True).clamp_min(1e-12)

    def _delayed(self, fk, fv, g, cache):
        """Shared-normaliser hybrids: the FWP writes of the tokens ``window`` positions back (zeros before the
        first token), so that at token t the state holds tokens ``<= t - window`` and the softmax window the rest.
        ``fk [B, T, Hs, K]``, ``fv [B, T, Hs, V + 1]``, ``g [B, T, Hs]`` or None -> the same shapes."""
        K, V1 = fk.shape[-1], fv.shape[-1]
        dt = torch.promote_types(fk.dtype, torch.float32)  # bf16 writes wait exactly, float64 ones too (tests)
        parts = [fk.to(dt), fv.to(dt)] + ([] if g is None else [g.to(dt)[..., None]])
        d = read_write_delay(cache, self.layer_idx, torch.cat(parts, dim=-1), self.softmax.window)
        return (d[..., :K].to(fk.dtype), d[..., K:K + V1].to(fv.dtype),
                None if g is None else d[..., K + V1].to(g.dtype))
