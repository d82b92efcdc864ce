"""Evaluation of teacher and student side by side: perplexity on held-out blocks, samples and throughput."""

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
    device = next(model.parameters()).device
    model.eval()
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(ids), batch_size), desc="perplexity", disable=not progress):
        x = torch.tensor(ids[i : i + batch_size], device=device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


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


def compare(teacher, student, tokenizer, blocks, prompts: list[str], *, max_new_tokens: int = 40) -> dict:
    """Perplexities, their ratio, samples and tokens/s of both models, as a dict (see :func:`report`)."""
    result = {}
    for name, model in (("teacher", teacher), ("student", student)):
        samples, tps = generate_samples(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        result[name] = {"perplexity": perplexity(model, blocks), "samples": samples, "tokens_per_s": tps}
    result["ratio"] = result["student"]["perplexity"] / result["teacher"]["perplexity"]
    result["prompts"] = prompts
    return result


def report(result: dict) -> str:
    """Markdown: a perplexity / speed table, then the samples of both models per prompt."""
    lines = ["| model | perplexity | tokens/s (greedy) |", "|---|---|---|"]
    for name in ("teacher", "student"):
        r = result[name]
        lines.append(f"| {name} | {r['perplexity']:.2f} | {r['tokens_per_s']:.1f} |")
    lines.append(f"\nstudent / teacher perplexity: {result['ratio']:.3f}\n")
    for i, prompt in enumerate(result["prompts"]):
        lines.append(f"**prompt:** {prompt!r}\n")
        for name in ("teacher", "student"):
            lines.append(f"- {name}: {result[name]['samples'][i]!r}")
        lines.append("")
    return "\n".join(lines)
