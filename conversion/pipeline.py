"""The whole linearisation recipe: convert, stage 1 (attention transfer), stage 2 (LoRA + logit distillation
under ``transformers.Trainer``), merge, evaluate, and save a folder anyone loads with ``from_pretrained``.

Every stage writes to ``output_dir``: ``stage1/`` (the student after attention transfer), ``stage2/checkpoint-*``
(Trainer checkpoints), ``model/`` (the final merged model, tokenizer and model card). With ``resume=True`` a
rerun picks up from the last finished stage and the last Trainer checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import warnings
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import TrainingArguments

from hf_fwp.conversion.convert import convert
from hf_fwp.conversion.distill import (attention_transfer, match_decays, teacher_attention_spans,
                                       trainable_fwp_parameters)
from hf_fwp.conversion.evaluate import compare, report
# The recipe's names are re-exported: run()'s callers build a Recipe from here (README, examples).
from hf_fwp.conversion.recipe import (DEFAULT_COMBINE, DEFAULT_WINDOW, NAMED_RECIPES, Recipe,  # noqa: F401
                                      RecipeError, learned_positions, named_recipe, placement)
from hf_fwp.conversion.trainer import DistillationTrainer, add_lora, last_complete_checkpoint


def _batches(blocks, batch_size: int) -> list[dict]:
    ids = blocks["input_ids"]
    return [{"input_ids": torch.tensor(ids[i : i + batch_size])} for i in range(0, len(ids) - batch_size + 1,
                                                                                  batch_size)]


def run(teacher, tokenizer, train_blocks, eval_blocks, recipe: Recipe, output_dir, *, resume: bool = False,
        prompts: list[str] | None = None, base_model: str | None = None, license: str | dict | None = None,
        progress: bool = True) -> dict:
    """Run the recipe end to end; returns the evaluation dict (see :func:`hf_fwp.conversion.evaluate.compare`)
    with ``minutes`` and ``tokens_seen`` added. ``eval_blocks``: held-out blocks, or ``{name: blocks}`` for several
    held-out sets (each reported, and their mean). The final model is in ``output_dir / "model"``; its card names
    ``base_model`` and, when given, the teacher's ``license`` (see :func:`hf_fwp.conversion.hub.teacher_license`).
    The teacher is moved to where the run trains (:func:`placement`: the GPU, in bf16 under mixed precision)."""
    from accelerate import PartialState

    eval_sets = eval_blocks if isinstance(eval_blocks, dict) else {"held-out": eval_blocks}
    _check_run_inputs(train_blocks, eval_sets, prompts)

    out = check_run_folder(output_dir, resume=resume)
    device, bf16 = placement(recipe)
    args = TrainingArguments(
        output_dir=str(out / "stage2"), max_steps=recipe.stage2_steps, learning_rate=recipe.stage2_lr,
        per_device_train_batch_size=recipe.batch_size, gradient_accumulation_steps=recipe.grad_accum,
        lr_scheduler_type="cosine", warmup_steps=max(1, recipe.stage2_steps // 20), save_steps=recipe.save_steps,
        save_total_limit=2, logging_steps=max(1, recipe.stage2_steps // 10), report_to=[], seed=recipe.seed,
        disable_tqdm=not progress, remove_unused_columns=False, bf16=bf16,
        activation_checkpointing=recipe.gradient_checkpointing,
        # Without use_cpu, accelerate does not start a gloo process group for multi-process runs on CPU.
        use_cpu=device == "cpu",
    )
    # Under torchrun / accelerate launch every process runs the (deterministic) stage 1, only the main one writes.
    state = PartialState()
    torch.manual_seed(recipe.seed)
    start = time.perf_counter()
    # The frozen teacher runs in bf16 under mixed precision; the student trains with float32 weights.
    teacher.to(device=state.device if device == "cuda" else "cpu", dtype=torch.bfloat16 if bf16 else None).eval()
    stage1_dir = out / "stage1"
    resumed_stage1 = resume and (stage1_dir / "config.json").exists()
    student = batches = None
    if not resumed_stage1:
        # What can refuse the recipe or the data runs before anything is written (no half-made OUT to clean up).
        # Held-out sets may be longer or shorter than the training blocks (a student is worth scoring beyond them).
        # One row, not the whole column (a large training set would be read into Python lists to get a length).
        length = len(train_blocks[0]["input_ids"]) if len(train_blocks) else recipe.block_size
        if length != recipe.block_size:
            raise ValueError(f"the training blocks hold {length} tokens but the recipe's block_size is "
                             f"{recipe.block_size}: pack them with block_size={recipe.block_size}, or set "
                             f"Recipe(block_size={length}).")
        student = convert(teacher, **recipe.convert_options(teacher)).float()
        modules = {n.rsplit(".", 1)[-1] for n, _ in student.named_modules()}
        missing = [t for t in recipe.lora_targets if t not in modules]
        if missing:
            raise ValueError(f"lora_targets {missing} name no module of the student; its linear layers include "
                             f"{sorted(m for m in modules if m.endswith('_proj'))}.")
        limit = learned_positions(student)
        if limit is not None and recipe.block_size > limit:
            raise ValueError(f"block_size {recipe.block_size} is longer than the {limit} positions of the teacher's "
                             "learned position table: use a block size <= that.")
        for name, blocks in eval_sets.items() if limit is not None else ():
            held_length = len(blocks[0]["input_ids"])
            if held_length > limit:
                raise ValueError(f"held-out set {name!r} has blocks of {held_length} tokens, more than the {limit} "
                                 "positions of the teacher's learned position table.")
        trainable_fwp_parameters(student)
        batches = _batches(train_blocks, recipe.batch_size)
        if not batches:
            raise ValueError(f"Need at least batch_size={recipe.batch_size} training blocks; got {len(train_blocks)}.")
    state.wait_for_everyone()
    out.mkdir(parents=True, exist_ok=True)
    _check_or_record_recipe(out / "recipe.json", recipe, resume, state.is_main_process)
    _check_or_record_inputs(out / "inputs.json", teacher, train_blocks, resume, state.is_main_process)
    clock = out / "minutes.json"  # wall time of earlier sessions of this run (an interrupted run resumes)
    earlier = json.loads(clock.read_text())["minutes"] if resume and clock.exists() else 0.0

    def minutes() -> float:
        return earlier + (time.perf_counter() - start) / 60

    try:
        return _stages(teacher, tokenizer, train_blocks, eval_sets, recipe, out, args, state, resume,
                       resumed_stage1, student, batches, prompts, base_model, license, progress, minutes)
    finally:
        if state.is_main_process and out.exists():
            clock.write_text(json.dumps({"minutes": minutes()}))


def _finite_or_raise(model, what: str) -> None:
    from hf_fwp.conversion.hub import nonfinite_parameters

    bad = nonfinite_parameters(model)
    if bad:
        raise ValueError(f"{what} diverged: {len(bad)} weight tensor(s) hold NaN or inf ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}); nothing was saved from it. Lower its learning rate.")


def _stages(teacher, tokenizer, train_blocks, eval_sets, recipe, out, args, state, resume, resumed_stage1, student,
            batches, prompts, base_model, license, progress, minutes) -> dict:
    """Stage 1 (unless resumed), stage 2, merge, evaluation and the final folder (see :func:`run`)."""
    from hf_fwp.modeling import FWPForCausalLM

    stage1_dir = out / "stage1"
    first_eval = next(iter(eval_sets.values()))
    if resumed_stage1:
        student = FWPForCausalLM.from_pretrained(stage1_dir)
        transfer = json.loads((stage1_dir / "transfer.json").read_text())
    else:
        spans = None
        if recipe.decay_from_teacher:
            spans = teacher_attention_spans(teacher, batches[:2])
            match_decays(student, spans)
        result = attention_transfer(student, teacher, batches, steps=recipe.stage1_steps, lr=recipe.stage1_lr,
                                    eval_batches=_batches(first_eval, recipe.batch_size)[:2] or batches[:1],
                                    progress=progress, autocast_dtype=torch.bfloat16 if args.bf16 else None,
                                    objective=recipe.stage1_objective)
        transfer = {"before": result.before, "after": result.after, "table": result.table()}
        if spans is not None:
            transfer["teacher_spans"] = {i: [round(x, 2) for x in s.tolist()] for i, s in spans.items()}
        _finite_or_raise(student, f"stage 1 (attention transfer, lr {recipe.stage1_lr})")
        if state.is_main_process:
            stage1_dir.mkdir(exist_ok=True)
            result.plot(stage1_dir / "transfer.png")
            (stage1_dir / "transfer.json").write_text(json.dumps(transfer, indent=1))
            tokenizer.save_pretrained(stage1_dir)  # a loadable model folder, as model/ is
            student.save_pretrained(stage1_dir)  # written last: a folder with config.json is a finished stage
        state.wait_for_everyone()
    model = add_lora(student, targets=recipe.lora_targets, rank=recipe.lora_rank, alpha=2 * recipe.lora_rank,
                     train_fwp=recipe.train_fwp_in_stage2)
    trainer = DistillationTrainer(model=model, args=args, train_dataset=train_blocks, teacher=teacher,
                                  temperature=recipe.temperature, ce_weight=recipe.ce_weight)
    last = last_complete_checkpoint(args.output_dir, needs_extra=bool(trainer._extra_trainable())) if resume else None
    trainer.train(resume_from_checkpoint=last)
    student = model.merge_and_unload().eval()
    _finite_or_raise(student, f"stage 2 (LoRA distillation, lr {recipe.stage2_lr}; its checkpoints are in "
                              f"{args.output_dir})")
    tokens_seen = (recipe.stage1_steps + recipe.stage2_steps * recipe.grad_accum * state.num_processes) * (
        recipe.batch_size * recipe.block_size)
    prompts = prompts or ["The meaning of life is", "Once upon a time"]
    result = compare(teacher, student, tokenizer, eval_sets, prompts)
    result.update(minutes=minutes(), tokens_seen=tokens_seen, transfer=transfer,
                  recipe=asdict(recipe))
    if state.is_main_process:
        save_final(student, tokenizer, out / "model", result, base_model, license)
    state.wait_for_everyone()
    return result


def _check_run_inputs(train_blocks, eval_sets: dict, prompts) -> None:
    """What run() is given, checked before any work (a mistake found after training would cost its minutes)."""
    from datasets import Dataset

    if not isinstance(train_blocks, Dataset) or "input_ids" not in train_blocks.column_names:
        raise ValueError(f"train_blocks must be a datasets.Dataset of packed blocks (input_ids), e.g. from "
                         f"hf_fwp.conversion.data.pack; got {type(train_blocks).__name__}.")
    if not eval_sets:
        raise ValueError("eval_blocks is empty: give held-out blocks, or {name: blocks} with at least one set.")
    for name, blocks in eval_sets.items():
        if not isinstance(blocks, Dataset) or "input_ids" not in blocks.column_names or len(blocks) == 0:
            rows = len(blocks) if hasattr(blocks, "__len__") else "?"
            raise ValueError(f"held-out set {name!r} must be a non-empty datasets.Dataset of packed blocks "
                             f"(input_ids); got a {type(blocks).__name__} with {rows} rows.")
    if prompts is not None and (isinstance(prompts, str)
                                or not all(isinstance(p, str) and p.strip() for p in prompts)):
        raise ValueError(f"prompts must be a list of non-empty strings; got {prompts!r}.")


def check_run_folder(output_dir, *, resume: bool = False, flag: str = "resume=True") -> Path:
    """Refuse a run folder that cannot be used, before any work: a file, a non-empty folder for a new run, or
    (``resume``) a folder holding no run. ``flag`` names how the caller's user says "resume" (``--resume`` on the
    command line). Returns it as a Path."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder: choose a folder path for the run.")
    if not resume and out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: resume that run ({flag}), or choose a new folder.")
    if resume and (out / "model" / "config.json").is_file():
        raise ValueError(f"the run in {out} has finished: its model is {out / 'model'}; nothing to resume (evaluate "
                         "it again with hf_fwp.conversion.evaluate.compare or hf-fwp eval).")
    if resume and not (out / "recipe.json").is_file():
        raise ValueError(f"nothing to resume in {out}: it holds no run (no recipe.json, which a run writes first); "
                         f"check the path, or start a new run there without {flag}.")
    return out


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# Bumped whenever the fingerprints below change: an old run then resumes with a warning, not a false refusal.
_INPUTS_FORMAT = 1


