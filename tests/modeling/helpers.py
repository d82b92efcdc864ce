"""Tiny random FWP configs for the model tests."""

from __future__ import annotations

import json
import os
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


# Prepended to the scripts of run_isolated: hide packages from the interpreter as if not installed.
_HIDE = """
import importlib.abc, sys
class _Hidden(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Hidden())
"""


def run_isolated(code: str, cwd: Path, *, hide=("hf_fwp", "hf_fwp_cli", "triton"), modules_cache=None):
    """Run ``code`` in a new interpreter in ``cwd`` (outside the repository) where the ``hide`` packages cannot be
    imported (default: hf-fwp and Triton, i.e. a machine with only transformers and torch) and transformers keeps
    its remote-code modules in their own cache; returns the completed process, raising on a non-zero exit."""
    script = f"HIDDEN = {tuple(hide)!r}\n" + _HIDE + textwrap.dedent(code)
    env = dict(os.environ, HF_MODULES_CACHE=str(modules_cache or Path(cwd) / "hf_modules_cache"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, env=env)
    if out.returncode:
        raise AssertionError(f"the isolated interpreter failed:\n{out.stderr[-3000:]}")
    return out


def load_in_fresh_process(folders, ids: torch.Tensor, prompt: torch.Tensor, max_new_tokens: int = 4, *,
                          hide=("hf_fwp", "hf_fwp_cli", "triton"), import_hf_fwp: bool = False, modules_cache=None):
    """Load each folder as remote code (``trust_remote_code=True``) in a new interpreter; return, per folder (or
    the one dict for a single folder): the model's module, the modules of all its submodule classes, its logits
    on ``ids``, its greedy continuation of ``prompt``, and with a tokenizer its class and the text-generation
    ``pipeline``'s greedy output on "Hello".

    ``hide``: as in :func:`run_isolated`; ``import_hf_fwp`` imports the installed package first instead (a user
    who has it).
    """
    single = isinstance(folders, (str, Path))
    folders = [str(folders)] if single else [str(f) for f in folders]
    hide = () if import_hf_fwp else tuple(hide)
    code = f"""
        import json, os, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
        if {import_hf_fwp!r}:
            import hf_fwp
        results = []
        for folder in {folders!r}:
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
            tok = text = None
            if os.path.exists(os.path.join(folder, "tokenizer_config.json")):
                tok = type(AutoTokenizer.from_pretrained(folder)).__name__
                generator = pipeline("text-generation", model=folder, trust_remote_code=True)
                text = generator("Hello", max_new_tokens=3, do_sample=False)[0]["generated_text"]
            with torch.no_grad():
                logits = model(torch.tensor({ids.tolist()})).logits
                gen = model.generate(torch.tensor({prompt.tolist()}), max_new_tokens={max_new_tokens},
                                     do_sample=False)
            results.append({{"module": type(model).__module__, "logits": logits.tolist(), "gen": gen.tolist(),
                             "tokenizer": tok, "pipeline_text": text,
                             "class_modules": sorted({{type(m).__module__ for m in model.modules()}}),
                             "hf_fwp_version": json.load(open(os.path.join(folder, "config.json")))["hf_fwp_version"]}})
        print("RESULTS " + json.dumps(results))
    """
    out = run_isolated(code, Path(folders[0]).parent, hide=hide, modules_cache=modules_cache)
    results = json.loads(out.stdout.split("RESULTS ")[-1].splitlines()[0])
    for result in results:
        result["logits"] = torch.tensor(result["logits"])
    return results[0] if single else results
