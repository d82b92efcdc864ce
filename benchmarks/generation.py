"""CPU generation benchmark: one backbone with all-FWP layers (Gated DeltaNet) vs all-softmax layers.

    python benchmarks/generation.py                            # contexts 1k, 2k, 4k, 8k, 16k
    python benchmarks/generation.py --contexts 1024 4096       # pick the contexts
    python benchmarks/generation.py --quick                    # a smoke run at tiny contexts

Both models share every backbone setting (hidden 256, 4 layers, 4 heads of dim 64, vocab 1000, random weights from
one seed); only ``layer_types`` differs: ``"linear_attention"`` with the ``gated_delta`` rule vs
``"full_attention"``. For each context length T:

* prefill: one ``no_grad`` forward of T tokens with ``use_cache=True`` (``logits_to_keep=1``, as ``generate``
  does), median wall time over repeats within ``--prefill-budget`` seconds (at least one);
* decode: median wall time of ``--decode-steps`` single-token greedy steps continuing from that cache;
* cache: bytes of every tensor the cache holds right after prefill (KV tensors of softmax layers, recurrent and
  conv states of FWP layers).

Prints markdown tables (per layout and context; softmax / FWP ratios per context) and writes
``results/generation.md`` and ``results/generation.png`` (decode ms/token and cache MB against context).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_description, markdown_table, timeit  # noqa: E402

from hf_fwp import FWPCache, FWPConfig, FWPForCausalLM  # noqa: E402

LAYOUTS = {"FWP (gated_delta)": "linear_attention", "softmax": "full_attention"}


def build_model(layer_type: str, args: argparse.Namespace, max_positions: int) -> FWPForCausalLM:
    config = FWPConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        head_dim=args.hidden_size // args.heads,
        max_position_embeddings=max_positions,
        layer_types=[layer_type] * args.layers,
        fwp_rule="gated_delta",
    )
    torch.manual_seed(args.seed)
    return FWPForCausalLM(config).eval()


def tensor_bytes(obj, seen: set[int]) -> int:
    """Bytes of the tensors in ``obj`` (a tensor, or a dict / list / tuple of them, nested), each counted once."""
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def cache_nbytes(cache: FWPCache) -> int:
    """Total bytes held by a cache: walks every layer object's attributes (``keys`` / ``values`` of KV layers,
    ``recurrent_states`` / ``conv_states`` dicts of linear-attention layers, whatever else is a tensor)."""
    seen: set[int] = set()
    return sum(tensor_bytes(value, seen) for layer in cache.layers for value in vars(layer).values())


@torch.no_grad()
def prefill(model: FWPForCausalLM, input_ids: torch.Tensor) -> tuple[FWPCache, torch.Tensor]:
    out = model(input_ids, use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[:, -1:].argmax(dim=-1)


@torch.no_grad()
def decode_ms_per_token(model: FWPForCausalLM, cache: FWPCache, next_token: torch.Tensor, steps: int) -> float:
    """Median milliseconds of ``steps`` greedy single-token forwards that continue (and extend) ``cache``."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(next_token, cache=cache, use_cache=True)
        times.append(time.perf_counter() - start)
        next_token = out.logits[:, -1:].argmax(dim=-1)
    return statistics.median(times) * 1e3


def measure(model: FWPForCausalLM, context: int, args: argparse.Namespace) -> dict[str, float]:
    input_ids = torch.randint(0, args.vocab_size, (1, context), generator=torch.Generator().manual_seed(args.seed))
    last: dict[str, tuple] = {}

    def run_prefill():
        last["result"] = prefill(model, input_ids)

    prefill_ms = timeit(run_prefill, min_reps=1, budget_s=args.prefill_budget, warmup=0)
    cache, next_token = last["result"]
    cache_bytes = cache_nbytes(cache)  # before decoding grows the KV cache
    decode_ms = decode_ms_per_token(model, cache, next_token, args.decode_steps)
    return {"prefill_s": prefill_ms / 1e3, "decode_ms": decode_ms, "cache_mb": cache_bytes / 2**20}


def plot(results: dict, contexts: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_decode, ax_cache) = plt.subplots(1, 2, figsize=(11, 4))
    for layout in LAYOUTS:
        ax_decode.plot(contexts, [results[layout, T]["decode_ms"] for T in contexts], "o-", label=layout)
        ax_cache.plot(contexts, [results[layout, T]["cache_mb"] for T in contexts], "o-", label=layout)
    ax_decode.set(xscale="log", xlabel="context (tokens)", ylabel="ms / token", title="decode time per token")
    ax_cache.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="MB", title="cache size after prefill")
    for ax in (ax_decode, ax_cache):
        ax.set_xticks(contexts, [f"{T // 1024}k" if T >= 1024 else str(T) for T in contexts])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=1000)
    ap.add_argument("--decode-steps", type=int, default=32, help="single-token steps timed after each prefill")
    ap.add_argument("--prefill-budget", type=float, default=2.0,
                    help="seconds of prefill repeats per measurement (the median is reported; at least one run)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke run at tiny contexts")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.contexts, args.decode_steps, args.prefill_budget = [64, 128], 4, 0.0
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    contexts = sorted(args.contexts)
    max_positions = contexts[-1] + args.decode_steps
    models = {layout: build_model(layer_type, args, max_positions) for layout, layer_type in LAYOUTS.items()}
    print(f"machine: {machine_description()}\n")
    for model in models.values():  # one untimed pass through every code path
        cache, token = prefill(model, torch.zeros(1, min(contexts), dtype=torch.long))
        decode_ms_per_token(model, cache, token, 2)

    results, rows = {}, []
    for T in contexts:
        for layout, model in models.items():
            r = results[layout, T] = measure(model, T, args)
            rows.append([layout, T, f"{r['prefill_s']:.3f}", f"{r['decode_ms']:.2f}", f"{r['cache_mb']:.2f}"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    fwp, soft = LAYOUTS
    ratio_rows = [[T, f"{results[soft, T]['decode_ms'] / results[fwp, T]['decode_ms']:.1f}x",
                   f"{results[soft, T]['cache_mb'] / results[fwp, T]['cache_mb']:.0f}x",
                   f"{results[soft, T]['prefill_s'] / results[fwp, T]['prefill_s']:.2f}x"] for T in contexts]

    table = markdown_table(["layout", "context", "prefill s", "decode ms/token", "cache MB"], rows)
    ratios = markdown_table(["context", "decode time softmax/FWP", "cache bytes softmax/FWP",
                             "prefill time softmax/FWP"], ratio_rows)
    backbone = (f"hidden {args.hidden_size}, {args.layers} layers, {args.heads} heads of dim "
                f"{args.hidden_size // args.heads}, vocab {args.vocab_size}, fp32, batch 1")
    note = (f"{backbone}; {machine_description()}. Prefill: median of repeats within {args.prefill_budget:g} s "
            f"(at least one). Decode: median of {args.decode_steps} greedy single-token steps after the prefill. "
            "Cache: all tensors the cache holds after prefill. Ratios above 1 favour FWP.")
    print(f"\n{table}\n\n{ratios}\n\n{note}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generation.md").write_text(f"{table}\n\n{ratios}\n\n{note}\n")
    plot(results, contexts, args.out / "generation.png", f"Generation on CPU: {backbone}")
    print(f"\nwrote {args.out / 'generation.md'} and {args.out / 'generation.png'}")
    return results


if __name__ == "__main__":
    main()