def _check_or_record_inputs(path: Path, teacher, train_blocks, resume: bool, write: bool) -> None:
    """A new run records which teacher (its weights' fingerprint) and training text (its tokens') it distils; a
    resumed run must have the same: its checkpoints, stage-1 student and model card are built from them. Runs
    recorded before this file existed resume without the check."""
    # Names, shapes, sums and first values tell teachers apart without hashing every weight.
    weights = [(n, tuple(p.shape), [f"{x:.6g}" for x in [p.detach().float().sum().item(), *p.detach().flatten()[:8]
                                                          .float().tolist()]]) for n, p in teacher.state_dict().items()]
    tokens = torch.tensor(train_blocks["input_ids"], dtype=torch.int64) if len(train_blocks) else torch.zeros(0)
    current = {"format": _INPUTS_FORMAT, "teacher": _digest(repr(weights).encode()),
               "teacher_type": f"{type(teacher).__name__} in {str(teacher.dtype).removeprefix('torch.')}",
               "training_text": _digest(tokens.numpy().tobytes()), "training_blocks": len(train_blocks)}
    if resume and path.exists():
        stored = json.loads(path.read_text())
        if stored.get("format") != _INPUTS_FORMAT:
            warnings.warn(f"{path} was written by another version of hf-fwp (fingerprint format "
                          f"{stored.get('format')}, now {_INPUTS_FORMAT}): the teacher and training text are not "
                          "checked on this resume.")
            return
        if stored["teacher"] != current["teacher"]:
            raise ValueError(f"resume: {path.parent} was started with another teacher (recorded: a "
                             f"{stored['teacher_type']}; given: a {current['teacher_type']} with other weights); "
                             "resume with the run's teacher in the same dtype, or start a new folder.")
        if stored["training_text"] != current["training_text"]:
            raise ValueError(f"resume: {path.parent} was started with other training text ({stored['training_blocks']}"
                             f" blocks, now {current['training_blocks']}, or other tokens); resume with the same data, "
                             "tokenizer and block size, or start a new folder.")
    elif write and not (resume and path.parent.joinpath("stage1").exists()):
        path.write_text(json.dumps(current, indent=1))


