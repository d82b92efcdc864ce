"""Stage 1 attention transfer: hooks capture the teacher, and training lowers the per-layer transfer error."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hf_fwp import convert
from hf_fwp.conversion.distill import TeacherAttentionCapture, attention_transfer, transfer_errors


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
