"""``hf-fwp``: the command line, a thin layer over the public API.

Subcommands register themselves in :data:`COMMANDS` (name -> (add_arguments, run); their one-line helps live in
the light entry module ``hf_fwp_cli``, which answers ``--version`` and ``--help`` without importing torch); user
mistakes raise :class:`CLIError` and are printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import hf_fwp


class CLIError(Exception):
    """A user mistake (bad option, missing file): printed as ``hf-fwp: error: ...`` with exit status 2."""


def _env_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="device to report the auto backend for (default: cuda if present)")


def _env_run(args: argparse.Namespace) -> int:
    import platform

    import torch

    from hf_fwp.modeling.ops_dispatch import resolve_backend, triton_available

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        probe = torch.empty(1, 1024, 1, 1, device=device)  # a long prompt: what a prefill would use
    except (RuntimeError, AssertionError) as e:
        raise CLIError(f"device {device!r} is not usable here: {e}") from None
    rows = [
        ("hf-fwp", hf_fwp.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("cuda available", str(torch.cuda.is_available())),
        ("triton importable", str(triton_available())),
        (f"auto backend on {device}", resolve_backend("auto", probe, "env")),
        ("auto backend, decoding", resolve_backend("auto", probe[:, :1], "env")),
    ]
    try:
        import transformers

        rows.insert(3, ("transformers", transformers.__version__))
    except ImportError:
        rows.insert(3, ("transformers", "not installed"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _parse_keep(value: str):
    """``all``, ``none``, ``every:K`` or a comma list of layer indices."""
    if value in ("all", "none"):
        return value
    if value.startswith("every:"):
        try:
            return int(value.split(":", 1)[1])
        except ValueError:
            raise CLIError(f"--keep-softmax {value!r}: expected every:K with an integer K") from None
    try:
        layers = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        layers = []
    if not layers:
        raise CLIError(f"--keep-softmax {value!r}: use all, none, every:K or a comma list like 0,5,11")
    return layers


def _keep_text(keep) -> str:
    """A ``Recipe.keep_softmax`` value as the command line writes it."""
    if isinstance(keep, int) and not isinstance(keep, bool):
        return f"every:{keep}"
    return keep if isinstance(keep, str) else ",".join(map(str, keep))


def _fwp_args(p: argparse.ArgumentParser) -> None:
    from hf_fwp.conversion.recipe import NAMED_RECIPES, Recipe
    from hf_fwp.modeling.configuration_fwp import FEATURE_MAPS, FWP_RULES

    # Every default is Recipe()'s (or the --recipe's): the command line and the Python API build the same student.
    d = Recipe()
    g = p.add_argument_group("student layout (defaults: the recommended recipe, hf_fwp.conversion.recipe.Recipe)")
    g.add_argument("--recipe", default="hybrid", choices=list(NAMED_RECIPES),
                   help="named layout: hybrid (a softmax window + Hedgehog linear attention in every layer) or "
                   "pure-fwp (gated Hedgehog linear attention with a short conv, no softmax: decode memory "
                   "constant in the context); the "
                   "flags below change single fields of it (default: %(default)s)")
    g.add_argument("--rule", default=None, choices=FWP_RULES, help="FWP rule of the converted layers "
                   f"(default: {d.fwp_rule}; pure-fwp: {NAMED_RECIPES['pure-fwp']['fwp_rule']})")
    g.add_argument("--feature-map", default=None, choices=FEATURE_MAPS,
                   help=f"feature map applied to queries and keys (default: {d.feature_map})")
    g.add_argument("--keep-softmax", default=_keep_text(d.keep_softmax), type=str,
                   help="layers that stay softmax: all, none, every:K or a list like 0,5,11 (default: %(default)s)")
    g.add_argument("--layer-type", default=None, choices=["linear_attention", "hybrid_sliding"],
                   help="what the other layers become: linear_attention (pure FWP) or hybrid_sliding (sliding "
                   f"softmax + FWP in one layer) (default: {d.fwp_layer_type}; pure-fwp: linear_attention)")
    g.add_argument("--window", type=int, default=None,
                   help=f"sliding window of hybrid_sliding layers, in tokens (default: {d.sliding_window})")
    g.add_argument("--state-heads", default=None, choices=["query", "kv"],
                   help="one fast-weight state per query head, or per key/value head shared by its query group "
                   f"(a smaller decode cache for grouped-query teachers) (default: {d.fwp_state_heads}; pure-fwp: "
                   f"{NAMED_RECIPES['pure-fwp']['fwp_state_heads']})")
    g.add_argument("--hybrid-combine", default=None, choices=["lerp", "shared_normalizer"],
                   help="how hybrid_sliding layers join their branches: shared_normalizer (LoLCATs: the FWP reads "
                   "only tokens older than the window, one softmax normaliser over both; linear rules with "
                   "non-negative features) or lerp (a per-head mix, the FWP reading every token) (default: "
                   f"{d.hybrid_combine} for the default rule, lerp where shared_normalizer cannot apply)")


def _load_teacher(spec: str, role: str = "teacher", tokenizer: bool = True):
    from hf_fwp.conversion.hub import load_teacher

    try:
        return load_teacher(spec, role=role, tokenizer=tokenizer)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CLIError(" ".join(str(e).split())) from None  # the whole message, on one line


def _layout(args) -> dict:
    """``fwp_rule``, ``feature_map``, ``fwp_layer_type`` and ``fwp_state_heads``: each flag given, else the
    --recipe's field; and the --recipe's ``fwp_options`` (no flag sets them)."""
    from hf_fwp.conversion.recipe import named_recipe

    named = named_recipe(args.recipe)
    return {"fwp_rule": args.rule or named.fwp_rule, "feature_map": args.feature_map or named.feature_map,
            "fwp_layer_type": args.layer_type or named.fwp_layer_type,
            "fwp_state_heads": args.state_heads or named.fwp_state_heads, "fwp_options": named.fwp_options}


def _recipe_from(args):
    from hf_fwp.conversion.recipe import Recipe

    layout = _layout(args)
    window = args.window
    if layout["fwp_layer_type"] == "hybrid_sliding":
        window = Recipe().sliding_window if window is None else window
        if window < 1:
            raise CLIError(f"--window must be a positive number of tokens; got {window}.")
    elif window is not None:
        raise CLIError("--window sets the window of hybrid_sliding layers; with --layer-type linear_attention there "
                       "are none (kept softmax layers keep the teacher's own attention).")
    if args.window is not None and args.keep_softmax.strip().lower() == "all":
        raise CLIError("--window sets the window of hybrid_sliding layers; with --keep-softmax all there are none "
                       "(every layer keeps the teacher's own attention).")
    from hf_fwp.conversion.recipe import RecipeError

    try:
        return Recipe(**layout, keep_softmax=_parse_keep(args.keep_softmax), sliding_window=window,
                      hybrid_combine=args.hybrid_combine)
    except RecipeError as e:
        raise _flag_error(e) from None


def _check_layout_has_fwp_layers(args, teacher) -> None:
    """A --keep-softmax that keeps every layer of this teacher (all, every:1, a full list) leaves no FWP layer: the
    layout flags given with it would do nothing, so they are refused, not ignored."""
    from hf_fwp.conversion.architectures import ARCHITECTURES, source_layer_types
    from hf_fwp.conversion.convert import plan_layer_types

    name = type(teacher).__name__
    if name not in ARCHITECTURES:
        return  # convert names the supported architectures
    n = ARCHITECTURES[name].config_map(teacher.config)["num_hidden_layers"]
    try:
        types = plan_layer_types(n, source_layer_types(name, teacher.config), _parse_keep(args.keep_softmax))
    except ValueError as e:
        raise CLIError(f"--keep-softmax: {e}") from None
    given = [flag for flag, value, default in (("--window", args.window, None), ("--rule", args.rule, None),
                                               ("--feature-map", args.feature_map, None),
                                               ("--layer-type", args.layer_type, None),
                                               ("--state-heads", args.state_heads, None),
                                               ("--hybrid-combine", args.hybrid_combine, None),
                                               ("--recipe", args.recipe, "hybrid"))
             if value != default]
    if "linear_attention" not in types and "hybrid_sliding" not in types and given:
        raise CLIError(f"--keep-softmax {args.keep_softmax} keeps all {n} layers of this teacher softmax, so "
                       f"{', '.join(given)} would have no effect; keep fewer layers or leave {given[0]} out.")


def _convert_args(p):
    p.add_argument("teacher", help="model folder, .gguf file or Hub id of the softmax model")
    p.add_argument("output", help="folder to write the converted (undistilled) model to; must be new or empty")
    p.add_argument("--overwrite", action="store_true", help="replace what OUTPUT holds (written atomically)")
    _fwp_args(p)


def _convert_run(args) -> int:
    from hf_fwp.conversion import convert
    from hf_fwp.conversion.folders import atomic_folder, check_output_folder

    recipe = _recipe_from(args)
    if args.overwrite and Path.cwd().resolve().is_relative_to(Path(args.output).resolve()):
        raise CLIError(f"{args.output} is the folder you are in (or holds it): it cannot be replaced; run from "
                       "elsewhere or choose another OUTPUT.")
    if Path(args.teacher).exists() and Path(args.teacher).resolve().is_relative_to(Path(args.output).resolve()):
        raise CLIError(f"{args.output} is the teacher's folder (or holds it): converting into it would replace the "
                       "model being read; choose another OUTPUT.")
    try:  # before loading anything: a refused OUTPUT costs nothing
        check_output_folder(args.output, overwrite=args.overwrite, flag="--overwrite")
    except ValueError as e:
        raise CLIError(str(e)) from None
    teacher, tokenizer = _load_teacher(args.teacher)
    _check_layout_has_fwp_layers(args, teacher)
    try:
        student = convert(teacher, **recipe.convert_options(teacher))
        with atomic_folder(args.output, overwrite=args.overwrite, flag="--overwrite") as tmp:
            student.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except (ValueError, OSError) as e:
        raise CLIError(str(e)) from None
    n_fwp = sum(t in ("linear_attention", "hybrid_sliding") for t in student.config.layer_types)
    print(f"wrote {args.output}: {n_fwp} FWP layers ({', '.join(sorted(set(student.config.layer_types)))}), "
          f"{sum(p.numel() for p in student.parameters()):,} parameters")
    return 0


def _data_args(p, required=True, training=True):
    from hf_fwp.conversion.recipe import Recipe

    if training:
        p.add_argument("--data", nargs="+", required=required,
                       help="text/jsonl/parquet files, or a Hub dataset name, to train on")
        p.add_argument("--eval-data", nargs="+", default=None,
                       help="held-out files, never trained on (default: 10%% of --data)")
    else:
        p.add_argument("--data", nargs="+", required=required,
                       help="held-out text/jsonl/parquet files (or a Hub dataset name) to evaluate on")
        p.add_argument("--eval-data", nargs="+", default=None, help="alias of --data, for a distill command line")
    p.add_argument("--text-column", default="text", help="column holding the text in jsonl/parquet data "
                   "(default: %(default)s)")
    p.add_argument("--block-size", type=int, default=Recipe().block_size,
                   help="tokens per training / evaluation block (default: %(default)s)")


def _pack(sources: list[str], args, tokenizer):
    """Blocks of ``args.block_size`` tokens from files or a Hub dataset name; user mistakes become CLIErrors."""
    from hf_fwp.conversion.data import load_text, pack

    try:
        text = load_text(sources if len(sources) > 1 else sources[0], text_column=args.text_column)
        return pack(text, tokenizer, args.block_size, text_column=args.text_column)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None


def _blocks(args, tokenizer):
    """``(train, held_out)``: --data and ``{set name: blocks}`` of --eval-data (one set per file), or a 90/10
    split of --data."""
    ds = _pack(args.data, args, tokenizer)
    if args.eval_data:
        shared = sorted(set(map(_resolved, args.eval_data)) & set(map(_resolved, args.data)))
        if shared:
            raise CLIError(f"--eval-data {', '.join(shared)} is also in --data: held-out text must never be trained "
                           "on; give other files (or leave --eval-data out for a 90/10 split of --data).")
        return ds, {name: _pack(group, args, tokenizer) for name, group in _held_out_groups(args.eval_data).items()}
    if len(ds) < 2:
        raise CLIError(f"--data gives only {len(ds)} blocks of {args.block_size} tokens; add text or lower "
                       "--block-size.")
    split = ds.train_test_split(test_size=0.1, seed=0)
    return split["train"], split["test"]


def _distill_args(p):
    p.add_argument("teacher", help="model folder, .gguf file or Hub id of the softmax model")
    p.add_argument("output", help="run folder (stage1/, stage2/ checkpoints, model/)")
    _fwp_args(p)
    _data_args(p)
    from hf_fwp.conversion.recipe import Recipe, named_recipe

    d = Recipe()
    g = p.add_argument_group("training (defaults: Recipe())")
    pure = named_recipe("pure-fwp")
    g.add_argument("--stage1-steps", type=int, default=None,
                   help="attention-transfer steps, only the new FWP parameters train (default: the --recipe's: "
                   f"{d.stage1_steps}; pure-fwp: {pure.stage1_steps})")
    g.add_argument("--stage2-steps", type=int, default=None,
                   help=f"LoRA + logit-distillation steps (default: the --recipe's: {d.stage2_steps}; pure-fwp: "
                   f"{pure.stage2_steps})")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="blocks per step (default: %(default)s)")
    g.add_argument("--lora-rank", type=int, default=d.lora_rank, help="rank of the stage-2 LoRA adapters "
                   "(default: %(default)s)")
    g.add_argument("--temperature", type=float, default=d.temperature,
                   help="softmax temperature of the distillation KL (default: %(default)s)")
    g.add_argument("--ce-weight", type=float, default=d.ce_weight,
                   help="weight of the next-token cross-entropy added to the KL (default: %(default)s)")
    g.add_argument("--save-steps", type=int, default=d.save_steps,
                   help="stage-2 checkpoint interval: what --resume can recover (default: every %(default)s steps)")
    g.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 mixed precision on a GPU that supports it, float32 on the CPU (default: "
                   "%(default)s)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the student's layers in stage 2's backward pass (less memory, more time)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in OUTPUT (same options)")


# Recipe fields whose command-line flag is not simply --field-name.
_FLAGS = {"fwp_rule": "--rule", "fwp_layer_type": "--layer-type", "sliding_window": "--window",
          "fwp_state_heads": "--state-heads", "keep_softmax": "--keep-softmax"}


def _flag_error(e) -> CLIError:
    """A :class:`~hf_fwp.conversion.recipe.RecipeError` as a CLI error naming the flag, not the Recipe field."""
    return CLIError(f"{_FLAGS.get(e.field, '--' + e.field.replace('_', '-'))} {e.problem}")


def _distill_run(args) -> int:
    from dataclasses import replace

    from hf_fwp.conversion import pipeline
    from hf_fwp.conversion.hub import teacher_license
    from hf_fwp.conversion.recipe import RecipeError, named_recipe

    try:  # every option is checked before the teacher loads
        named = named_recipe(args.recipe)  # its training lengths unless the flags say otherwise
        stage1 = named.stage1_steps if args.stage1_steps is None else args.stage1_steps
        stage2 = named.stage2_steps if args.stage2_steps is None else args.stage2_steps
        recipe = replace(_recipe_from(args), block_size=args.block_size, batch_size=args.batch_size,
                         stage1_steps=stage1, stage2_steps=stage2, lora_rank=args.lora_rank,
                         temperature=args.temperature, ce_weight=args.ce_weight, save_steps=args.save_steps,
                         precision=args.precision, gradient_checkpointing=args.gradient_checkpointing)
    except RecipeError as e:
        raise _flag_error(e) from None
    try:
        pipeline.check_run_folder(args.output, resume=args.resume, flag="--resume")
    except ValueError as e:
        raise CLIError(str(e)) from None
    teacher, tokenizer = _load_teacher(args.teacher)
    _check_layout_has_fwp_layers(args, teacher)
    limit = pipeline.learned_positions(teacher)
    if limit is not None and args.block_size > limit:
        raise CLIError(f"--block-size {args.block_size} is longer than the {limit} learned positions of "
                       f"{args.teacher}: use --block-size {limit} or less.")
    train, held = _blocks(args, tokenizer)
    try:
        result = pipeline.run(teacher, tokenizer, train, held, recipe, args.output, resume=args.resume,
                              base_model=args.teacher, license=teacher_license(args.teacher))
    except (ValueError, OSError) as e:  # OSError: an unwritable or impossible OUTPUT
        raise CLIError(" ".join(str(e).split())) from None
    from hf_fwp.conversion.evaluate import report

    print(report(result))
    print(f"wrote {args.output}/model ({result['minutes']:.1f} minutes, {result['tokens_seen']:,} tokens)")
    return 0


def _eval_args(p):
    p.add_argument("model", help="the FWP (student) model folder")
    p.add_argument("--teacher", required=True, help="model folder, .gguf file or Hub id to compare with")
    _data_args(p, required=False, training=False)
    p.add_argument("--offline-sets", action="store_true",
                   help="also evaluate on the offline corpus's held-out sets (stdlib docstrings, installed packages' "
                   "docstrings and READMEs; never trained on by the demo); each file of --data is its own set")
    p.add_argument("--max-blocks", type=int, default=32, help="evaluate on at most this many blocks per held-out set "
                   "(default: %(default)s)")
    p.add_argument("--prompt", action="append", default=None, help="prompt for samples (repeatable)")


def _resolved(source: str) -> str:
    return str(Path(source).resolve()) if Path(source).exists() else source


def _held_out_groups(sources: list[str]) -> dict[str, list[str]]:
    """``{set name: sources}``: each local file is one held-out set, named by its file name (its path when two
    files share a name); the remaining sources (Hub dataset names) form one set."""
    files = [s for s in sources if Path(s).is_file()]
    names = [Path(f).name for f in files]
    groups = {(n if names.count(n) == 1 else f): [f] for f, n in zip(files, names)}
    rest = [s for s in sources if s not in files]
    if rest:
        groups[", ".join(rest)] = rest
    return groups


def _eval_run(args) -> int:
    from hf_fwp.conversion.evaluate import compare, report
    from hf_fwp.conversion.recipe import learned_positions

    if args.max_blocks < 1:
        raise CLIError(f"--max-blocks must be at least 1; got {args.max_blocks}.")
    if args.block_size < 2:
        raise CLIError(f"--block-size must be at least 2 tokens; got {args.block_size}.")
    if args.prompt is not None and any(not p.strip() for p in args.prompt):
        raise CLIError("--prompt must not be empty: give the text to continue.")
    sources = list(dict.fromkeys((args.data or []) + (args.eval_data or [])))
    if not sources and not args.offline_sets:
        raise CLIError("give held-out text with --data FILE [FILE ...] (each file is one set), or --offline-sets.")
    teacher, tokenizer = _load_teacher(args.teacher)
    student, _ = _load_teacher(args.model, role="student", tokenizer=False)  # scored on the teacher's tokens
    sizes = {spec: model.get_input_embeddings().num_embeddings for spec, model in ((args.teacher, teacher),
                                                                                    (args.model, student))}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k}: {v} tokens" for k, v in sizes.items())
        raise CLIError(f"the student and the teacher have different vocabularies ({listed}): compare a student "
                       "with the teacher it was converted from.")
    for spec, model in ((args.teacher, teacher), (args.model, student)):
        limit = learned_positions(model)
        if limit is not None and args.block_size > limit:
            raise CLIError(f"--block-size {args.block_size} is longer than the {limit} learned positions of "
                           f"{spec}: use --block-size {limit} or less.")
    sets = {name: _pack(group, args, tokenizer) for name, group in _held_out_groups(sources).items()}
    if args.offline_sets:
        from hf_fwp.conversion.corpus import offline_corpus
        from hf_fwp.conversion.data import pack

        for kind, text in offline_corpus()[1].items():
            sets[f"offline: {kind}"] = pack(text, tokenizer, args.block_size)
    sets = {name: blocks.select(range(min(len(blocks), args.max_blocks))) for name, blocks in sets.items()}
    try:
        print(report(compare(teacher, student, tokenizer, sets, args.prompt or ["The meaning of life is"])))
    except ValueError as e:  # a model whose logits are not finite
        raise CLIError(str(e)) from None
    return 0


def _generate_args(p):
    p.add_argument("model", help="model folder, .gguf file or Hub id")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate per prompt "
                   "(default: %(default)s)")


def _generate_run(args) -> int:
    from hf_fwp.conversion.evaluate import generate_samples
    from hf_fwp.conversion.recipe import learned_positions

    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be at least 1; got {args.max_new_tokens}.")
    if any(not p.strip() for p in args.prompt):
        raise CLIError("--prompt must not be empty: give the text to continue.")
    model, tokenizer = _load_teacher(args.model, role="model")
    limit = learned_positions(model)
    longest = max(len(tokenizer(p)["input_ids"]) for p in args.prompt) + args.max_new_tokens
    if limit is not None and longest > limit:
        raise CLIError(f"{args.model} has a learned table of {limit} positions, but the longest prompt plus "
                       f"--max-new-tokens is {longest} tokens: shorten the prompt or lower --max-new-tokens.")
    texts, tps = generate_samples(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens)
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}{text}\n")
    print(f"({tps:.1f} tokens/s)")
    return 0


def _push_args(p):
    p.add_argument("folder", help="a saved model folder (e.g. RUN/model)")
    p.add_argument("repo_id", help="user/name on the Hugging Face Hub")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    p.add_argument("--revision", default=None, help="branch to upload to (created when missing; default: main)")


def _push_run(args) -> int:
    from hf_fwp.conversion.hub import push

    try:
        files = push(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run, revision=args.revision)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(" ".join(str(e).split())) from None
    except Exception as e:  # network and Hub errors: one line, whatever huggingface_hub raised
        raise CLIError(f"upload to {args.repo_id} failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}") \
            from None
    verb = "would upload" if args.dry_run else "uploaded"
    where = args.repo_id + (f" (branch {args.revision})" if args.revision else "")
    print(f"{verb} to {where}:\n" + "\n".join(f"  {f}" for f in files))
    return 0


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "convert": (_convert_args, _convert_run),
    "distill": (_distill_args, _distill_run),
    "eval": (_eval_args, _eval_run),
    "generate": (_generate_args, _generate_run),
    "push": (_push_args, _push_run),
    "env": (_env_args, _env_run),
}


def build_parser() -> argparse.ArgumentParser:
    from hf_fwp_cli import COMMAND_HELP, top_parser

    parser = top_parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=COMMAND_HELP[name], description=COMMAND_HELP[name])
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("hf-fwp: error: give a command (see hf-fwp --help)", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except CLIError as e:
        print(f"hf-fwp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