def _check_or_record_recipe(path: Path, recipe: Recipe, resume: bool, write: bool) -> None:
    """A new run records its recipe; a resumed one must use the same (its checkpoints were built with it)."""
    current = json.loads(json.dumps(asdict(recipe)))
    if resume and path.exists():
        # Runs recorded before these Recipe fields existed: one state per query head, default precision.
        stored = {"fwp_state_heads": "query", "precision": "auto", "gradient_checkpointing": False,
                  "decay_from_teacher": False, "stage1_objective": "output", **json.loads(path.read_text())}
        stored.setdefault("hybrid_combine", "lerp")  # runs recorded before hybrid layers could share a normaliser
        if stored.get("fwp_layer_type") == "linear_attention":
            stored["sliding_window"] = None  # earlier Recipes carried an unused window for pure FWP layouts
        changed = {k: (stored.get(k), v) for k, v in current.items() if k != "save_steps" and stored.get(k) != v}
        if changed:
            diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
            raise ValueError(f"resume: {path.parent} was started with a different recipe ({diff}); resume with the "
                             "original options, or start a new folder.")
    elif write:
        path.write_text(json.dumps(current, indent=1))


def save_final(student, tokenizer, folder, result: dict, base_model: str | None,
               license: str | dict | None = None) -> None:
    """``save_pretrained`` (safetensors, config with auto_map, modeling code, generation config), the tokenizer,
    ``results.json`` and a model card, written to a temporary folder that then replaces ``folder`` in one rename
    (an interrupted save never leaves a folder that loads as a broken model)."""
    from hf_fwp.conversion.folders import atomic_folder

    with atomic_folder(folder, overwrite=True) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "results.json").write_text(json.dumps(result, indent=1, default=str))
        (tmp / "README.md").write_text(model_card(result, base_model, student.config, license))
        if isinstance(license, dict) and license.get("license_file"):
            source = Path(license["license_file"])
            suffix = source.suffix if source.suffix in (".md", ".txt") else ""
            shutil.copyfile(source, tmp / f"LICENSE{suffix}")


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def model_card(result: dict, base_model: str | None, config, license: str | dict | None = None) -> str:
    """The card (the Hub's format: YAML metadata, then markdown) describes the saved model's own config (layout,
    rule, feature map), the recipe its training; ``license`` is the teacher's, which the student inherits (an id,
    or :func:`hf_fwp.conversion.hub.teacher_license`'s dict with ``license_name`` / ``license_link``)."""
    from huggingface_hub import ModelCardData

    recipe = result["recipe"]
    layout = ", ".join(f"{n} x `{t}`" for t, n in Counter(config.layer_types).items())
    window = config.layer_window("hybrid_sliding") or config.layer_window("sliding_attention")
    window = f", window {window}" if window else ""
    if "hybrid_sliding" in config.layer_types and config.hybrid_combine == "shared_normalizer":
        window += ", softmax and FWP under one normaliser"
    terms = {k: v for k, v in license.items() if k != "license_file"} if isinstance(license, dict) else {
        "license": license}
    # Only single-token licence ids and Hub repository ids are metadata (a local teacher path is named in the text).
    terms = {k: v for k, v in terms.items() if isinstance(v, str) and re.fullmatch(r"[^\s]+", v)}
    meta = ModelCardData(base_model=base_model if base_model and _is_hub_id(base_model) else None, **terms,
                         library_name="transformers", pipeline_tag="text-generation",
                         tags=["fwp", "hf-fwp", "fast-weight-programmer", "linear-attention", config.fwp_rule])
    named = f"`{' '.join(str(base_model).split())}`" if base_model else "a softmax transformer"
    return f"""---
{meta.to_yaml()}
---
# {config.fwp_rule} student of {named.strip('`')}

A fast weight programmer (FWP) linearised from {named} with [hf-fwp](https://pypi.org/project/hf-fwp/):
softmax attention replaced by the `{config.fwp_rule}` rule (feature map `{config.feature_map}`; layers: {layout}{window}),
then distilled back towards the original.

## Usage

Only `transformers` and `torch` are needed: the folder carries its modeling code (pure PyTorch on any device;
Triton kernels on CUDA when `triton` is installed).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model_id = "path/to/this/folder"  # or its Hub id, "user/name"
tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)  # reads config.json's auto_map
model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True)
inputs = tokenizer("The meaning of life is", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0], skip_special_tokens=True))
```

Decoding keeps a constant-size state per FWP layer{" (plus the window's keys and values)" if window else ""}, whatever the
context length. With `pip install hf-fwp`, `import hf_fwp` registers the model type, so `trust_remote_code` is not needed.

## Recipe
1. Attention transfer: {recipe['stage1_steps']} steps, lr {recipe['stage1_lr']}, only the new FWP parameters train;
   per-layer MSE to the teacher's attention outputs.
2. LoRA (rank {recipe['lora_rank']} on {', '.join(recipe['lora_targets'])}) + KL to the teacher's logits
   (temperature {recipe['temperature']}, CE weight {recipe['ce_weight']}): {recipe['stage2_steps']} steps,
   lr {recipe['stage2_lr']}; LoRA merged.

Tokens seen: {result['tokens_seen']:,}; wall time: {result['minutes']:.1f} minutes.

## Evaluation (held-out text)
{report(result)}
## Attention transfer (per-layer MSE)
{result['transfer']['table']}
"""
