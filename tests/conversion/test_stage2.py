"""Stage 2 (LoRA + logit distillation with a Trainer subclass) and the data pipeline."""

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainingArguments

from hf_fwp import convert
from hf_fwp.conversion.data import load_text, pack
from hf_fwp.conversion.trainer import DistillationTrainer, add_lora, distillation_kl, mean_kl

TEXT = ("the quick brown fox jumps over the lazy dog . " * 3 + "\n") * 20


def _tokenizer():
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *sorted(set(TEXT.split()))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_local_files_are_tokenised_and_packed(tmp_path, suffix):
    lines = [line for line in TEXT.splitlines() if line] + ["", "  "]
    path = tmp_path / f"data{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(lines))  # paragraphs: one document each
    else:
        getattr(Dataset.from_dict({"text": lines}), "to_json" if suffix == ".jsonl" else "to_parquet")(str(path))
    tok = _tokenizer()
    blocks = pack(load_text(path), tok, block_size=16)
    per_line = len(tok(lines[0])["input_ids"]) + 1  # + EOS between documents
    assert len(blocks) == (20 * per_line) // 16
    assert all(len(b) == 16 for b in blocks["input_ids"]) and blocks["labels"] == blocks["input_ids"]
    flat = [t for b in blocks["input_ids"] for t in b]
    assert flat[:per_line] == tok(lines[0])["input_ids"] + [tok.eos_token_id]


def test_text_files_keep_their_line_breaks_within_a_paragraph(tmp_path):
    tok = _tokenizer()
    (tmp_path / "a.txt").write_text("first line of a paragraph\nits second line\n\nnext paragraph\n")
    ds = load_text(tmp_path / "a.txt")
    assert ds["text"][:2] == ["first line of a paragraph\nits second line", "next paragraph\n"]
    # EOS only between the paragraphs, never inside a sentence.
    ids = pack(ds, tok, block_size=4)["input_ids"]
    flat = [t for b in ids for t in b]
    first = tok("first line of a paragraph\nits second line")["input_ids"]
    assert flat[: len(first) + 1] == first + [tok.eos_token_id]
    # A column of numbers is not text: a one-line error, not a crash inside datasets.
    (tmp_path / "n.jsonl").write_text('{"text": 123}\n{"text": "abc"}\n')
    with pytest.raises(ValueError, match="holds int values such as 123, not text"):
        pack(load_text(tmp_path / "n.jsonl"), tok, block_size=4)


def test_bad_data_sources(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="suffix in"):
        load_text(tmp_path / "x.csv")
    (tmp_path / "y.jsonl").write_text('{"body": "hi"}\n')
    with pytest.raises(ValueError, match="no column 'text'"):
        load_text(tmp_path / "y.jsonl")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="are empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match="Cannot read .*bad.jsonl.* as json data"):
        load_text(tmp_path / "bad.jsonl")
    (tmp_path / "short.txt").write_text("a few words\n")
    with pytest.raises(ValueError, match="shorter than one block of 64 tokens"):
        pack(load_text(tmp_path / "short.txt"), _tokenizer(), block_size=64)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_blocked_kl_equals_the_written_out_kl_and_its_gradient(T):
    torch.manual_seed(0)
    s = torch.randn(2, 7, 11, dtype=torch.float64, requires_grad=True)
    t = 3 * torch.randn(2, 7, 11, dtype=torch.float64)
    w = torch.rand(2, 7, dtype=torch.float64)
    log_p, log_q = torch.log_softmax(t / T, -1), torch.log_softmax(s / T, -1)
    expected = (log_p.exp() * (log_p - log_q)).sum(-1)
    (expected * w).sum().backward()
    grad, s.grad = s.grad, None
    kl = distillation_kl(s, t, T, rows=3)  # 14 rows: blocks of 3 and a last one of 2
    ((kl * w).sum()).backward()
    torch.testing.assert_close(kl, expected.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s.grad, grad, atol=1e-6, rtol=1e-5)
    assert s.grad.dtype == s.dtype and (kl >= -1e-6).all()
    with pytest.raises(ValueError, match="one shape.*vocabulary"):
        distillation_kl(s, t[..., :10])


