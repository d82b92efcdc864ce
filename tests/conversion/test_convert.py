"""convert(): weight maps reproduce every supported source exactly; FWP conversions run and generate."""

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from hf_fwp import FWPForCausalLM, convert
from hf_fwp.conversion import plan_layer_types

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)


def _sources():
    return {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                                   "rope_theta": 500.0})),
        "llama-bias-tied": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True,
                                                                tie_word_embeddings=True)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=5)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),
        "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                                                   initializer_range=0.1)),
    }


def _randomize(model):
    # Fresh norms are all ones and biases zero: perturb everything so a mis-mapped weight cannot hide.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", list(_sources()))
def test_all_softmax_conversion_reproduces_the_source(name):
    torch.manual_seed(0)
    src = _randomize(_sources()[name]())
    fwp = convert(src, keep_softmax="all")
    assert isinstance(fwp, FWPForCausalLM)
    ids = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        expected = src(ids).logits
        got = fwp(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(_sources()))
@pytest.mark.parametrize("options", [
    dict(),
    dict(fwp_rule="linear", feature_map="hedgehog", qk_l2norm=False, normalize_attention=True,
         fwp_layer_type="hybrid_sliding", sliding_window=4, keep_softmax=2),
])
def test_fwp_conversion_runs_and_generates(name, options):
    torch.manual_seed(0)
    src = _randomize(_sources()[name]())
    if name == "mistral" and "sliding_window" in options:
        options = dict(options, sliding_window=5)  # kept sliding layers keep the source's window
    fwp = convert(src, **options)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        logits = fwp(ids).logits
    assert torch.isfinite(logits).all() and logits.shape == (2, 9, 96)
    gen = fwp.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, fwp.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0))
    assert fwp.config.layer_types.count("full_attention") + fwp.config.layer_types.count("sliding_attention") == (
        1 if options.get("keep_softmax") == 2 else 0)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2"])
def test_a_short_conv_starts_as_the_identity(name):
    # Conversion adds parts a softmax layer lacks at values that leave its q/k/v as they were: with a conv (and
    # RoPE on the FWP's q/k, for rotary sources) the converted student computes what the one without it computes.
    torch.manual_seed(0)
    src = _randomize(_sources()[name]())
    options = dict(fwp_rule="linear", feature_map="hedgehog", qk_l2norm=False, normalize_attention=True)
    plain, with_conv = convert(src, **options), convert(src, use_short_conv=True, **options)
    assert with_conv.config.conv_activation is None
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(with_conv(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)
        if name != "gpt2":
            rotary = convert(src, fwp_rotary=True, **options)
            assert not torch.allclose(rotary(ids).logits, plain(ids).logits, atol=1e-3)
    trained = convert(src, use_short_conv=True, conv_activation="silu", **options)
    assert trained.config.conv_activation == "silu"


def test_layer_plans():
    src = ["full_attention"] * 4
    assert plan_layer_types(4, src, "none") == ["linear_attention"] * 4
    assert plan_layer_types(4, src, 2) == ["linear_attention", "full_attention"] * 2
    assert plan_layer_types(4, src, [0], "hybrid_sliding") == ["full_attention"] + ["hybrid_sliding"] * 3
    with pytest.raises(ValueError, match=r"indices \[7\]"):
        plan_layer_types(4, src, [7])
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_layer_types(4, src, 0)


def test_unsupported_architecture_and_bad_options():
    class BertLikeForCausalLM(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="does not support BertLikeForCausalLM; supported architectures: "
                                         "GPT2LMHeadModel, LlamaForCausalLM"):
        convert(BertLikeForCausalLM())
    src = _sources()["llama"]()
    with pytest.raises(ValueError, match="needs sliding_window"):
        convert(src, fwp_layer_type="hybrid_sliding")
    with pytest.raises(ValueError, match="unknown FWPConfig options"):
        convert(src, feature_mapp="hedgehog")


def test_options_the_source_fixes_are_refused_with_the_right_name():
    src = _sources()["qwen2"]()
    with pytest.raises(ValueError, match="set by keep_softmax .* and fwp_layer_type"):
        convert(src, layer_types=["linear_attention"] * 3)
    with pytest.raises(ValueError, match="set by keep_softmax"):
        convert(src, num_hidden_layers=2)
    for option in (dict(hidden_size=64), dict(vocab_size=10), dict(num_attention_heads=2)):
        with pytest.raises(ValueError, match=rf"\['{next(iter(option))}'\] come from the source model's config"):
            convert(src, **option)


@pytest.mark.parametrize("keep", ["every:2", "0,3", "ALL", True, 1.5])
def test_keep_softmax_in_command_line_spelling_is_explained(keep):
    with pytest.raises(ValueError, match="keep_softmax must be 'all', 'none', an int k"):
        plan_layer_types(4, ["full_attention"] * 4, keep)


def test_a_hybrid_window_never_changes_the_kept_sliding_layers():
    src = _randomize(_sources()["mistral"]())  # window 5
    ids = torch.randint(0, 96, (1, 12))
    # No hybrid layers: the window is not used.
    exact = convert(src, keep_softmax="all", fwp_layer_type="hybrid_sliding", sliding_window=16)
    with torch.no_grad():
        torch.testing.assert_close(exact(ids).logits, src(ids).logits, atol=1e-5, rtol=1e-4)
    mixed = convert(src, keep_softmax=[0], fwp_layer_type="hybrid_sliding", sliding_window=16)
    assert mixed.config.sliding_window == 5 and mixed.config.layer_window("hybrid_sliding") == 16
    # The kept layer 0 computes what the source's layer 0 computes (window 5, not 16).
    outs = {}
    mixed.model.layers[0].register_forward_hook(lambda m, a, o: outs.__setitem__("fwp", o))
    src.model.layers[0].register_forward_hook(lambda m, a, o: outs.__setitem__("src", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        mixed(ids), src(ids)
    torch.testing.assert_close(outs["fwp"], outs["src"], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"lists a layer twice: \[0, 0\]"):
        convert(src, keep_softmax=[0, 0])
    # A window for a layout without hybrid layers is a mistake, not something to ignore.
    with pytest.raises(ValueError, match="sliding_window=8 sets the window of hybrid_sliding layers"):
        convert(src, fwp_layer_type="linear_attention", sliding_window=8)


@pytest.mark.parametrize("flags", [dict(scale_attn_weights=False), dict(scale_attn_by_inverse_layer_idx=True)])
def test_gpt2_attention_scalings_the_student_cannot_reproduce_are_refused(flags):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, **flags))
    with pytest.raises(ValueError, match="supports GPT-2 attention scaled by head_dim \\*\\* -0.5 only"):
        convert(src, keep_softmax="all")
