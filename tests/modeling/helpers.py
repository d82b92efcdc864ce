"""Tiny random FWP configs for the model tests."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from hf_fwp import FWPConfig, FWPForCausalLM

LAYOUTS = {
    "fwp": ["linear_attention", "linear_attention"],
    "hybrid": ["full_attention", "linear_attention", "sliding_attention"],
    "lolcats": ["hybrid_sliding", "linear_attention"],
}


def tiny_config(rule="gated_delta", layout="fwp", **kw) -> FWPConfig:
    """A model small enough to run in milliseconds, with weights large enough that bugs change the logits."""
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                layer_types=LAYOUTS[layout], num_hidden_layers=len(LAYOUTS[layout]), sliding_window=4,
                fwp_rule=rule, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return FWPConfig(**base)


def tiny_model(seed=0, **kw) -> FWPForCausalLM:
    torch.manual_seed(seed)
    return FWPForCausalLM(tiny_config(**kw)).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def load_in_fresh_process(folder: Path, ids: torch.Tensor, prompt: torch.Tensor, max_new_tokens: int = 4) -> dict:
    """Load ``folder`` as remote code in a new interpreter that never imported ``hf_fwp``; return its module name,
    its logits on ``ids``, its greedy continuation of ``prompt`` and, when the folder has one, the tokenizer class."""
    script = textwrap.dedent(f"""
        import json, os, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        assert "hf_fwp" not in sys.modules
        folder = {str(folder)!r}
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        tok = None
        if os.path.exists(os.path.join(folder, "tokenizer_config.json")):
            tok = type(AutoTokenizer.from_pretrained(folder)).__name__
        with torch.no_grad():
            logits = model(torch.tensor({ids.tolist()})).logits
            gen = model.generate(torch.tensor({prompt.tolist()}), max_new_tokens={max_new_tokens}, do_sample=False)
        print(json.dumps({{"module": type(model).__module__, "logits": logits.tolist(), "gen": gen.tolist(),
                           "tokenizer": tok}}))
    """)
    # Run outside the repository so that nothing but the saved folder and installed packages is importable.
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=folder.parent)
    if out.returncode:
        raise AssertionError(f"loading {folder} as remote code failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["logits"] = torch.tensor(result["logits"])
    return result
