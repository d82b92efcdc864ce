"""FWPForCausalLM: caching, padding, generation, saving, losses, memory."""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from hf_fwp import FWPCache, FWPForCausalLM, FWPModel
from tests.modeling.helpers import LAYOUTS, rel_err, tiny_model

RULES = ["linear", "gated_linear", "delta", "gated_delta"]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("state_heads", ["query", "kv"])
def test_prefill_plus_decoding_equals_full_forward(rule, layout, state_heads):
    model = tiny_model(rule=rule, layout=layout, fwp_state_heads=state_heads)
    ids = torch.randint(3, 64, (2, 19))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :11], use_cache=True)
        pieces = [out.logits]
        cache = out.cache
        for t in range(11, 19):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            pieces.append(out.logits)
    assert isinstance(cache, FWPCache) and cache.get_seq_length() == 19
    assert rel_err(torch.cat(pieces, 1), full) < 1e-4
    heads = {"query": model.config.num_attention_heads, "kv": model.config.num_key_value_heads}[state_heads]
    states = [layer.recurrent_states[0] for layer in cache.layers if getattr(layer, "recurrent_states", None)]
    assert states and all(S.shape[1] == heads for S in states)


@pytest.mark.parametrize("rule", RULES)
def test_kv_states_are_query_states_with_each_groups_parameters_shared(rule):
    # fwp_state_heads="kv" is grouped-query FWP attention: the same model as per-query-head states whose key
    # feature maps, beta and gates are copies of their group's.
    options = dict(rule=rule, layout="lolcats", feature_map="hedgehog" if "linear" in rule else "t2r")
    kv, per_query = tiny_model(seed=3, fwp_state_heads="kv", **options), tiny_model(seed=4, **options)
    G = kv.config.num_attention_heads // kv.config.num_key_value_heads
    kv_state, state = kv.state_dict(), {}
    for name, target in per_query.state_dict().items():
        if kv_state[name].shape != target.shape:  # key maps, beta and gate projections, A_log, dt_bias: per head
            state[name] = kv_state[name].repeat_interleave(G, dim=0)
        else:
            state[name] = kv_state[name]
    per_query.load_state_dict(state)
    ids = torch.randint(3, 64, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(kv(ids).logits, per_query(ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("options", [
    dict(feature_map="hedgehog", qk_l2norm=False, fwp_rule="linear", normalize_attention=True),
    dict(feature_map="dpfp", fwp_rule="gated_linear", use_short_conv=False),
    dict(feature_map="hedgehog", feature_map_dim=16, fwp_rule="gated_linear", normalize_attention=True,
         qk_l2norm=False, fwp_state_heads="query"),
    dict(feature_map="t2r", feature_map_dim=5, fwp_rule="gated_delta", layout="fwp"),
    dict(feature_map="t2r", fwp_rule="delta", allow_neg_eigval=True, use_output_gate=False),
    dict(feature_map="elu_plus_one", fwp_rule="linear", normalize_attention=True, qk_l2norm=False, use_output_norm=False),
    dict(position_embedding_type="learned", norm_type="layer", mlp_type="plain", hidden_act="gelu_new",
         attention_bias=True, attention_output_bias=True, mlp_bias=True, layout="hybrid"),
    dict(fwp_rotary=True, feature_map="hedgehog", fwp_rule="linear", normalize_attention=True, qk_l2norm=False,
         use_short_conv=False, fwp_state_heads="kv"),
    dict(fwp_rotary=True, layout="lolcats", fwp_rule="gated_delta"),
    dict(qk_norm=True, tie_word_embeddings=True, layout="hybrid",
         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
])
def test_options_keep_cache_consistency(options):
    options = dict(options)
    model = tiny_model(layout=options.pop("layout", "lolcats"), **options)
    ids = torch.randint(3, 64, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :7], use_cache=True)
        rest = [model(ids[:, t : t + 1], cache=out.cache, use_cache=True).logits for t in range(7, 12)]
    assert rel_err(torch.cat([out.logits, *rest], 1), full) < 1e-4


@pytest.mark.parametrize("layout", list(LAYOUTS) + ["fwp_rotary"])
def test_left_padded_rows_equal_rows_alone(layout):
    model = tiny_model(layout=layout) if layout != "fwp_rotary" else tiny_model(layout="fwp", fwp_rotary=True)
    a, b = torch.randint(3, 64, (1, 9)), torch.randint(3, 64, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    with torch.no_grad():
        logits = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(logits[1, 4:], model(b).logits[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits[0], model(a).logits[0], atol=1e-5, rtol=1e-4)
    gen = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen[1, 4:], model.generate(b, max_new_tokens=6, do_sample=False)[0])
    assert torch.equal(gen[0], model.generate(a, max_new_tokens=6, do_sample=False)[0])


def test_fwp_rotary_gives_an_fwp_layer_the_order_of_its_context():
    # Linear attention without conv or decay reads its context as a set: the last token's output is the same for
    # any order of the tokens before it. RoPE on the FWP's q/k (fwp_rotary) makes it depend on their order.
    options = dict(layout="fwp", fwp_rule="linear", feature_map="hedgehog", normalize_attention=True,
                   qk_l2norm=False, use_short_conv=False, num_hidden_layers=1, layer_types=["linear_attention"])
    ids = torch.randint(3, 64, (1, 9))
    shuffled = torch.cat([ids[:, :8].flip(1), ids[:, 8:]], 1)
    for rotary, order_matters in ((False, False), (True, True)):
        model = tiny_model(fwp_rotary=rotary, **options)
        with torch.no_grad():
            a, b = model(ids).logits[0, -1], model(shuffled).logits[0, -1]
        assert (rel_err(a, b) > 1e-3) == order_matters, rotary


@pytest.mark.parametrize("decay_init, low, high", [("mamba2", 1e-3, 1.6), ("slow", 1e-4, 1e-2)])
def test_decay_init_sets_the_range_of_per_token_decays(decay_init, low, high):
    model = tiny_model(rule="gated_linear", fwp_state_heads="query", decay_init=decay_init, num_attention_heads=8,
                       num_key_value_heads=8, hidden_size=64)
    for layer in model.model.layers:
        attn = layer.self_attn
        rate = attn.A_log.exp() * torch.nn.functional.softplus(attn.dt_bias)  # -log(decay) per token, a_proj at 0
        assert (attn.a_proj.weight == 0).all()
        assert rate.min() >= low * (1 - 1e-4) and rate.max() <= high * (1 + 1e-4)
        assert rate.max() / rate.min() > 2  # heads spread over the range


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_generation_modes_with_and_without_cache(layout):
    model = tiny_model(layout=layout)
    ids = torch.randint(3, 64, (2, 6))
    for kwargs in (dict(do_sample=False), dict(num_beams=3, do_sample=False, num_return_sequences=2)):
        with_cache = model.generate(ids, max_new_tokens=7, **kwargs)
        without = model.generate(ids, max_new_tokens=7, use_cache=False, **kwargs)
        assert torch.equal(with_cache, without), kwargs
    torch.manual_seed(0)
    sampled = model.generate(ids, max_new_tokens=5, do_sample=True, num_return_sequences=3, top_k=10)
    assert sampled.shape == (6, 11)


def test_generate_continues_from_a_returned_cache():
    model = tiny_model(layout="hybrid", eos_token_id=None)
    ids = torch.randint(3, 64, (1, 6))
    first = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    seq = first.sequences
    more = model.generate(seq, cache=first.cache, max_new_tokens=3, do_sample=False)
    assert torch.equal(more, model.generate(ids, max_new_tokens=7, do_sample=False))


def _state_bytes(cache: FWPCache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
        for states in (getattr(layer, "recurrent_states", {}), getattr(layer, "conv_states", {})):
            total += sum(t.numel() * t.element_size() for t in states.values() if t is not None)
    return total


@pytest.mark.parametrize("layout, grows", [("fwp", False), ("lolcats", False), ("hybrid", True)])
def test_cache_memory_is_constant_for_fwp_layers(layout, grows):
    model = tiny_model(layout=layout)
    ids = torch.randint(3, 64, (1, 8))
    sizes = []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        for _ in range(3):
            for _ in range(10):
                out = model(ids[:, :1], cache=out.cache, use_cache=True)
            sizes.append(_state_bytes(out.cache))
    assert sizes[0] > 0
    assert (sizes[2] > sizes[0]) == grows, sizes


def test_save_and_reload_give_identical_logits(tmp_path):
    model = tiny_model(layout="lolcats", feature_map="hedgehog")
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_fwp.py", "configuration_fwp.py"} <= files
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is FWPForCausalLM
    ids = torch.randint(3, 64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert AutoConfig.from_pretrained(tmp_path).auto_map["AutoModelForCausalLM"] == "modeling_fwp.FWPForCausalLM"
    assert isinstance(AutoModel.from_pretrained(tmp_path), FWPModel)


def test_tied_embeddings_share_storage(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    again = FWPForCausalLM.from_pretrained(tmp_path)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()


def test_labels_give_the_shifted_loss_and_ignore_padding():
    model = tiny_model(layout="hybrid")
    ids = torch.randint(3, 64, (2, 9))
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    padded = model(ids, attention_mask=mask, labels=ids).loss
    labels = ids.clone()
    labels[0, :3] = -100
    logits = model(ids, attention_mask=mask).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(padded, expected)


def test_logits_to_keep_and_bad_masks():
    model = tiny_model()
    ids = torch.randint(3, 64, (2, 9))
    assert model(ids, logits_to_keep=1).logits.shape == (2, 1, 64)
    with pytest.raises(ValueError, match="attention_mask has length 5"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="exactly one of"):
        model()


def test_learned_positions_beyond_the_table_are_reported():
    model = tiny_model(position_embedding_type="learned", max_position_embeddings=8, layout="hybrid")
    with pytest.raises(ValueError, match="beyond max_position_embeddings"):
        model(torch.randint(3, 64, (1, 9)))


@pytest.mark.parametrize("layout", ["fwp", "lolcats"])
def test_gradient_checkpointing_matches_plain_backward(layout):
    model = tiny_model(layout=layout).train()
    ids = torch.randint(3, 64, (2, 70))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if n in plain:
            torch.testing.assert_close(p.grad, plain[n], atol=1e-6, rtol=1e-4, msg=n)
    assert len(plain) == sum(1 for _ in model.parameters())


def test_bf16_forward_and_backward():
    model = tiny_model(layout="lolcats").to(torch.bfloat16).train()
    ids = torch.randint(3, 64, (2, 40))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    ref = tiny_model(layout="lolcats")(ids).logits
    assert ((out.logits.float() - ref).abs().mean() / ref.abs().mean()).item() < 5e-2


@pytest.mark.parametrize("options", [dict(), dict(position_embedding_type="learned", layout="hybrid")])
def test_an_input_without_tokens_is_named(options):
    options = dict(options)
    model = tiny_model(layout=options.pop("layout", "fwp"), **options)
    with pytest.raises(ValueError, match="the input has no tokens"):
        model(torch.zeros(2, 0, dtype=torch.long))


def test_a_checkpoint_missing_weights_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model(layout="lolcats")
    model.save_pretrained(tmp_path)
    assert FWPForCausalLM.from_pretrained(tmp_path) is not None
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.0.self_attn.q_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 missing \(model.layers.0.self_attn.q_proj.weight\)"):
        FWPForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not fit this FWPForCausalLM"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_checkpoint_with_per_head_feature_maps_is_refused_with_the_way_to_load_it(tmp_path):
    # Earlier code saved one Linear per head (feature_map_q.layers.<h>.weight); load_state_dict stacks them.
    from safetensors.torch import load_file, save_file

    model = tiny_model(rule="linear", layout="lolcats", feature_map="hedgehog")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".feature_map_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    old = {}
    for key, t in load_file(tmp_path / "model.safetensors").items():
        if ".feature_map_" in key:
            old.update({key.replace(".weight", f".layers.{h}.weight"): t[h].clone() for h in range(t.shape[0])})
        else:
            old[key] = t
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="one Linear per head .*trust_remote_code=True.*load_state_dict"):
        FWPForCausalLM.from_pretrained(tmp_path)
    fresh = tiny_model(seed=5, rule="linear", layout="lolcats", feature_map="hedgehog")
    fresh.load_state_dict(old, strict=False)  # the tied LM head is not in the file
    ids = torch.randint(3, 64, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)


def test_saved_files_get_the_default_modes(tmp_path):
    # safetensors writes its files 0600; a saved model folder is readable like any other files the user makes.
    import os

    umask = os.umask(0o022)
    try:
        tiny_model().save_pretrained(tmp_path / "new")
        tiny_model(seed=1).save_pretrained(tmp_path / "new")  # replacing an existing folder too
    finally:
        os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "new").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_save_pretrained_replaces_a_folder_whole_and_an_interrupted_save_leaves_the_old_model(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    ids = torch.arange(3, 12)[None]
    old, new = tiny_model(seed=0), tiny_model(seed=1, layout="lolcats")
    folder = tmp_path / "model"
    old.save_pretrained(folder, max_shard_size="20KB")  # sharded: its files must not survive the next save
    assert (folder / "model.safetensors.index.json").exists()
    (folder / "notes.txt").write_text("the user's own file stays")
    new.save_pretrained(folder)
    assert sorted(p.name for p in folder.glob("model*.safetensors*")) == ["model.safetensors"]
    assert (folder / "notes.txt").exists() and not list(tmp_path.glob(".model.tmp-*"))
    with torch.no_grad():
        torch.testing.assert_close(FWPForCausalLM.from_pretrained(folder)(ids).logits, new(ids).logits)

    real = PreTrainedModel.save_pretrained

    def killed_midway(self, save_directory, *args, **kwargs):
        real(self, save_directory, *args, **kwargs)
        (Path(save_directory) / "model.safetensors").write_bytes(b"truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        old.save_pretrained(folder)
    monkeypatch.undo()
    assert not list(tmp_path.glob(".model.tmp-*"))
    with torch.no_grad():  # still the complete earlier model
        torch.testing.assert_close(FWPForCausalLM.from_pretrained(folder)(ids).logits, new(ids).logits)