def test_distillation_lowers_kl_and_merges(tmp_path):
    torch.manual_seed(0)
    tok = _tokenizer()
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           initializer_range=0.2)).eval()
    student = convert(teacher, fwp_rule="linear", feature_map="hedgehog", qk_l2norm=False, normalize_attention=True)
    data = pack(Dataset.from_dict({"text": TEXT.splitlines()}), tok, block_size=24)
    batches = [{"input_ids": torch.tensor(data["input_ids"][:4])}]
    before = mean_kl(student, teacher, batches)
    model = add_lora(student, rank=4, alpha=8, train_fwp=True)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, learning_rate=5e-3, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_steps=10)
    trainer = DistillationTrainer(model=model, args=args, train_dataset=data, teacher=teacher, temperature=2.0,
                                  ce_weight=0.1)
    trainer.train()
    model.eval()
    after = mean_kl(model, teacher, batches)
    assert after < 0.8 * before, (before, after)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merged = model.merge_and_unload()(ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_evaluation_reports_perplexity_samples_and_speed():
    from hf_fwp.conversion.evaluate import compare, perplexity, report

    torch.manual_seed(0)
    tok = _tokenizer()
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    student = convert(teacher, keep_softmax="all")
    blocks = pack(Dataset.from_dict({"text": TEXT.splitlines()}), tok, block_size=12)
    ppl = perplexity(teacher, blocks)
    # A near-uniform random model has perplexity close to the vocabulary size.
    assert 0.5 * len(tok) < ppl < 2 * len(tok)
    result = compare(teacher, student, tok, blocks, ["the quick brown"], max_new_tokens=5)
    assert result["ratio"] == pytest.approx(1.0, abs=1e-4)
    assert result["teacher"]["samples"] == result["student"]["samples"]
    assert result["student"]["tokens_per_s"] > 0
    assert "student / teacher perplexity (mean over 1 held-out set): 1.000" in report(result)
    assert result["agreement"] == 1.0  # the exact conversion predicts the teacher's every next token

    # Several held-out sets: each is reported, and the mean of their ratios is the headline number.
    fwp = convert(teacher, fwp_rule="linear", feature_map="hedgehog", normalize_attention=True, qk_l2norm=False)
    sets = {"first": blocks.select(range(2)), "rest": blocks.select(range(2, len(blocks)))}
    result = compare(teacher, fwp, tok, sets, ["the quick brown"], max_new_tokens=5)
    ratios = [result["sets"][k]["ratio"] for k in sets]
    assert result["ratio"] == pytest.approx(sum(ratios) / 2) and all(r != pytest.approx(1.0) for r in ratios)
    other = LlamaForCausalLM(teacher.config).eval()  # another random model predicts other tokens
    assert compare(teacher, other, tok, sets, ["the quick brown"], max_new_tokens=5)["agreement"] < 1
    text = report(result)
    assert "| first |" in text and "| rest |" in text and "| **mean** |" in text


def test_resume_skips_incomplete_checkpoints(tmp_path):
    from hf_fwp.conversion.trainer import EXTRA_WEIGHTS, last_complete_checkpoint

    for step, files in [(3, ["trainer_state.json", EXTRA_WEIGHTS]), (6, ["trainer_state.json"]), (9, [EXTRA_WEIGHTS]),
                        (12, [])]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in files:
            (folder / name).write_text("x")
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint"):
        assert last_complete_checkpoint(tmp_path, needs_extra=True) == str(tmp_path / "checkpoint-3")
    with pytest.warns(UserWarning):
        assert last_complete_checkpoint(tmp_path, needs_extra=False) == str(tmp_path / "checkpoint-6")
    assert last_complete_checkpoint(tmp_path / "absent", needs_extra=True) is None
