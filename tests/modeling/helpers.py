"""Tiny random FWP configs for the model tests."""

from __future__ import annotations

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
