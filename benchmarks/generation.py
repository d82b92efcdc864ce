"""Generation benchmark: an FWP model against the same-size Llama, eager and compiled, at batch 1 and 32.

    python benchmarks/generation.py            # CPU: 4 layers x 256, contexts 128 / 1k / 4k; GPU: 12 x 1024, 1k / 8k / 32k
    python benchmarks/generation.py --quick    # a smoke run (tiny contexts, compile backend "eager")

Both models share vocab, hidden size, layers, heads, MLP and random weights' scale. FWP: every layer
``linear_attention`` with the ``gated_delta`` rule (Gated DeltaNet: short conv, L2-normalised q/k, output gate).
Llama: transformers' ``LlamaForCausalLM`` with SDPA and a growing KV cache. Modes:

* ``eager``: ``generate()`` with the default cache (:class:`~hf_fwp.FWPCache`, transformers' ``DynamicCache``);
* ``compiled``: ``generate(cache_implementation="static", compile_config=...)``: transformers compiles the decode
  step (``torch.compile``; on CUDA ``mode="reduce-overhead"``, i.e. CUDA graphs); the fair peer for both.

Everything is measured through ``generate()`` itself: a streamer timestamps each new token, so prefill is the time
to the first new token and decode the median interval between the later ones (``--new-tokens`` of them);
tokens/s = batch / decode time; cache = bytes the cache holds at the end. A warm-up call per cell (not timed)
compiles. Prints tables and writes ``results/generation{_gpu}.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_description, markdown_table, sync  # noqa: E402

from hf_fwp import FWPConfig, FWPForCausalLM  # noqa: E402

MODES = ("eager", "compiled")


def build_models(args: argparse.Namespace) -> dict:
    """``{"FWP (gated_delta)": model, "Llama": model}`` with one backbone, on ``args.device`` in ``args.dtype``."""
    common = dict(vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                  head_dim=args.hidden_size // args.heads, max_position_embeddings=max(args.contexts) + 2 * args.new_tokens,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(args.seed)
    fwp = FWPForCausalLM(FWPConfig(layer_types=["linear_attention"] * args.layers, fwp_rule="gated_delta", **common))
    torch.manual_seed(args.seed)
    llama = LlamaForCausalLM(LlamaConfig(attn_implementation="sdpa", **common))
    return {name: m.to(device=args.device, dtype=args.dtype).eval()
            for name, m in (("FWP (gated_delta)", fwp), ("Llama", llama))}


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


def cache_nbytes(cache) -> int:
    """Total bytes held by a cache: walks every layer object's attributes (``keys`` / ``values`` of KV layers,
    ``recurrent_states`` / ``conv_states`` dicts of linear-attention layers, whatever else is a tensor)."""
    seen: set[int] = set()
    return sum(tensor_bytes(value, seen) for layer in cache.layers for value in vars(layer).values())


class TokenClock(BaseStreamer):
    """Timestamps every ``put`` of ``generate`` (the prompt first, then each new token)."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def put(self, value):
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def compile_config(args: argparse.Namespace) -> CompileConfig:
    mode = args.compile_mode or ("reduce-overhead" if args.device == "cuda" else "default")
    config = CompileConfig(backend=args.compile_backend, mode=None if args.compile_backend != "inductor" else mode)
    config._compile_all_devices = True  # generate() compiles on CUDA only unless told otherwise
    return config


@torch.no_grad()
def timed_generate(model, ids: torch.Tensor, new_tokens: int, mode: str, args: argparse.Namespace) -> dict:
    """One greedy ``generate`` of exactly ``new_tokens`` tokens -> prefill s, decode ms/token, cache bytes."""
    clock = TokenClock(args.device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                  return_dict_in_generate=True, attention_mask=torch.ones_like(ids))
    if mode == "compiled":
        # One cache length for every call of a context: the warm-up's graphs serve the timed call.
        kwargs.update(cache_implementation="static", compile_config=compile_config(args),
                      max_cache_len=ids.shape[1] + 2 * args.new_tokens)
    sync(args.device)
    start = time.perf_counter()
    out = model.generate(ids, **kwargs)
    stamps = clock.stamps[1:]  # the first put is the prompt
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"prefill_s": stamps[0] - start, "decode_ms": statistics.median(gaps) * 1e3 if gaps else float("nan"),
            "cache_mb": cache_nbytes(out.cache) / 2**20}


def measure(model, context: int, batch: int, mode: str, args: argparse.Namespace) -> dict:
    ids = torch.randint(3, args.vocab_size, (batch, context), generator=torch.Generator().manual_seed(args.seed))
    ids = ids.to(args.device)
    if mode == "compiled":
        # Each cell compiles afresh: models of one class share code objects, and their accumulated graphs would hit
        # dynamo's recompile limit (then it silently runs eagerly) and make later cells depend on earlier ones.
        torch._dynamo.reset()
    try:
        warm = time.perf_counter()
        timed_generate(model, ids, 4, mode, args)  # compiles (compiled mode) and warms caches
        warm = time.perf_counter() - warm
        r = timed_generate(model, ids, args.new_tokens, mode, args)
    except torch.OutOfMemoryError:
        if args.device == "cuda":
            torch.cuda.empty_cache()
        return {"prefill_s": float("nan"), "decode_ms": float("nan"), "cache_mb": float("nan"), "warmup_s": 0.0,
                "tokens_per_s": float("nan"), "oom": True}
    r["warmup_s"] = warm
    r["tokens_per_s"] = batch * 1e3 / r["decode_ms"]
    return r


