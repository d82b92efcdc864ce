"""Stage 1 attention transfer: hooks capture the teacher, and training lowers the per-layer transfer error."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hf_fwp import convert
from hf_fwp.conversion import distill
from hf_fwp.conversion.distill import (TeacherAttentionCapture, attention_transfer, match_decays,
                                      teacher_attention_spans, transfer_errors)


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)).eval()


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      initializer_range=0.1)).eval()


def test_capture_matches_the_softmax_student_exactly():
    teacher = _llama()
    student = convert(teacher, keep_softmax="all")
    ids = torch.randint(0, 96, (2, 12))
    with TeacherAttentionCapture(teacher, [0, 1]) as cap:
        teacher(ids)
    assert set(cap.records) == {0, 1}
    hidden, out = cap.records[1]
    pe = student.model.rotary_emb(hidden, torch.arange(12)[None].expand(2, 12))
    torch.testing.assert_close(student.model.layers[1].self_attn(hidden, position_embeddings=pe), out,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make_teacher", [_llama, _gpt2])
def test_stage1_spares_the_teacher_its_logits_and_measures_the_same_errors(make_teacher, monkeypatch):
    teacher = make_teacher()
    student = convert(teacher, feature_map="hedgehog")
    batch = {"input_ids": torch.randint(0, 96, (2, 12))}
    shapes = []
    teacher.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    spared = transfer_errors(student, teacher, [batch])
    assert shapes == [(2, 1, 96)]  # one position's logits, not twelve
    monkeypatch.setattr(distill, "_hidden_only", lambda model: {})
    full = transfer_errors(student, teacher, [batch])
    assert shapes[-1] == (2, 12, 96)
    assert spared == pytest.approx(full, rel=1e-6) and all(e > 0 for e in full.values())


def test_capture_gives_the_teachers_attention_weights_and_restores_its_attention():
    teacher = _llama()
    impl = teacher.config._attn_implementation
    ids = torch.randint(0, 96, (2, 12))
    with TeacherAttentionCapture(teacher, [0, 1], weights=True) as cap:
        teacher(ids)
        during = teacher.config._attn_implementation
    assert during == "eager" and teacher.config._attn_implementation == impl
    teacher.set_attn_implementation("eager")
    reference = teacher(ids, output_attentions=True).attentions
    for i in (0, 1):
        assert cap.weights[i].shape == (2, 4, 12, 12)
        torch.testing.assert_close(cap.weights[i], reference[i])


@pytest.mark.parametrize("objective", ["attention", "both"])
def test_attention_weight_transfer_brings_the_fwps_rows_to_the_teachers(objective):
    from hf_fwp.conversion.distill import _layer_errors

    teacher = _llama()
    student = convert(teacher, fwp_rule="gated_linear", feature_map="hedgehog", qk_l2norm=False,
                      normalize_attention=True, use_short_conv=True, conv_activation=None, fwp_state_heads="query")
    batches = [{"input_ids": torch.randint(0, 96, (4, 24))} for _ in range(4)]
    held_out = {"input_ids": torch.randint(0, 96, (4, 24))}

    def cross_entropy():
        with torch.no_grad():
            return sum(e.item() for e in _layer_errors(student, teacher, held_out, "attention").values())

    before = cross_entropy()
    result = attention_transfer(student, teacher, batches, steps=30, lr=2e-2, progress=False, objective=objective)
    assert cross_entropy() < before - 0.05, (before, cross_entropy())
    assert set(result.after) == {0, 1} and len(result.losses) == 30  # reported as output MSE, whatever is trained
    with pytest.raises(ValueError, match="objective must be one of"):
        attention_transfer(student, teacher, batches, steps=1, objective="weights", progress=False)
    padded = {"input_ids": held_out["input_ids"], "attention_mask": torch.ones(4, 24, dtype=torch.long)}
    padded["attention_mask"][0, :3] = 0
    with pytest.raises(ValueError, match="unpadded"):
        attention_transfer(student, teacher, [padded], steps=1, objective=objective, progress=False)


@pytest.mark.parametrize("make_teacher, options, ratio", [
    (_llama, dict(fwp_rule="linear", feature_map="hedgehog", qk_l2norm=False, normalize_attention=True), 0.7),
    (_llama, dict(fwp_layer_type="hybrid_sliding", sliding_window=4, fwp_rule="linear", feature_map="hedgehog",
                  qk_l2norm=False, normalize_attention=True), 0.95),
    # Only gates and beta to train (identity features): a smaller but real improvement.
    (_llama, dict(fwp_rule="gated_delta"), 0.98),
    (_gpt2, dict(fwp_rule="gated_linear", feature_map="t2r", qk_l2norm=False, normalize_attention=True), 0.7),
])
def test_attention_transfer_lowers_the_error_and_trains_only_new_parameters(make_teacher, options, ratio):
    teacher = make_teacher()
    student = convert(teacher, **options)
    frozen = {n: p.clone() for n, p in student.named_parameters()}
    batches = [{"input_ids": torch.randint(0, 96, (4, 24))} for _ in range(4)]
    held_out = [{"input_ids": torch.randint(0, 96, (4, 24))}]
    result = attention_transfer(student, teacher, batches, steps=40, lr=2e-2, eval_batches=held_out, progress=False)
    assert set(result.before) == {0, 1}
    assert sum(result.after.values()) < ratio * sum(result.before.values()), result.table()
    assert result.after == transfer_errors(student, teacher, held_out)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, frozen[n])}
    assert changed and all(any(k in n for k in ("feature_map", "b_proj", "a_proj", "A_log", "dt_bias", "mix_logit"))
                           for n in changed), changed
    assert "| layer |" in result.table()


def test_an_all_softmax_student_is_told_there_is_nothing_to_distill():
    from hf_fwp.conversion.distill import trainable_fwp_parameters

    with pytest.raises(ValueError, match="Every layer stayed softmax"):
        trainable_fwp_parameters(convert(_llama(), keep_softmax="all"))


@pytest.mark.parametrize("make_teacher", [_llama, _gpt2])
def test_attention_spans_of_uniform_heads_are_half_the_prefix(make_teacher):
    # With zero queries every head spreads its attention evenly over the causal prefix: a query at position t reads
    # keys sinks..t, whose mean distance is (t - sinks) / 2; queries from a quarter of the block on are counted.
    teacher = make_teacher()
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name.endswith("q_proj.weight"):
                p.zero_()
            elif name.endswith("c_attn.weight"):
                p[:, :32].zero_()  # GPT-2's fused q, k, v: the first third of the columns are the queries
            elif name.endswith("c_attn.bias"):
                p[:32].zero_()
    impl = teacher.config._attn_implementation
    T, sinks = 24, 1
    spans = teacher_attention_spans(teacher, [{"input_ids": torch.randint(0, 96, (2, T))}], sinks=sinks)
    expected = torch.tensor([(t - sinks) / 2 for t in range(T // 4, T)]).mean()
    assert set(spans) == {0, 1}
    for span in spans.values():
        torch.testing.assert_close(span, expected.expand(4), rtol=1e-5, atol=1e-5)
    assert teacher.config._attn_implementation == impl  # the teacher is handed back as it was
    with pytest.raises(ValueError, match="unpadded"):
        teacher_attention_spans(teacher, [{"input_ids": torch.ones(1, T, dtype=torch.long),
                                           "attention_mask": torch.tensor([[0] + [1] * (T - 1)])}])


def test_attention_spans_of_heads_that_read_their_own_token_are_near_zero():
    # Queries equal to the keys, scaled up: every head attends mostly to its own token (distinct tokens per block;
    # a key of a larger norm can still win a query), so it reads about 0-1.5 tokens back, where the uniform heads
    # above read (t - 1) / 2 = 7.75 on average. Spans tell local heads from global ones.
    teacher = _llama()
    with torch.no_grad():
        for layer in teacher.model.layers:
            attn = layer.self_attn
            kv_heads = attn.k_proj.weight.view(2, 8, 32)  # query heads 2j and 2j + 1 read key/value head j
            attn.q_proj.weight.copy_(300 * kv_heads.repeat_interleave(2, dim=0).reshape(32, 32))
    ids = torch.stack([torch.randperm(96)[:24] for _ in range(2)])
    spans = teacher_attention_spans(teacher, [{"input_ids": ids}])
    assert all((s < 1.5).all() for s in spans.values()), spans


@pytest.mark.parametrize("state_heads", ["kv", "query"])
def test_match_decays_gives_each_state_head_its_teacher_heads_span(state_heads):
    teacher = _llama()  # 4 query heads, 2 key/value heads
    student = convert(teacher, fwp_rule="gated_linear", feature_map="hedgehog", qk_l2norm=False,
                      normalize_attention=True, fwp_state_heads=state_heads)
    spans = {0: torch.tensor([1.0, 3.0, 20.0, 60.0]), 1: torch.tensor([0.5, 0.5, 200.0, 200.0])}
    assert match_decays(student, spans) == [0, 1]
    for i, span in spans.items():
        attn = student.model.layers[i].self_attn
        gamma = torch.exp(-attn.A_log.exp() * torch.nn.functional.softplus(attn.dt_bias))
        want = span.view(attn.dt_bias.numel(), -1).mean(-1)
        torch.testing.assert_close(gamma / (1 - gamma), want, rtol=1e-4, atol=1e-4)
    # Rules without a decay are left alone.
    linear = convert(teacher, fwp_rule="linear", feature_map="hedgehog", qk_l2norm=False, normalize_attention=True)
    assert match_decays(linear, spans) == []
