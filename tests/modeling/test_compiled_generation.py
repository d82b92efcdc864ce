"""Static caches and compiled decoding with transformers' own machinery (``cache_implementation="static"``,
``compile_config``): same tokens as the eager dynamic path for every rule and layer layout, left padding included."""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig, StaticCache

from hf_fwp import FWPCache
from tests.modeling.helpers import LAYOUTS, rel_err, tiny_model

RULES = ["linear", "gated_linear", "delta", "gated_delta"]


def _padded_batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    return ids.masked_fill(mask == 0, 0), mask


def _compile_config(backend: str) -> CompileConfig:
    config = CompileConfig(fullgraph=True, backend=backend, mode="default" if backend == "inductor" else None)
    config._compile_all_devices = True  # generate() compiles on CUDA only unless told otherwise
    return config


def assert_static_and_compiled_give_the_eager_tokens(model, backend: str = "eager", max_new_tokens: int = 8) -> None:
    """Greedy tokens of a left-padded batch: eager (dynamic cache) == static cache == static cache compiled."""
    ids, mask = _padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    expected = model.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), expected)
    compiled = model.generate(ids, cache_implementation="static", compile_config=_compile_config(backend), **kwargs)
    assert torch.equal(compiled, expected)


def test_the_model_declares_what_transformers_checks_before_compiling():
    model = tiny_model(layout="hybrid")
    assert model._can_compile_fullgraph and model._is_stateful
    assert StaticCache(config=model.config, max_cache_len=16).is_compileable
    # The default cache is dynamic: generate() must not compile it behind the user's back.
    assert not FWPCache(model.config).is_compileable


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_static_cache_generates_the_dynamic_tokens(rule, layout):
    model = tiny_model(rule=rule, layout=layout)
    ids, mask = _padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    expected = model.generate(ids, **kwargs)
    out = model.generate(ids, cache_implementation="static", return_dict_in_generate=True, **kwargs)
    assert isinstance(out.cache, StaticCache)
    assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_static_cache_keeps_its_buffers_and_matches_the_full_forward(layout):
    # A user-driven loop (no generate): prefill, then one token at a time into fixed-address buffers.
    model = tiny_model(layout=layout, rule="gated_delta")
    ids = torch.randint(3, 64, (2, 14))
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        full = model(ids).logits
        pieces = [model(ids[:, :9], cache=cache, use_cache=True).logits]
        buffers = {}
        for i, layer in enumerate(cache.layers):
            for name in ("recurrent_states", "conv_states"):
                if getattr(layer, name, {}).get(0) is not None:
                    buffers[i, name] = getattr(layer, name)[0].data_ptr()
            if getattr(layer, "keys", None) is not None:
                buffers[i, "keys"] = layer.keys.data_ptr()
        for t in range(9, 14):
            pieces.append(model(ids[:, t : t + 1], cache=cache, use_cache=True,
                                position_ids=torch.full((2, 1), t)).logits)
    assert buffers and any(name == "recurrent_states" for _, name in buffers)
    for (i, name), ptr in buffers.items():
        tensor = getattr(cache.layers[i], name)
        assert (tensor[0] if isinstance(tensor, dict) else tensor).data_ptr() == ptr, (i, name)
    assert rel_err(torch.cat(pieces, 1), full) < 1e-4


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compiled_decode_is_one_graph_and_gives_the_eager_tokens(rule, layout):
    # fullgraph=True: a graph break (a host sync such as .item() or bool(tensor), an untraceable call) is an error.
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(rule=rule, layout=layout)
    ids, mask = _padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    expected = model.generate(ids, **kwargs)
    compiled = model.generate(ids, cache_implementation="static", compile_config=_compile_config("eager"), **kwargs)
    assert torch.equal(compiled, expected)
    # Decode steps reuse the graph: at most one re-trace (transformers' sliding layers count tokens in an int).
    assert 1 <= counters["stats"]["unique_graphs"] <= (1 if layout == "fwp" else 2)


@pytest.mark.parametrize("rule", RULES)
def test_states_shared_by_query_groups_decode_static_and_compiled_like_eager(rule):
    torch._dynamo.reset()
    assert_static_and_compiled_give_the_eager_tokens(tiny_model(rule=rule, layout="lolcats", fwp_state_heads="kv"))


