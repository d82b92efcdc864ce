"""Train small FWP language models from scratch on multi-query associative recall (MQAR), on a CPU, in minutes.

MQAR (Arora et al. 2023, "Zoology") is the textbook test of what a fast-weight memory can store and read back:
every sequence lists ``--pairs`` key-value pairs, then asks for ``--queries`` of those keys again. The model must
emit the value bound to each queried key::

    k1 v1 k2 v2 ... kN vN | q1 a1 q2 a2 ... qQ aQ        (q_i is one of the k_j, a_i its value v_j)

Keys and values come from disjoint halves of the vocabulary, fresh random bindings in every sequence, so nothing can
be memorised in the slow weights: the binding must be written into the fast weights and read back. The loss is
the cross-entropy of the answers ``a_i`` only: ``labels`` is -100 everywhere except at the answer positions, where
it holds the answer token itself. ``FWPForCausalLM`` shifts labels inside (like Llama), so the logits at the query
position ``q_i`` are the ones that predict ``a_i``; recall accuracy is the argmax there.

Every rule gets the same backbone, the same initial weights, the same batches and the same number of steps; only
``fwp_rule`` differs (all FWP layers use the package defaults: short conv, L2-normalised q/k, gated output norm).
The additive ``linear`` rule can only add to its memory, so bindings interfere once there are more pairs than the
key dimension can keep apart; the ``delta`` rules replace the old value stored under a key instead.

The defaults (16 pairs, vocabulary 64, head dim 16, 800 steps of 32 sequences) are sized for a 2-core CPU: the
three rules train in about 3-4 minutes on one thread. Larger vocabularies or more pairs make the task harder to
pick up in a few hundred steps; raise ``--steps`` with them.

    python examples/train_from_scratch.py                                  # linear, delta, gated_delta
    python examples/train_from_scratch.py --rules linear gated_delta
    python examples/train_from_scratch.py --quick                          # < 30 s smoke run
    python examples/train_from_scratch.py --save /tmp/mqar_best            # also save + reload the best model

Prints a markdown table (rule, final training loss, held-out loss, recall accuracy, seconds) and writes
``curves.png`` (loss and recall accuracy against steps) and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from hf_fwp import FWPConfig, FWPForCausalLM
from hf_fwp.modeling.configuration_fwp import FWP_RULES

IGNORE_INDEX = -100


# Data ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MQARTask:
    """Sequence layout of the task: ``pairs`` key-value pairs then ``queries`` (query key, answer) pairs.

    Key tokens are ``[0, vocab_size // 2)`` and value tokens ``[vocab_size // 2, vocab_size)``.
    """

    vocab_size: int
    pairs: int
    queries: int

    def __post_init__(self):
        if self.pairs > self.vocab_size // 2:
            raise ValueError(f"--pairs ({self.pairs}) cannot exceed the {self.vocab_size // 2} distinct key tokens.")
        if not 1 <= self.queries <= self.pairs:
            raise ValueError(f"--queries must be in [1, --pairs={self.pairs}], got {self.queries}.")

    @property
    def seq_len(self) -> int:
        return 2 * (self.pairs + self.queries)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch ``(input_ids, labels)``, both ``[batch_size, seq_len]`` int64."""
        half = self.vocab_size // 2
        # Distinct keys per sequence (a random permutation's prefix); values may repeat.
        keys = torch.rand(batch_size, half, generator=generator).argsort(dim=1)[:, : self.pairs]
        values = torch.randint(half, self.vocab_size, (batch_size, self.pairs), generator=generator)
        asked = torch.rand(batch_size, self.pairs, generator=generator).argsort(dim=1)[:, : self.queries]
        query_keys, answers = keys.gather(1, asked), values.gather(1, asked)
        context = torch.stack([keys, values], dim=2).flatten(1)
        questions = torch.stack([query_keys, answers], dim=2).flatten(1)
        input_ids = torch.cat([context, questions], dim=1)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        answer_positions = torch.arange(2 * self.pairs + 1, self.seq_len, 2)
        labels[:, answer_positions] = input_ids[:, answer_positions]
        return input_ids, labels


def recall_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct answers, answers): the prediction for ``labels[:, t]`` is ``logits[:, t - 1].argmax()``."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    correct = (logits[:, :-1].argmax(dim=-1) == targets) & scored
    return int(correct.sum()), int(scored.sum())


