"""FWPConfig validation, constructors and serialisation."""

import pytest

from hf_fwp import FWPConfig


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(fwp_rule="mamba"), "unknown fwp_rule 'mamba'"),
        (dict(feature_map="cosine"), "unknown feature_map 'cosine'"),
        (dict(hidden_size=30, num_attention_heads=4), "not divisible by num_attention_heads"),
        (dict(num_attention_heads=4, num_key_value_heads=3, hidden_size=32), "multiple of num_key_value_heads"),
        (dict(num_hidden_layers=2, layer_types=["linear_attention"]), "has 1 entries but num_hidden_layers is 2"),
        (dict(num_hidden_layers=1, layer_types=["mamba"]), "unknown layer_types"),
        (dict(num_hidden_layers=1, layer_types=["sliding_attention"]), "`sliding_window` must be a positive int"),
        (dict(fwp_rule="delta", qk_l2norm=False), "needs unit-norm keys"),
        (dict(fwp_rule="gated_delta", normalize_attention=True), "only applies to the 'linear'"),
        (dict(fwp_rule="linear", normalize_attention=True, qk_l2norm=False), "needs non-negative features"),
        (dict(use_short_conv=True, conv_size=1), "conv_size must be an int >= 2"),
        (dict(hybrid_mix_init=1.5), r"hybrid_mix_init must be in \(0, 1\)"),
        (dict(norm_type="batch"), "unknown norm_type"),
        (dict(position_embedding_type="alibi"), "unknown position_embedding_type"),
        (dict(hidden_size=0), "`hidden_size` must be a positive integer"),
        (dict(fwp_state_heads="value"), "unknown fwp_state_heads 'value'"),
        (dict(fwp_rule="linear", allow_neg_eigval=True), "allow_neg_eigval widens the delta rules' beta"),
        (dict(fwp_rule="gated_linear", allow_neg_eigval=True), "the 'gated_linear' rule has no beta"),
        (dict(rope_parameters={"rope_type": "foo"}), "unknown rope_parameters rope_type 'foo'"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), "rope_theta must be a positive number"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": float("nan")}), "rope_theta must be a positive"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "are incomplete: Missing required keys"),
        (dict(fwp_rotary=True, position_embedding_type="learned"), "fwp_rotary=True rotates the FWP's q/k by RoPE"),
        (dict(fwp_rotary=1), "`fwp_rotary` must be True or False"),
        (dict(fwp_scale=float("nan")), "`fwp_scale` must be None or a positive number"),
        (dict(hybrid_window=8), "hybrid_window=8 sets the window of hybrid_sliding layers and there are none"),
        (dict(fwp_state_heads="kv", share_feature_map=True, num_attention_heads=8, num_key_value_heads=2),
         "share_feature_map=True needs as many key as query"),
    ],
)
def test_impossible_configs_raise_value_error(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        FWPConfig(**kwargs)


def test_explicit_escape_hatches_are_accepted():
    FWPConfig(fwp_rule="delta", qk_l2norm=False, allow_unnormalized_delta=True)
    FWPConfig(hidden_size=30, num_attention_heads=4, head_dim=8)  # Qwen3-style heads * head_dim != hidden


def test_defaults_and_constructors():
    c = FWPConfig(num_hidden_layers=3)
    assert c.layer_types == ["linear_attention"] * 3 and c.head_dim == c.hidden_size // c.num_attention_heads
    assert c.num_key_value_heads == c.num_attention_heads
    assert FWPConfig.gated_deltanet().fwp_rule == "gated_delta"
    d = FWPConfig.deltanet(hidden_size=64, num_attention_heads=2)
    assert d.fwp_rule == "delta" and d.feature_map == "silu" and d.hidden_size == 64
    lt = FWPConfig.linear_transformer()
    assert lt.normalize_attention and lt.feature_map == "elu_plus_one"


def test_round_trip(tmp_path):
    c = FWPConfig(num_hidden_layers=2, layer_types=["hybrid_sliding", "full_attention"], sliding_window=16,
                  feature_map="hedgehog", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    c.save_pretrained(tmp_path)
    r = FWPConfig.from_pretrained(tmp_path)
    assert r.to_dict() == c.to_dict()


@pytest.mark.parametrize("bad, message", [
    (dict(use_short_conv="false"), "`use_short_conv` must be True or False"),
    (dict(qk_l2norm="yes"), "`qk_l2norm` must be True or False"),
    (dict(fwp_rules="linear"), "unknown field 'fwp_rules'; did you mean 'fwp_rule'"),
    (dict(hidden_size="32"), "`hidden_size` must be a positive integer"),
    (dict(hybrid_mix_init="0.1"), "`hybrid_mix_init` must be a number"),
    (dict(hidden_act="swishy"), "unknown hidden_act 'swishy'"),
    (dict(rms_norm_eps="1e-6"), "`rms_norm_eps` must be a positive number"),
    (dict(max_position_embeddings=-1), "`max_position_embeddings` must be a positive integer"),
    (dict(attention_dropout=1.5), "`attention_dropout` must be in"),
    (dict(feature_map="identity", feature_map_dim=64), "`feature_map_dim` must be None or an integer >= 1 for a "
                                                       "learned feature map"),
    (dict(feature_map="hedgehog", feature_map_dim=0), "`feature_map_dim` must be None"),
    (dict(feature_map="hedgehog", feature_map_dim=True), "`feature_map_dim` must be None"),
])
def test_every_field_is_validated(bad, message):
    with pytest.raises(ValueError, match=message):
        FWPConfig(**bad)


def test_other_unknown_keys_warn_and_saved_configs_reload_silently(tmp_path):
    import warnings

    with pytest.warns(UserWarning, match="'my_note' is not an FWPConfig field"):
        FWPConfig(my_note="x")
    FWPConfig(num_hidden_layers=2).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FWPConfig.from_pretrained(tmp_path)
