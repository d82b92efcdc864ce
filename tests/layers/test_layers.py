"""Layer building blocks: feature maps, short convolution streaming, norms."""

import pytest
import torch
import torch.nn.functional as F

from hf_fwp.modeling.layers_conv import ShortConvolution
from hf_fwp.modeling.layers_feature_maps import FEATURE_MAPS, FeatureMap, feature_dim
from hf_fwp.modeling.layers_norms import GatedRMSNorm, RMSNorm, build_norm


@pytest.mark.parametrize("name", FEATURE_MAPS)
def test_feature_maps_shapes_and_signs(name):
    fm = FeatureMap(name, num_heads=3, head_dim=8)
    x = torch.randn(2, 5, 3, 8)
    y = fm(x)
    assert y.shape == (2, 5, 3, feature_dim(name, 8))
    if name in ("elu_plus_one", "relu", "dpfp", "hedgehog", "t2r"):
        assert (y >= 0).all()
    if name == "hedgehog":
        torch.testing.assert_close(y.sum(-1), torch.ones(2, 5, 3))


def test_learned_maps_start_at_identity_and_are_per_head():
    t2r = FeatureMap("t2r", num_heads=2, head_dim=4)
    x = torch.randn(1, 3, 2, 4)
    torch.testing.assert_close(t2r(x), torch.relu(x))
    with torch.no_grad():
        t2r.weight[1].mul_(2.0)
    y = t2r(x)
    torch.testing.assert_close(y[:, :, 0], torch.relu(x[:, :, 0]))
    torch.testing.assert_close(y[:, :, 1], torch.relu(2 * x[:, :, 1]))
    hh = FeatureMap("hedgehog", num_heads=2, head_dim=4)
    torch.testing.assert_close(hh(x), torch.softmax(torch.cat([x, -x], -1), -1))


@pytest.mark.parametrize("name, width", [("hedgehog", 10), ("hedgehog", 3), ("t2r", 12)])
def test_learned_maps_of_another_width_start_at_the_identity_and_wider_rows_are_distinct(name, width):
    torch.manual_seed(0)
    fm = FeatureMap(name, num_heads=2, head_dim=4, width=width)
    assert fm.weight.shape == (2, width, 4) and "width=" in repr(fm)
    x = torch.randn(1, 3, 2, 4)
    y = fm(x)
    assert y.shape == (1, 3, 2, feature_dim(name, 4, width))
    torch.testing.assert_close(fm.weight[:, : min(width, 4)], torch.eye(4)[: min(width, 4)].expand(2, -1, -1))
    for h in range(2) if width > 4 else ():
        extra = fm.weight[h, 4:]  # orthonormal columns (more rows than columns), unlike a copy of the identity
        torch.testing.assert_close(extra.T @ extra, torch.eye(4), atol=1e-5, rtol=0)
        assert not torch.allclose(extra[:4], torch.eye(4), atol=1e-2)
    assert width <= 4 or not torch.equal(fm.weight[0, 4:], fm.weight[1, 4:])  # each head its own
    if name == "t2r":
        assert fm.bias.shape == (2, width)
        torch.testing.assert_close(y[..., :4], torch.relu(x))


@pytest.mark.parametrize("name, width", [("relu", 8), ("hedgehog", 0)])
def test_a_width_needs_a_learned_map_and_a_positive_size(name, width):
    with pytest.raises(ValueError, match="width"):
        FeatureMap(name, 2, 4, width=width)


def test_unknown_feature_map():
    with pytest.raises(ValueError, match="Unknown feature map"):
        FeatureMap("cos", 1, 4)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_short_conv_streams_exactly(activation):
    torch.manual_seed(0)
    conv = ShortConvolution(6, 4, activation)
    x = torch.randn(2, 11, 6)
    full, _ = conv(x)
    state, pieces = None, []
    for a, b in [(0, 1), (1, 5), (5, 6), (6, 11)]:
        y, state = conv(x[:, a:b], state)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), full)
    assert state.shape == (2, 6, 3)
    # Causal: the output at t does not depend on inputs after t.
    x2 = x.clone()
    x2[:, 7:] = 0
    torch.testing.assert_close(conv(x2)[0][:, :7], full[:, :7])


