"""Distillation of a converted FWP student towards its softmax teacher.

Stage 1, attention transfer (LoLCATs): everything is frozen except the parameters the conversion added (feature
maps, beta and decay gates, hybrid mixing factors, ...). Forward hooks on the teacher's attention blocks capture, per
layer, the block's input hidden states and its output; each student FWP layer is run on the teacher's own inputs
and trained to match the teacher's output (mean squared error, summed over layers). No ``output_attentions``.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterable

import torch
from tqdm.auto import tqdm

from hf_fwp.conversion.architectures import ARCHITECTURES
from hf_fwp.conversion.convert import is_new_fwp_parameter


@contextmanager
def eager_attention(teacher):
    """While active, ``teacher`` runs eager attention, the implementation that returns its attention weights (the
    fused kernels return none); its own implementation is restored after."""
    impl = teacher.config._attn_implementation
    teacher.set_attn_implementation("eager")
    try:
        yield teacher
    finally:
        teacher.set_attn_implementation(impl)


class TeacherAttentionCapture:
    """Context manager: while active, every forward of ``teacher`` records ``(input, output)`` of the attention
    block of each layer in ``layers`` into ``self.records[layer]``, and with ``weights=True`` its attention weights
    ``[B, H, T, T]`` into ``self.weights[layer]`` (the teacher runs eager attention meanwhile: the fused kernels
    return none)."""

    def __init__(self, teacher, layers: Iterable[int], *, weights: bool = False):
        name = type(teacher).__name__
        if name not in ARCHITECTURES:
            raise ValueError(f"attention transfer does not support teacher {name}; supported: {sorted(ARCHITECTURES)}")
        arch = ARCHITECTURES[name]
        blocks = teacher.get_submodule(arch.layers)
        self.modules = {i: getattr(blocks[i], arch.attention) for i in layers}
        self.records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.weights: dict[int, torch.Tensor] = {}
        self._handles = []
        self._teacher, self._want_weights = teacher, weights

    def __enter__(self):
        self._eager = eager_attention(self._teacher) if self._want_weights else nullcontext()
        self._eager.__enter__()
        for i, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._eager.__exit__(*exc)

    def _hook(self, i):
        def record(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            self.records[i] = (hidden.detach(), out.detach())
            if self._want_weights:
                if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
                    raise ValueError(f"teacher layer {i} returned no attention weights under eager attention.")
                self.weights[i] = output[1].detach()

        return record


def fwp_layer_indices(student) -> list[int]:
    return [i for i, t in enumerate(student.config.layer_types) if t in ("linear_attention", "hybrid_sliding")]


# What stage 1 matches per layer (Recipe.stage1_objective): the block's output (LoLCATs' MSE), its attention
# weights (Hedgehog's cross-entropy from the teacher's rows to the FWP's), or the sum of both.
STAGE1_OBJECTIVES = ("output", "attention", "both")


def _hidden_only(model) -> dict:
    """Forward keyword arguments that spare ``model`` its vocabulary projection where it takes them: stage 1 needs
    only its attention blocks' inputs and outputs, and SmolLM2-135M's logits over 49k tokens are about 15% of a
    teacher pass."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _layer_errors(student, teacher, batch, objective: str = "output") -> dict[int, torch.Tensor]:
    """Per FWP layer, on the teacher's inputs: MSE between the student's attention output and the teacher's
    (``objective="output"``), the cross-entropy from the teacher's attention rows to the FWP's
    (:meth:`FWPAttention.attention_weights`, ``"attention"``), or their sum (``"both"``)."""
    layers = fwp_layer_indices(student)
    device = next(student.parameters()).device
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = None if mask is None else mask.to(device)
    weights = objective != "output"
    if weights and mask is not None and not bool(mask.all()):
        raise ValueError("attention-weight transfer needs unpadded blocks (packed text); got padding.")
    with torch.no_grad(), TeacherAttentionCapture(teacher, layers, weights=weights) as capture:
        teacher(input_ids=ids, attention_mask=mask, **_hidden_only(teacher))
    position_ids = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
    if mask is not None:
        position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)
    rotary = student.model.rotary_emb
    errors = {}
    for i in layers:
        hidden, target = capture.records[i]
        pe = rotary(hidden, position_ids) if rotary is not None else None
        attn = student.model.layers[i].self_attn
        error = 0.0
        if objective in ("output", "both"):
            out = attn(hidden, position_embeddings=pe, attention_mask=mask)
            diff = (out.float() - target.float()).pow(2).mean(-1)
            error = diff.mean() if mask is None else (diff * mask).sum() / mask.sum()
        if weights:
            student_rows = attn.attention_weights(hidden, position_embeddings=pe)
            teacher_rows = capture.weights[i].to(student_rows.dtype)
            error = error - (teacher_rows * student_rows.clamp_min(1e-12).log()).sum(-1).mean()
        errors[i] = error
    return errors