@pytest.mark.parametrize("layout", ["fwp", "lolcats"])
def test_inductor_compiled_decode_gives_the_eager_tokens(layout):
    # The real compiler on CPU (C++ codegen): generated code, not only the traced graph, must give the same tokens.
    torch._dynamo.reset()
    model = tiny_model(layout=layout, rule="gated_delta")
    ids, mask = _padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    expected = model.generate(ids, **kwargs)
    compiled = model.generate(ids, cache_implementation="static", compile_config=_compile_config("inductor"), **kwargs)
    assert torch.equal(compiled, expected)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_the_pure_recipes_layers_decode_static_and_compiled_like_eager(backend):
    # What the pure-fwp recipe converts to (every layer FWP, a slow-started decay gate, a short conv without
    # activation, grouped states) with fwp_rotary on top: positions for the FWP's RoPE come from an all-recurrent cache.
    torch._dynamo.reset()
    model = tiny_model(layout="fwp", rule="gated_linear", feature_map="hedgehog", normalize_attention=True,
                       qk_l2norm=False, fwp_rotary=True, decay_init="slow", conv_activation=None,
                       fwp_state_heads="kv", use_output_norm=False, use_output_gate=False)
    assert_static_and_compiled_give_the_eager_tokens(model, backend)


@pytest.mark.parametrize("layout,feature_map", [("lolcats", "hedgehog"), ("hybrid", "t2r")])
def test_inductor_single_row_decode_gives_the_eager_tokens(layout, feature_map):
    # Batch 1: every linear layer and learned feature map takes its compiled single-row (product-and-sum) path.
    torch._dynamo.reset()
    model = tiny_model(layout=layout, rule="gated_delta", feature_map=feature_map, fwp_state_heads="kv")
    ids = torch.randint(3, 64, (1, 7), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    expected = model.generate(ids, **kwargs)
    compiled = model.generate(ids, cache_implementation="static", compile_config=_compile_config("inductor"), **kwargs)
    assert torch.equal(compiled.sequences, expected.sequences)
    assert rel_err(torch.stack(compiled.logits), torch.stack(expected.logits)) < 1e-4


@pytest.mark.triton
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("state_heads", ["query", "kv"])
def test_triton_backend_decodes_like_the_torch_path(rule, state_heads):
    # The Triton step (the interpreter without a GPU) inside the model: same logits as the torch step, and
    # generate(cache_implementation="static") with a fullgraph compile keeps it as one opaque op.
    ids, mask = _padded_batch()
    eager = tiny_model(rule=rule, layout="lolcats", fwp_state_heads=state_heads)
    triton_model = tiny_model(rule=rule, layout="lolcats", fwp_backend="triton", fwp_state_heads=state_heads)
    with torch.no_grad():
        a = eager(ids[:, :6], use_cache=True)
        b = triton_model(ids[:, :6], use_cache=True)
        steps = [(eager(ids[:, t : t + 1], cache=a.cache).logits, triton_model(ids[:, t : t + 1], cache=b.cache).logits)
                 for t in range(6, 9)]
    for x, y in steps:
        assert rel_err(y, x) < 1e-4
    torch._dynamo.reset()
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)
    compiled = triton_model.generate(ids, cache_implementation="static", compile_config=_compile_config("eager"),
                                     **kwargs)
    assert torch.equal(compiled, eager.generate(ids, **kwargs))


def test_hybrid_and_sliding_layers_with_their_own_windows():
    # Kept sliding layers (window 4) beside hybrid layers (window 6): the caches size each layer's window from the
    # config (transformers' per_layer_config), eager, static and compiled decoding agree with the full forward.
    model = tiny_model(layout="lolcats", num_hidden_layers=3, sliding_window=4, hybrid_window=6,
                       layer_types=["sliding_attention", "hybrid_sliding", "linear_attention"])
    assert [getattr(layer, "sliding_window", None) for layer in FWPCache(model.config).layers] == [4, 6, None]
    ids, mask = _padded_batch()
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        steps = [out.logits] + [model(ids[:, t : t + 1], cache=out.cache).logits for t in range(5, 9)]
    assert rel_err(torch.cat(steps, 1), full) < 1e-4
    torch._dynamo.reset()
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    expected = model.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, use_cache=False, **kwargs), expected)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), expected)
    assert torch.equal(model.generate(ids, cache_implementation="static", compile_config=_compile_config("eager"),
                                      **kwargs), expected)