def test_short_conv_identity_init():
    conv = ShortConvolution(4, 3, activation=None)
    conv.init_identity()
    x = torch.randn(1, 5, 4)
    torch.testing.assert_close(conv(x)[0], x)


def test_norms():
    x = torch.randn(3, 8) * 5
    y = RMSNorm(8)(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3), atol=1e-4, rtol=1e-4)
    gate = torch.randn(3, 8)
    torch.testing.assert_close(GatedRMSNorm(8)(x, gate), y * torch.nn.functional.silu(gate))
    assert isinstance(build_norm("layer", 8, 1e-5), torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="Unknown norm_type"):
        build_norm("batch", 8, 1e-5)


@pytest.mark.parametrize("T, window, cached", [(130, 16, 0), (65, 64, 0), (200, 64, 63), (40, 4, 3), (17, 16, 15)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kv_heads", [3, 1])
def test_sliding_window_attention_in_blocks_equals_masked_full_product(T, window, cached, padded, kv_heads):
    # Prefill longer than the window runs blocked (O(T * window)); the spec is the masked full product.
    from hf_fwp.modeling import layers_softmax_attention as sa

    gen = torch.Generator().manual_seed(T + window)
    B, H, D, L = 2, 3, 8, T + cached
    q, k, v = (torch.randn(B, h, n, D, generator=gen) for h, n in ((H, T), (kv_heads, L), (kv_heads, L)))
    key_mask = None
    if padded:
        key_mask = torch.ones(B, L)
        key_mask[0, : min(L, 7)] = 0  # left padding, as in a batch of prompts of different lengths
    total = cached + T
    q_pos, k_pos = torch.arange(cached, total)[:, None], torch.arange(total - L, total)[None, :]
    allowed = ((k_pos <= q_pos) & (k_pos > q_pos - window))[None].expand(B, T, L)
    if padded:
        allowed = (allowed & key_mask[:, None, :].bool()) | (k_pos == q_pos)[None]
    k_all, v_all = (x.repeat_interleave(H // kv_heads, dim=1) for x in (k, v))  # grouped-query heads, spelled out
    expected = torch.nn.functional.scaled_dot_product_attention(q, k_all, v_all, attn_mask=allowed[:, None])
    expected = expected.transpose(1, 2)
    assert T > window  # the blocked path is taken
    out = sa.softmax_attention(q, k, v, past=cached, window=window, key_mask=key_mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["hedgehog", "t2r"])
def test_learned_maps_apply_each_heads_own_weights(name):
    fm = FeatureMap(name, num_heads=3, head_dim=4)
    assert [n for n, _ in fm.named_parameters()] == (["weight", "bias"] if name == "t2r" else ["weight"])
    with torch.no_grad():
        fm.weight.normal_()
        if fm.bias is not None:
            fm.bias.normal_()
    x = torch.randn(2, 5, 3, 4)
    bias = [None if fm.bias is None else fm.bias[h] for h in range(3)]
    per_head = torch.stack([F.linear(x[:, :, h], fm.weight[h], bias[h]) for h in range(3)], dim=2)
    torch.testing.assert_close(fm._per_head_linear(x), per_head)


@pytest.mark.parametrize("name", ["hedgehog", "t2r"])
def test_learned_maps_load_the_per_head_layout(name):
    # State dicts saved before the heads were stacked hold one nn.Linear per head under layers.<h>.
    old = {}
    for h in range(3):
        old[f"layers.{h}.weight"] = torch.randn(4, 4)
        if name == "t2r":
            old[f"layers.{h}.bias"] = torch.randn(4)
    fm = FeatureMap(name, num_heads=3, head_dim=4)
    fm.load_state_dict(dict(old))
    torch.testing.assert_close(fm.weight, torch.stack([old[f"layers.{h}.weight"] for h in range(3)]))
    if name == "t2r":
        torch.testing.assert_close(fm.bias, torch.stack([old[f"layers.{h}.bias"] for h in range(3)]))
    del old["layers.2.weight"]  # a head missing is reported, not filled in
    with pytest.raises(RuntimeError, match="layers.0.weight"):
        FeatureMap(name, num_heads=3, head_dim=4).load_state_dict(old)


def test_learned_maps_take_a_lora_per_head_through_peft_target_parameters():
    peft = pytest.importorskip("peft")

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.feature_map_q = FeatureMap("hedgehog", num_heads=3, head_dim=4)

        def forward(self, x):
            return self.feature_map_q(x)

    torch.manual_seed(0)
    model = Wrap()
    x = torch.randn(2, 5, 3, 4)
    before = model(x)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=[], target_parameters=["feature_map_q.weight"],
                                                      init_lora_weights=False))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    out = lora(x)
    assert not torch.allclose(out, before)
    out.sum().backward()
    assert all(p.grad is not None for p in lora.parameters() if p.requires_grad)
    merged = lora.merge_and_unload()
    torch.testing.assert_close(merged(x), out.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", ["gated_linear", "gated_delta"])
def test_under_autocast_an_fwp_layer_leaves_float32_only_for_its_projections(monkeypatch, rule):
    # bf16 autocast inside the converted layer (feature maps, conv, gates, normaliser) trained to a far worse fit
    # on SmolLM2 (benchmarks/results/recipe_experiments.md): only the q/k/v projections may run in bf16.
    from hf_fwp.modeling import layers_fwp_attention as layer_module
    from tests.modeling.helpers import rel_err, tiny_model

    model = tiny_model(rule=rule, layout="lolcats", feature_map="hedgehog", use_short_conv=True)
    seen = []
    for name in ("linear_attention", "delta_rule"):
        op = getattr(layer_module, name)

        def spy(q, k, v, *args, _op=op, **kwargs):
            seen.append({q.dtype, k.dtype, v.dtype} | {t.dtype for t in args if torch.is_tensor(t)})
            return _op(q, k, v, *args, **kwargs)

        monkeypatch.setattr(layer_module, name, spy)
    ids = torch.randint(3, 64, (2, 12))
    reference = model(ids).logits
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids).logits
    assert len(seen) == 2 and all(dtypes == {torch.float32} for dtypes in seen), seen
    assert rel_err(logits.float(), reference) < 0.05  # bf16 projections (and the MLPs, head): close to float32


@pytest.mark.parametrize("rule", ["linear", "gated_linear"])
@pytest.mark.parametrize("state_heads", ["query", "kv"])
def test_attention_weights_are_what_the_fwp_applies_to_its_values(rule, state_heads):
    # The quadratic form of a normalised (gated) linear attention layer, against its chunked forward pass.
    from tests.modeling.helpers import tiny_model

    model = tiny_model(rule=rule, feature_map="hedgehog", use_short_conv=True, conv_activation=None,
                       normalize_attention=True, qk_l2norm=False, use_output_norm=False, use_output_gate=False,
                       fwp_state_heads=state_heads, chunk_size=4).double()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        if rule == "gated_linear":
            attn.a_proj.weight.normal_()  # data-dependent decays
        for fm in (attn.feature_map_q, attn.feature_map_k):
            for p in fm.parameters():
                p.add_(0.3 * torch.randn_like(p))
    attn.o_proj = torch.nn.Identity()  # the layer then returns the FWP's output itself
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    with torch.no_grad():
        out = attn(x).view(2, 11, attn.num_heads, attn.head_dim)
        a = attn.attention_weights(x)
        q, k, v = attn.project(x)
        _, _, fv, _ = attn._features(q, k, v, None, None, None)
    G = attn.num_heads // fv.shape[2]
    expected = torch.einsum("bhts,bshd->bthd", a, fv.repeat_interleave(G, dim=2))
    assert a.shape == (2, attn.num_heads, 11, 11) and torch.allclose(a.sum(-1), torch.ones(2, 4, 11, dtype=a.dtype))
    assert (a.triu(1) == 0).all()  # causal
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-7)
    with pytest.raises(ValueError, match="normalised linear rule"):
        tiny_model(rule="gated_delta").model.layers[0].self_attn.attention_weights(x.float())
