"""Model-level GPU comparison: an FWP model against a softmax Llama of the same size (SDPA / FlashAttention).

Both: 12 layers, hidden 1024, 8 heads x 128, MLP 2816, vocab 32000, bf16, batch 1. Prefill at T in {2048, 8192,
32768} (one forward, logits of the last token only), decode ms/token after an 8k and a 32k prompt (64 greedy
steps, eager), and one training step (forward + backward) at B=4, T=4096.

    python benchmarks/model_gpu.py                      # gated_delta vs Llama
    python benchmarks/model_gpu.py --rules gated_delta linear --profile 8192

``--profile T`` also prints the top CUDA kernels of one FWP prefill (torch.profiler). Writes
``results/model_gpu_<card>.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table  # noqa: E402

COMMON = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=8,
              head_dim=128, max_position_embeddings=65536)


def build(name: str):
    import hf_fwp  # noqa: F401  (registers the Auto classes)
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_fwp import FWPConfig, FWPForCausalLM

    if name == "llama_sdpa":
        return LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=8, attn_implementation="sdpa"))
    return FWPForCausalLM(FWPConfig(**COMMON, fwp_rule=name))


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=50, return_mode="median")


def decode_ms(model, T: int, steps: int = 64) -> float:
    ids = torch.randint(0, 32000, (1, T), device="cuda")
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        for _ in range(4):  # warm-up steps
            out = model(nxt, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(nxt, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", nargs="+", default=["gated_delta"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--decode-lengths", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--train", default="4x4096", help="BxT of the training step ('' to skip)")
    ap.add_argument("--profile", type=int, default=0, help="profile one FWP prefill at this T")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("model_gpu.py needs a CUDA GPU.")
    card = torch.cuda.get_device_name()
    rows = []
    for name in ["llama_sdpa"] + args.rules:
        model = build(name).to("cuda", torch.bfloat16).eval()
        for T in args.lengths:
            ids = torch.randint(0, 32000, (1, T), device="cuda")
            with torch.no_grad():
                ms = bench(lambda: model(ids, use_cache=False, logits_to_keep=1))
            rows.append([name, "prefill", f"B1 T{T}", f"{ms:.1f}", f"{T / ms * 1e3:,.0f}"])
            print(" | ".join(rows[-1]), flush=True)
        for T in args.decode_lengths:
            ms = decode_ms(model, T)
            rows.append([name, "decode ms/token", f"B1 after T{T}", f"{ms:.2f}", f"{1e3 / ms:,.0f}"])
            print(" | ".join(rows[-1]), flush=True)
            torch.cuda.empty_cache()
        if args.train:
            B, T = (int(s) for s in args.train.split("x"))
            model.train()
            ids = torch.randint(0, 32000, (B, T), device="cuda")
            ms = bench(lambda: model(ids, labels=ids, use_cache=False).loss.backward())
            rows.append([name, "train fwd+bwd", f"B{B} T{T}", f"{ms:.1f}", f"{B * T / ms * 1e3:,.0f}"])
            print(" | ".join(rows[-1]), flush=True)
        if args.profile and name != "llama_sdpa":
            from torch.profiler import ProfilerActivity, profile

            ids = torch.randint(0, 32000, (1, args.profile), device="cuda")
            model.eval()
            with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(ids, use_cache=False, logits_to_keep=1)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
        del model
        torch.cuda.empty_cache()
    table = markdown_table(["model", "what", "shape", "ms", "tokens/s"], rows)
    note = f"{card}; torch {torch.__version__}; bf16; 12 layers, hidden 1024, 8 x 128 heads; do_bench medians."
    print("\n" + table + "\n\n" + note)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"model_gpu_{card.replace(' ', '_')}.md"
    path.write_text(table + "\n\n" + note + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
