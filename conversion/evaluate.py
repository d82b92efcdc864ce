"""Evaluation of teacher and student side by side: perplexity and next-token agreement on held-out sets of several
kinds, samples and throughput."""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, blocks, *, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean next-token NLL) over ``blocks`` (a list of token-id lists or a dataset with ``input_ids``)."""
    ids = blocks["input_ids"] if hasattr(blocks, "column_names") else blocks
    if len(ids) == 0:
        raise ValueError("perplexity needs at least one block of held-out tokens.")
    model.eval()
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(ids), batch_size), desc="perplexity", disable=not progress):
        batch_nll, predicted = _score_batch(model, ids[i : i + batch_size])
        nll += batch_nll
        count += predicted.numel()
    return math.exp(nll / count)


def _score_batch(model, ids) -> tuple[float, torch.Tensor]:
    """``(summed next-token NLL, greedy next tokens [B, T - 1] on the CPU)`` of ``model`` on a batch of blocks."""
    x = torch.tensor(ids, device=next(model.parameters()).device)
    logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
    return nll, logits.argmax(-1).cpu()


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 40) -> tuple[list[str], float]:
    """Greedy continuations of ``prompts`` and the generation speed in new tokens per second."""
    device = next(model.parameters()).device
    texts, new_tokens, seconds = [], 0, 0.0
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        start = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        seconds += time.perf_counter() - start
        gen = out[0, enc["input_ids"].shape[1]:]
        new_tokens += gen.numel()
        texts.append(tokenizer.decode(gen, skip_special_tokens=True))
    return texts, new_tokens / max(seconds, 1e-9)


@torch.no_grad()
def score_pair(teacher, student, blocks, *, batch_size: int = 4, progress: bool = False) -> dict:
    """Teacher and student on the same held-out ``blocks`` in one pass: their perplexities, the ratio
    student / teacher, and ``agreement``, the fraction of positions where their greedy next tokens are equal."""
    ids = blocks["input_ids"] if hasattr(blocks, "column_names") else blocks
    if len(ids) == 0:
        raise ValueError("evaluation needs at least one block of held-out tokens.")
    nll, same, count = {"teacher": 0.0, "student": 0.0}, 0, 0
    for model in (teacher, student):
        model.eval()
    for i in tqdm(range(0, len(ids), batch_size), desc="evaluation", disable=not progress):
        argmax = {}
        for name, model in (("teacher", teacher), ("student", student)):
            batch_nll, argmax[name] = _score_batch(model, ids[i : i + batch_size])
            nll[name] += batch_nll
        same += (argmax["teacher"] == argmax["student"]).sum().item()
        count += argmax["teacher"].numel()
    broken = [name for name, v in nll.items() if not math.isfinite(v)]
    if broken:  # an agreement of NaN argmaxes (all 0) would read as perfect
        raise ValueError(f"the {' and the '.join(broken)}'s logits are NaN or inf on held-out text: the model is "
                         "broken (non-finite weights or activations), so it cannot be scored.")
    ppl = {name: math.exp(v / count) for name, v in nll.items()}
    return {**ppl, "ratio": ppl["student"] / ppl["teacher"], "agreement": same / count}


def compare(teacher, student, tokenizer, eval_sets, prompts: list[str], *, max_new_tokens: int = 40) -> dict:
    """Both models on every held-out set (``{name: blocks}``, or one set of blocks), plus samples and tokens/s.

    Returns ``{"sets": {name: score_pair(...)}, "ratio": mean of the sets' ratios, "agreement": their mean,
    "teacher"/"student": {"perplexity": mean over the sets, "samples", "tokens_per_s"}, "prompts"}`` (see
    :func:`report`)."""
    if not isinstance(eval_sets, dict):
        eval_sets = {"held-out": eval_sets}
    sets = {name: score_pair(teacher, student, blocks) for name, blocks in eval_sets.items()}
    mean = lambda key: sum(r[key] for r in sets.values()) / len(sets)  # noqa: E731
    result = {"sets": sets, "ratio": mean("ratio"), "agreement": mean("agreement"), "prompts": prompts}
    for name, model in (("teacher", teacher), ("student", student)):
        samples, tps = generate_samples(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        result[name] = {"perplexity": mean(name), "samples": samples, "tokens_per_s": tps}
    return result


def report(result: dict) -> str:
    """Markdown: perplexity and next-token agreement per held-out set with their mean, speed, then the samples of
    both models per prompt."""
    lines = ["| held-out set | teacher ppl | student ppl | student / teacher | next-token agreement |",
             "|---|---|---|---|---|"]
    for name, r in result["sets"].items():
        lines.append(f"| {name} | {r['teacher']:.2f} | {r['student']:.2f} | {r['ratio']:.3f} | {r['agreement']:.1%} |")
    if len(result["sets"]) > 1:
        lines.append(f"| **mean** | {result['teacher']['perplexity']:.2f} | {result['student']['perplexity']:.2f} | "
                     f"**{result['ratio']:.3f}** | {result['agreement']:.1%} |")
    lines.append(f"\nstudent / teacher perplexity (mean over {len(result['sets'])} held-out set"
                 f"{'s' if len(result['sets']) > 1 else ''}): {result['ratio']:.3f}; greedy tokens/s: teacher "
                 f"{result['teacher']['tokens_per_s']:.1f}, student {result['student']['tokens_per_s']:.1f}\n")
    for i, prompt in enumerate(result["prompts"]):
        lines.append(f"**prompt:** {prompt!r}\n")
        for name in ("teacher", "student"):
            lines.append(f"- {name}: {result[name]['samples'][i]!r}")
        lines.append("")
    return "\n".join(lines)