@torch.no_grad()
def transfer_errors(student, teacher, batches: Iterable[dict]) -> dict[int, float]:
    """Mean per-layer attention-transfer MSE of ``student`` against ``teacher`` over ``batches``."""
    totals, n = {}, 0
    for batch in batches:
        for i, e in _layer_errors(student, teacher, batch).items():
            totals[i] = totals.get(i, 0.0) + e.item()
        n += 1
    return {i: v / max(n, 1) for i, v in totals.items()}


# Queries in the first quarter of a block are left out of a head's span: with few keys behind them every head
# would look local.
_SPAN_FROM = 0.25


@torch.no_grad()
def teacher_attention_spans(teacher, batches: Iterable[dict], *, sinks: int = 1) -> dict[int, torch.Tensor]:
    """Per teacher layer: ``[H]`` float32, how far back each head reads: the mean distance in tokens from a query to
    the keys, weighted by the head's attention.

    ``batches``: dicts with ``input_ids [B, T]`` of unpadded blocks (packed text), run one row at a time through the
    teacher with eager attention (its attention weights, ``[H, T, T]`` per layer, are held for one row). The first
    ``sinks`` keys of a block are left out and the rest renormalised: many heads park their attention on the first
    token (an attention sink), which says nothing about how far back they read. Queries in the first quarter of a
    block are left out too (see ``_SPAN_FROM``).
    """
    device = next(teacher.parameters()).device
    with eager_attention(teacher):
        totals, rows = {}, 0
        for batch in batches:
            mask = batch.get("attention_mask")
            if mask is not None and not bool(mask.all()):
                raise ValueError("teacher_attention_spans needs unpadded blocks (packed text); got padding.")
            for ids in batch["input_ids"].to(device):
                T = ids.shape[0]
                first = max(sinks + 1, int(T * _SPAN_FROM))
                if first >= T:
                    raise ValueError(f"blocks of {T} tokens are too short to measure attention spans; use blocks of "
                                     f"at least {2 * (sinks + 2)} tokens.")
                pos = torch.arange(T, device=device, dtype=torch.float32)
                dist = (pos[first:, None] - pos[None, sinks:]).clamp_min(0)  # [Tq, S]; keys after a query have 0
                attentions = teacher(input_ids=ids[None], output_attentions=True).attentions
                for i, a in enumerate(attentions):
                    a = a[0, :, first:, sinks:].float()  # [H, Tq, S]
                    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
                    totals[i] = totals.get(i, 0.0) + (a * dist).sum(-1).mean(-1)
                rows += 1
    if rows == 0:
        raise ValueError("teacher_attention_spans got no blocks.")
    return {i: t / rows for i, t in totals.items()}


@torch.no_grad()
def match_decays(student, spans: dict[int, torch.Tensor]) -> list[int]:
    """Start each gated FWP layer's decay where its teacher heads read (what ``Recipe(decay_from_teacher=True)``
    does before attention transfer).

    A per-token decay ``gamma`` weighs a key ``n`` tokens back by ``gamma ** n``, whose mean distance is
    ``gamma / (1 - gamma)``; each state head gets the ``gamma`` whose mean distance is the mean span (from
    :func:`teacher_attention_spans`) of the query heads it serves (grouped as grouped-query attention groups them).
    Only ``dt_bias`` changes (``a_proj`` is still 0 after conversion, ``A_log`` keeps its initialisation), so the
    decay is data-independent at first and stage 1 goes on from there. Returns the layers changed.
    """
    changed = []
    for i in fwp_layer_indices(student):
        attn = student.model.layers[i].self_attn
        if not hasattr(attn, "dt_bias"):
            continue
        span = spans[i].to(attn.dt_bias.device, torch.float32)
        heads = attn.dt_bias.numel()
        if span.numel() % heads:
            raise ValueError(f"layer {i}: {span.numel()} teacher heads do not group into {heads} state heads.")
        span = span.view(heads, -1).mean(-1).clamp_min(1e-2)
        log_decay = torch.log1p(1 / span)  # -log(gamma) for gamma = span / (1 + span)
        dt = log_decay / attn.A_log.float().exp()
        attn.start_decays(dt)
        changed.append(i)
    return changed


