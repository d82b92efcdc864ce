"""The distillation pipeline runs as 2 processes under torchrun on CPU (gloo backend)."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_pipeline_under_torchrun_two_processes(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from accelerate import PartialState
        from datasets import Dataset
        from transformers import LlamaConfig, LlamaForCausalLM
        from hf_fwp.conversion import pipeline
        from hf_fwp.conversion.data import pack
        from tests.conversion.test_stage2 import TEXT, _tokenizer

        torch.manual_seed(0)
        tok = _tokenizer()
        teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        blocks = pack(Dataset.from_dict({{"text": TEXT.splitlines()}}), tok, block_size=16)
        recipe = pipeline.Recipe(fwp_rule="linear", feature_map="hedgehog", block_size=16, batch_size=2,
                                 stage1_steps=3, stage2_steps=4, save_steps=2, lora_rank=4)
        result = pipeline.run(teacher, tok, blocks, blocks.select(range(4)), recipe, {str(tmp_path / 'out')!r},
                              progress=False)
        state = PartialState()
        if state.is_main_process:
            print("RESULT", json.dumps({{"processes": state.num_processes, "backend": str(state.backend),
                                         "ratio": result["ratio"]}}))
    """))
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script)], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    result = json.loads(line.split(" ", 1)[1])
    assert result["processes"] == 2 and result["backend"] == "gloo"
    state = json.loads((tmp_path / "out" / "stage2" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()
