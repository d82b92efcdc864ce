"""Hybrid layers with one shared normaliser (LoLCATs): the FWP reads only tokens that left the softmax window."""

import pytest
import torch
import torch.nn.functional as F

from hf_fwp import FWPConfig
from hf_fwp.modeling.layers_fwp_attention import FWPAttention
from tests.modeling.helpers import rel_err, tiny_model
from tests.modeling.test_compiled_generation import assert_static_and_compiled_give_the_eager_tokens

SHARED = dict(layout="lolcats", rule="linear", feature_map="hedgehog", qk_l2norm=False, normalize_attention=True,
              use_output_norm=False, use_short_conv=False, hybrid_combine="shared_normalizer")


def reference_layer(layer: FWPAttention, x: torch.Tensor) -> torch.Tensor:
    """The layer's definition written out token pair by token pair (no chunking, no delay buffer, no blocks):
    query i sees keys j in (i - w, i] through softmax and keys j <= i - w through the feature maps, whose weights
    decay by the gates of tokens j + 1 .. i - w (a write waits w tokens before it enters the state)."""
    B, T, _ = x.shape
    H, Hkv, D, w = layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.softmax.window
    q, k, v = layer.project(x)
    k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)  # fwp_state_heads="query"
    fq, fk = layer.feature_map_q(q), layer.feature_map_k(k)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * D**-0.5
    lin = torch.einsum("bihd,bjhd->bhij", fq, fk) * layer.feat_dim**-0.5
    if hasattr(layer, "a_proj"):
        g = -layer.A_log.exp() * F.softplus(layer.a_proj(x) + layer.dt_bias)  # [B, T, H]
        cg = F.pad(g.cumsum(1), (0, 0, 1, 0))  # cg[t] = g_1 + ... + g_t (1-based), cg[0] = 0
        i = torch.arange(T)[:, None]
        upto = (i - w + 1).clamp_min(0)  # the gates of tokens j + 1 .. i - w
        decay = (cg[:, upto.expand(T, T).flatten()].view(B, T, T, H) - cg[:, 1:][:, None]).clamp_max(0)
        lin = lin * decay.permute(0, 3, 1, 2).exp()
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    s = s.masked_fill(~((j <= i) & (j > i - w)), float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    lin = lin.masked_fill(~(j <= i - w), 0.0)
    lam = torch.sigmoid(layer.mix_logit)[:, None, None]
    weights = (1 - lam) * p + lam * lin
    y = torch.einsum("bhij,bjhd->bihd", weights / weights.sum(-1, keepdim=True), v)
    return layer.o_proj(y.reshape(B, T, H * D))


@pytest.mark.parametrize("rule", ["linear", "gated_linear"])
@pytest.mark.parametrize("T", [3, 11, 16])
def test_layer_matches_its_pairwise_definition(rule, T):
    torch.manual_seed(0)
    config = FWPConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                       layer_types=["hybrid_sliding"], sliding_window=4, position_embedding_type="none",
                       fwp_rule=rule, fwp_state_heads="query", **{k: v for k, v in SHARED.items()
                                                                   if k not in ("layout", "rule")})
    layer = FWPAttention(config, 0, hybrid=True).double()
    with torch.no_grad():
        for p in layer.parameters():  # everything non-trivial: learned maps, gates and the mix away from init
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, T, 32, dtype=torch.float64)
    # Gates are computed in float32 by design (the rest runs in float64 here): 1e-6 is float32's share.
    tol = 1e-6 if rule == "gated_linear" else 1e-9
    torch.testing.assert_close(layer(x), reference_layer(layer, x), rtol=tol, atol=tol)


@pytest.mark.parametrize("state_heads", ["query", "kv"])
@pytest.mark.parametrize("rule", ["linear", "gated_linear"])
def test_decoding_and_chunked_prefill_match_the_full_forward(rule, state_heads):
    model = tiny_model(fwp_state_heads=state_heads, **{**SHARED, "rule": rule})
    ids = torch.randint(3, 64, (2, 15))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :6], use_cache=True)  # prefill, then 2-token chunks and single tokens past the window
        logits, cache = [out.logits], out.cache
        for a, b in [(6, 8), (8, 9), (9, 10), (10, 13), (13, 14), (14, 15)]:
            out = model(ids[:, a:b], cache=cache, use_cache=True)
            logits.append(out.logits)
    assert rel_err(torch.cat(logits, 1), full) < 1e-5


def test_left_padded_rows_generate_what_they_generate_alone():
    model = tiny_model(fwp_state_heads="kv", **SHARED)
    long, short = torch.randint(3, 64, (1, 9)), torch.randint(3, 64, (1, 5))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)])
    mask = (torch.arange(9)[None] >= torch.tensor([[0], [4]])).long()
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        alone = [model.generate(r, max_new_tokens=8, min_new_tokens=8, do_sample=False) for r in (long, short)]
    assert torch.equal(both[0], alone[0][0]) and torch.equal(both[1, 4:], alone[1][0])


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_static_cache_and_compiled_decoding_give_the_eager_tokens(backend):
    # fullgraph=True: the delayed writes' buffer must be traceable without a host sync, left padding included.
    torch._dynamo.reset()
    assert_static_and_compiled_give_the_eager_tokens(tiny_model(fwp_state_heads="kv", **SHARED), backend, 10)


def test_the_delayed_writes_live_in_the_cache_with_a_constant_size():
    model = tiny_model(fwp_state_heads="kv", **SHARED)
    with torch.no_grad():
        cache = model(torch.randint(3, 64, (1, 3)), use_cache=True).cache
        layer = cache.layers[0]
        waiting = layer.recurrent_states[1]
        # [B, window, state heads, key features + value + its ones column]
        assert waiting.shape == (1, 4, 2, 2 * 8 + 8 + 1)
        assert waiting[:, :1].abs().sum() == 0 and waiting[:, 1:].abs().sum() > 0  # 3 tokens of 4 slots
        model(torch.randint(3, 64, (1, 20)), cache=cache, use_cache=True)
        assert layer.recurrent_states[1] is waiting  # updated in place (static address)


def test_gradients_reach_the_mix_and_the_feature_maps():
    model = tiny_model(**SHARED).train()
    ids = torch.randint(3, 64, (2, 12))
    model(ids, labels=ids).loss.backward()
    layer = model.model.layers[0].self_attn
    assert layer.mix_logit.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in layer.feature_map_k.parameters())


@pytest.mark.parametrize("options, message", [
    (dict(layout="fwp"), "layer_types has none"),
    (dict(normalize_attention=False), "set normalize_attention=True"),
    (dict(use_output_norm=True), "use_output_norm=False"),
    (dict(hybrid_combine="shared"), "unknown hybrid_combine 'shared'"),
])
def test_config_refuses_what_the_shared_normaliser_cannot_do(options, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**{**SHARED, **options})