@dataclass
class TransferResult:
    """Per-layer errors before and after stage 1, and the training loss per step."""

    before: dict[int, float]
    after: dict[int, float]
    losses: list[float] = field(default_factory=list)

    def table(self) -> str:
        rows = ["| layer | MSE before | MSE after | after / before |", "|---|---|---|---|"]
        for i in self.before:
            rows.append(f"| {i} | {self.before[i]:.4g} | {self.after[i]:.4g} | {self.after[i] / self.before[i]:.3f} |")
        return "\n".join(rows)

    def plot(self, path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
        layers = list(self.before)
        a.bar([x - 0.2 for x in range(len(layers))], [self.before[i] for i in layers], 0.4, label="before")
        a.bar([x + 0.2 for x in range(len(layers))], [self.after[i] for i in layers], 0.4, label="after")
        a.set(xticks=range(len(layers)), xticklabels=layers, xlabel="layer", ylabel="attention MSE", yscale="log",
              title="attention transfer error per layer")
        a.legend()
        b.plot(self.losses)
        b.set(xlabel="step", ylabel="summed MSE", yscale="log", title="stage 1 loss")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def trainable_fwp_parameters(student) -> list[torch.nn.Parameter]:
    """Freeze the student except the parameters the conversion added; return those."""
    student.requires_grad_(False)
    params = []
    for name, p in student.named_parameters():
        if is_new_fwp_parameter(name):
            p.requires_grad_(True)
            params.append(p)
    if not params:
        if all(t in ("full_attention", "sliding_attention") for t in student.config.layer_types):
            raise ValueError("Every layer stayed softmax (keep_softmax='all'): there is nothing to distill; convert "
                             "only (hf-fwp convert) or keep fewer layers.")
        raise ValueError("The student has no FWP parameters to train (identity feature maps and no gates?). Use a "
                         "learned feature map (hedgehog, t2r) or a gated/delta rule.")
    return params


def attention_transfer(student, teacher, batches: list[dict], *, steps: int, lr: float = 1e-2,
                       eval_batches: list[dict] | None = None, progress: bool = True,
                       autocast_dtype: torch.dtype | None = None, objective: str = "output") -> TransferResult:
    """Stage 1: train the student's new FWP parameters to reproduce each teacher attention block.

    ``batches`` (cycled) and ``eval_batches`` are dicts with ``input_ids`` ``[B, T]`` (and optionally
    ``attention_mask``), moved to the student's device. ``autocast_dtype`` (e.g. ``torch.bfloat16``): mixed
    precision, the student's weights staying in their own (float32) dtype. ``objective``: what each layer is
    trained to match (:data:`STAGE1_OBJECTIVES`; ``"attention"`` and ``"both"`` need FWP layers with
    ``attention_weights``, i.e. normalised linear rules without a softmax branch). Returns the per-layer output
    MSE on ``eval_batches`` (default: the first batch) before and after, whatever the objective.
    """
    if objective not in STAGE1_OBJECTIVES:
        raise ValueError(f"objective must be one of {STAGE1_OBJECTIVES}; got {objective!r}.")
    if autocast_dtype is not None:
        device_type = next(student.parameters()).device.type
        with torch.autocast(device_type, dtype=autocast_dtype):
            return attention_transfer(student, teacher, batches, steps=steps, lr=lr, eval_batches=eval_batches,
                                      progress=progress, objective=objective)
    teacher.eval()
    eval_batches = eval_batches or batches[:1]
    params = trainable_fwp_parameters(student)
    before = transfer_errors(student, teacher, eval_batches)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    student.train()
    losses = []
    for step in tqdm(range(steps), desc="attention transfer", disable=not progress):
        loss = sum(_layer_errors(student, teacher, batches[step % len(batches)], objective).values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    student.eval()
    return TransferResult(before, transfer_errors(student, teacher, eval_batches), losses)


__all__ = ["STAGE1_OBJECTIVES", "TeacherAttentionCapture", "TransferResult", "attention_transfer", "eager_attention",
           "transfer_errors", "trainable_fwp_parameters", "fwp_layer_indices", "teacher_attention_spans",
           "match_decays"]
