"""CLI smoke tests for convert / distill / eval / generate / push on a tiny local teacher."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_fwp.cli import main
from tests.conversion.test_stage2 import TEXT, _tokenizer


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = _tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None))
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    (root / "train.txt").write_text(TEXT * 2)
    return root


def test_convert_generate_and_errors(teacher_dir, capsys):
    out = teacher_dir / "converted"
    assert main(["convert", str(teacher_dir / "teacher"), str(out), "--keep-softmax", "every:2"]) == 0
    assert "1 FWP layers" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "the quick", "--max-new-tokens", "4"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert main(["convert", str(teacher_dir / "teacher"), str(out), "--keep-softmax", "every:x"]) == 2
    assert "every:K" in capsys.readouterr().err
    assert main(["convert", str(teacher_dir / "teacher"), str(out), "--layer-type", "hybrid_sliding"]) == 2
    assert "needs sliding_window" in capsys.readouterr().err
    assert main(["convert", str(teacher_dir / "missing.gguf"), str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(teacher_dir / "teacher"), str(out), "--rule", "mamba"])


def test_distill_eval_push(teacher_dir, capsys):
    run = teacher_dir / "run"
    args = ["distill", str(teacher_dir / "teacher"), str(run), "--data", str(teacher_dir / "train.txt"),
            "--block-size", "16", "--stage1-steps", "3", "--stage2-steps", "3", "--feature-map", "hedgehog",
            "--rule", "linear"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "student / teacher perplexity" in out and (run / "model" / "README.md").exists()
    assert main(args) == 2 and "not empty" in capsys.readouterr().err
    assert main(["eval", str(run / "model"), "--teacher", str(teacher_dir / "teacher"), "--data",
                 str(teacher_dir / "train.txt"), "--block-size", "16", "--max-blocks", "4"]) == 0
    assert "| student |" in capsys.readouterr().out
    assert main(["push", str(run / "model"), "me/tiny-fwp", "--dry-run"]) == 0
    listing = capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "modeling_fwp.py", "configuration_fwp.py", "README.md",
                 "tokenizer.json", "generation_config.json"):
        assert f"  {name}\n" in listing
    assert "checkpoint" not in listing
    assert main(["push", str(run), "me/x", "--dry-run"]) == 2
    assert "not a saved model folder" in capsys.readouterr().err
    assert main(["distill", str(teacher_dir / "teacher"), str(teacher_dir / "r2"), "--data", "nofile.txt"]) == 2
    assert "not found" in capsys.readouterr().err