def plot(results: dict, args: argparse.Namespace, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k[0] for k in results})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    small, big = min(args.batches), max(args.batches)
    for name in names:
        for mode in args.modes:
            label = f"{name}, {mode}"
            axes[0].plot(args.contexts, [results[name, mode, small, T]["decode_ms"] for T in args.contexts], "o-",
                         label=label)
            axes[1].plot(args.contexts, [results[name, mode, big, T]["tokens_per_s"] for T in args.contexts], "o-",
                         label=label)
        axes[2].plot(args.contexts, [results[name, args.modes[0], small, T]["cache_mb"] for T in args.contexts],
                     "o-", label=name)
    axes[0].set(ylabel="ms / token", title=f"decode, batch {small}")
    axes[1].set(ylabel="tokens / s", title=f"decode throughput, batch {big}")
    axes[2].set(ylabel="MiB", yscale="log", title=f"cache, batch {small} ({args.modes[0]})")
    for ax in axes:
        ax.set(xscale="log", xlabel="context (tokens)")
        ax.set_xticks(args.contexts, [f"{T // 1024}k" if T >= 1024 else str(T) for T in args.contexts])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768] if gpu else [128, 1024, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--hidden-size", type=int, default=1024 if gpu else 256)
    ap.add_argument("--layers", type=int, default=12 if gpu else 4)
    ap.add_argument("--heads", type=int, default=8 if gpu else 4)
    ap.add_argument("--vocab-size", type=int, default=32000 if gpu else 1000)
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per timed call")
    ap.add_argument("--dtype", default="bfloat16" if gpu else "float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: reduce-overhead on CUDA)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads (CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny contexts, batches 1 and 2, eager backend")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.contexts, args.batches, args.new_tokens, args.compile_backend = [16, 48], [1, 2], 6, "eager"
    args.contexts, args.batches = sorted(args.contexts), sorted(args.batches)
    args.device = "cuda" if gpu else "cpu"
    args.dtype = getattr(torch, args.dtype)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    models = build_models(args)
    print(f"machine: {machine_description()}\n")
    results, rows = {}, []
    for T in args.contexts:
        for batch in args.batches:
            for name, model in models.items():
                for mode in args.modes:
                    r = results[name, mode, batch, T] = measure(model, T, batch, mode, args)
                    rows.append([name, mode, batch, T, f"{r['prefill_s']:.3f}", f"{r['decode_ms']:.2f}",
                                 f"{r['tokens_per_s']:.0f}", f"{r['cache_mb']:.2f}", f"{r['warmup_s']:.1f}"])
                    print(" | ".join(str(c) for c in rows[-1]), flush=True)
    fwp, llama = models
    ratio_rows = []
    for T in args.contexts:
        for batch in args.batches:
            for mode in args.modes:
                a, b = results[fwp, mode, batch, T], results[llama, mode, batch, T]
                ratio_rows.append([T, batch, mode, f"{b['decode_ms'] / a['decode_ms']:.2f}x",
                                   f"{b['cache_mb'] / a['cache_mb']:.1f}x", f"{b['prefill_s'] / a['prefill_s']:.2f}x"])
    table = markdown_table(["model", "mode", "batch", "context", "prefill s", "decode ms/token", "tokens/s",
                            "cache MiB", "warm-up s"], rows)
    ratios = markdown_table(["context", "batch", "mode", "decode speed FWP / Llama", "cache Llama / FWP",
                             "prefill speed FWP / Llama"], ratio_rows)
    backbone = (f"{args.layers} layers, hidden {args.hidden_size}, {args.heads} heads of "
                f"{args.hidden_size // args.heads}, vocab {args.vocab_size}, {str(args.dtype).split('.')[-1]}")
    cc = compile_config(args)
    note = (f"{backbone}; {machine_description()}. Through generate(): prefill = time to the first new token, decode "
            f"= median interval of {args.new_tokens} greedy tokens, tokens/s = batch / decode time, cache = bytes "
            f"held at the end (static caches are preallocated to context + {2 * args.new_tokens}). 'compiled' = "
            f"cache_implementation='static' + compile_config (backend {cc.backend}, mode {cc.mode}); warm-up = an "
            "untimed 4-token call first (compilation). Ratios above 1 favour FWP.")
    print(f"\n{table}\n\n{ratios}\n\n{note}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "generation_gpu" if args.device == "cuda" else "generation"
    (args.out / f"{stem}.md").write_text(f"`python benchmarks/generation.py`\n\n{table}\n\n{ratios}\n\n{note}\n")
    plot(results, args, args.out / f"{stem}.png", f"Generation ({args.device}): {backbone}")
    print(f"\nwrote {args.out / (stem + '.md')} and {args.out / (stem + '.png')}")
    return results


if __name__ == "__main__":
    main()
