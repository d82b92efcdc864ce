"""Recipe: validation of its fields, the named layouts, convert() options, and where a run trains."""

from dataclasses import replace

import pytest

from hf_fwp.conversion import recipe
from hf_fwp.conversion.convert import convert


def test_precision_follows_the_hardware():
    auto = recipe.Recipe()
    assert recipe.placement(auto, cuda=False) == ("cpu", False)  # the CPU stays float32
    assert recipe.placement(auto, cuda=True, cuda_bf16=True) == ("cuda", True)  # a GPU trains in bf16
    assert recipe.placement(auto, cuda=True, cuda_bf16=False) == ("cuda", False)  # ... when it supports it
    assert recipe.placement(replace(auto, precision="fp32"), cuda=True, cuda_bf16=True) == ("cuda", False)
    assert recipe.placement(replace(auto, precision="bf16"), cuda=False) == ("cpu", True)
    with pytest.raises(recipe.RecipeError, match="precision must be 'auto', 'fp32' or 'bf16'"):
        recipe.Recipe(precision="fp16")


def test_recipe_picks_how_hybrid_layers_join_their_branches():
    # None: the default where a shared normaliser can apply, else the mix; an impossible choice is refused early.
    assert recipe.Recipe().hybrid_combine == recipe.DEFAULT_COMBINE
    assert recipe.Recipe(fwp_rule="gated_delta", feature_map="identity").hybrid_combine == "lerp"
    assert recipe.Recipe(fwp_layer_type="linear_attention").hybrid_combine == "lerp"
    assert "hybrid_combine" not in recipe.Recipe(fwp_layer_type="linear_attention").convert_options()
    shared = recipe.Recipe(hybrid_combine="shared_normalizer").convert_options()
    assert shared["hybrid_combine"] == "shared_normalizer" and shared["normalize_attention"]
    for bad in (dict(fwp_rule="delta", feature_map="identity", hybrid_combine="shared_normalizer"),
                dict(fwp_layer_type="linear_attention", hybrid_combine="shared_normalizer"),
                dict(hybrid_combine="shared")):
        with pytest.raises(recipe.RecipeError, match="hybrid_combine"):
            recipe.Recipe(**bad)
    with pytest.raises(recipe.RecipeError, match="Recipe's own"):
        recipe.Recipe(fwp_options={"hybrid_combine": "lerp"})


def test_fwp_rotary_of_a_recipe_applies_to_rotary_teachers_only():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    chosen = recipe.named_recipe("pure-fwp", fwp_options={"fwp_rotary": True, "use_short_conv": True})
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=64))
    assert chosen.convert_options(llama)["fwp_rotary"] and chosen.convert_options()["fwp_rotary"]
    # GPT-2 adds learned positions to its hidden states: its q/k carry them already, and RoPE is not its own.
    assert "fwp_rotary" not in chosen.convert_options(gpt2)
    student = convert(gpt2, **chosen.convert_options(gpt2))
    assert not student.config.fwp_rotary and student.config.use_short_conv
    assert convert(llama, **chosen.convert_options(llama)).config.fwp_rotary


def test_named_recipes_are_copies():
    chosen = recipe.named_recipe("pure-fwp")
    chosen.fwp_options["use_short_conv"] = False  # a recipe's own copy: the named layout stays as it was
    assert recipe.named_recipe("pure-fwp").fwp_options["use_short_conv"]
    assert recipe.NAMED_RECIPES["pure-fwp"]["fwp_options"]["use_short_conv"]


def test_attention_weight_transfer_is_for_pure_normalised_linear_students():
    assert recipe.named_recipe("pure-fwp", stage1_objective="both").stage1_objective == "both"
    with pytest.raises(recipe.RecipeError, match="stage1_objective must be one of"):
        recipe.Recipe(stage1_objective="weights")
    for bad in (dict(), dict(fwp_layer_type="linear_attention", fwp_rule="gated_delta", feature_map="identity")):
        with pytest.raises(recipe.RecipeError, match="matching attention weights needs linear_attention layers"):
            recipe.Recipe(stage1_objective="attention", **bad)