# Training -----------------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """Curves and final numbers of one rule's training run."""

    rule: str
    num_params: int
    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    model: FWPForCausalLM | None = None


def build_model(rule: str, task: MQARTask, args: argparse.Namespace) -> FWPForCausalLM:
    config = FWPConfig(
        vocab_size=task.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=task.seq_len,
        fwp_rule=rule,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(args.seed)  # same initial weights for every rule (where their parameters coincide)
    return FWPForCausalLM(config)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over the first ``warmup`` fraction of the steps, then cosine decay to 10% of ``lr``."""
    warmup = max(1, int(args.warmup * args.steps))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: FWPForCausalLM, eval_set: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(mean answer loss, recall accuracy) over the held-out batches."""
    model.eval()
    loss_sum, correct, total = 0.0, 0, 0
    for input_ids, labels in eval_set:
        out = model(input_ids, labels=labels, use_cache=False)
        hits, answers = recall_hits(out.logits, labels)
        loss_sum += out.loss.item() * answers
        correct += hits
        total += answers
    model.train()
    return loss_sum / total, correct / total


def train_rule(rule: str, task: MQARTask, eval_set, args: argparse.Namespace) -> RunResult:
    model = build_model(rule, task, args)
    result = RunResult(rule, num_params=sum(p.numel() for p in model.parameters()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(args.seed + 1)  # the same training batches for every rule
    model.train()
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc=f"{rule:>12}", dynamic_ncols=True)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        input_ids, labels = task.sample(args.batch_size, generator)
        loss = model(input_ids, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.train_steps.append(step + 1)
        result.train_loss.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            eval_loss, accuracy = evaluate(model, eval_set)
            result.eval_steps.append(step + 1)
            result.eval_loss.append(eval_loss)
            result.eval_accuracy.append(accuracy)
            progress.set_postfix(loss=f"{loss.item():.3f}", recall=f"{accuracy:.1%}")
    result.seconds = time.perf_counter() - start
    result.model = model
    return result


# Reporting ----------------------------------------------------------------------------------------------------------
def results_table(results: list[RunResult], tail: int) -> str:
    header = ["rule", "params", f"train loss (last {tail} steps)", "held-out loss", "recall accuracy", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in results:
        train_loss = sum(r.train_loss[-tail:]) / len(r.train_loss[-tail:])
        cells = [r.rule, f"{r.num_params:,}", f"{train_loss:.3f}", f"{r.eval_loss[-1]:.3f}",
                 f"{r.eval_accuracy[-1]:.1%}", f"{r.seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(results: list[RunResult], task: MQARTask, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        window = max(1, len(r.train_loss) // 50)
        smooth = torch.tensor(r.train_loss).unfold(0, window, 1).mean(dim=1).tolist()
        (line,) = ax_loss.plot(r.train_steps[window - 1:], smooth, label=f"{r.rule} (train)")
        ax_loss.plot(r.eval_steps, r.eval_loss, "o--", color=line.get_color(), ms=3, label=f"{r.rule} (held-out)")
        ax_acc.plot(r.eval_steps, r.eval_accuracy, "o-", ms=3, label=r.rule)
    ax_loss.set(xlabel="step", ylabel="answer cross-entropy", title="loss", yscale="log")
    ax_acc.set(xlabel="step", ylabel="recall accuracy (held-out)", title="recall", ylim=(0, 1.02))
    ax_acc.axhline(1 / (task.vocab_size - task.vocab_size // 2), color="gray", lw=0.8, ls=":", label="chance")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"MQAR: {task.pairs} pairs, {task.queries} queries, sequence length {task.seq_len}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_and_reload(result: RunResult, eval_batch: torch.Tensor, directory: Path) -> bool:
    """``save_pretrained`` the model, reload it through ``AutoModelForCausalLM`` and compare logits."""
    from transformers import AutoModelForCausalLM

    model = result.model.eval()
    model.save_pretrained(directory)
    reloaded = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        diff = (model(eval_batch).logits - reloaded(eval_batch).logits).abs().max().item()
    ok = type(reloaded) is type(model) and diff == 0.0
    print(f"saved the best model ({result.rule}) to {directory}; reloaded as {type(reloaded).__name__}: "
          f"max |logits - reloaded logits| = {diff:.2e} -> {'OK' if ok else 'MISMATCH'}")
    return ok


# Entry point --------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", nargs="+", default=["linear", "delta", "gated_delta"], choices=FWP_RULES,
                    help="FWP rules to train, one model each (default: linear delta gated_delta)")
    ap.add_argument("--pairs", type=int, default=16, help="key-value pairs per sequence")
    ap.add_argument("--queries", type=int, default=16, help="queried keys per sequence (<= --pairs)")
    ap.add_argument("--vocab-size", type=int, default=64, help="first half keys, second half values")
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=800, help="training steps per rule")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps spent warming up")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations")
    ap.add_argument("--eval-size", type=int, default=512, help="held-out sequences")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: these tiny matmuls gain nothing from more, and on a "
                         "CPU shared with other jobs extra threads stall each other)")
    ap.add_argument("--quick", action="store_true", help="a smoke run in well under 30 s (tests use it)")
    ap.add_argument("--out", type=Path, default=Path("outputs/train_from_scratch"), help="where plots and tables go")
    ap.add_argument("--save", type=Path, default=None, metavar="DIR",
                    help="save the most accurate model here and check that it reloads with identical logits")
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs, args.queries, args.hidden_size = 8, 8, 32
        args.steps, args.eval_every, args.eval_size, args.batch_size = 30, 15, 64, 16
    return args


def main(argv=None) -> list[RunResult]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    task = MQARTask(args.vocab_size, args.pairs, args.queries)
    eval_generator = torch.Generator().manual_seed(args.seed + 2)  # held out: never used for training
    eval_set = [task.sample(min(args.batch_size, args.eval_size - i), eval_generator)
                for i in range(0, args.eval_size, args.batch_size)]
    print(f"MQAR: {task.pairs} pairs + {task.queries} queries = {task.seq_len} tokens, vocab {task.vocab_size}; "
          f"model: {args.layers} FWP layers, hidden {args.hidden_size}, {args.heads} heads "
          f"(head dim {args.hidden_size // args.heads}); {args.steps} steps x batch {args.batch_size}, "
          f"lr {args.lr}, {torch.get_num_threads()} threads")
    results = [train_rule(rule, task, eval_set, args) for rule in args.rules]

    tail = max(1, min(50, args.steps // 10))
    table = results_table(results, tail)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_curves(results, task, args.out / "curves.png")
    (args.out / "results.md").write_text(
        f"MQAR, {task.pairs} pairs, {task.queries} queries, sequence length {task.seq_len}, vocab {task.vocab_size}; "
        f"{args.layers} layers, hidden {args.hidden_size}, {args.heads} heads; {args.steps} steps x batch "
        f"{args.batch_size}, lr {args.lr}, seed {args.seed}. Recall accuracy on {args.eval_size} held-out "
        f"sequences (chance {1 / (task.vocab_size - task.vocab_size // 2):.1%}).\n\n{table}\n")
    print(f"\nwrote {args.out / 'curves.png'} and {args.out / 'results.md'}")

    if args.save is not None:
        best = max(results, key=lambda r: r.eval_accuracy[-1])
        if not save_and_reload(best, eval_set[0][0], args.save):
            raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
