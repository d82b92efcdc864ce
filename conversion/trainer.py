"""Stage 2 of distillation: LoRA (through ``peft``) with the logits of the softmax teacher as the target."""

from __future__ import annotations

import os
import re
import warnings

import torch
from safetensors.torch import load_file, save_file
import torch.nn.functional as F
from transformers import Trainer

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# A PEFT checkpoint holds only the adapters; trainable FWP parameters outside them are saved beside it.
EXTRA_WEIGHTS = "fwp_parameters.safetensors"


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose loss is ``kl_weight * T^2 * KL(teacher_T || student_T) + ce_weight * CE(labels)``.

    The teacher is kept in eval mode, without gradients, on the accelerator's device (placed by accelerate with
    the student). Padding positions (``attention_mask == 0``) are excluded from both terms.
    """

    def __init__(self, *args, teacher, temperature: float = 2.0, kl_weight: float = 1.0, ce_weight: float = 0.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        teacher.requires_grad_(False)
        self.teacher = self.accelerator.prepare_model(teacher.eval(), evaluation_mode=True)
        self.temperature, self.kl_weight, self.ce_weight = temperature, kl_weight, ce_weight
        # The loss below is a mean over tokens of this micro-batch: let Trainer divide it by the accumulation steps.
        self.loss_is_scaled_for_ga = False

    def _extra_trainable(self, model=None) -> dict:
        model = model or self.model
        return {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        extra = self._extra_trainable()
        if extra and self.args.should_save:  # the main process writes (every process gets here under torchrun)
            path = os.path.join(output_dir or self.args.output_dir, EXTRA_WEIGHTS)
            # Written beside and renamed: a kill mid-write leaves no truncated file that would load.
            tmp = f"{path}.{os.getpid()}.tmp"
            save_file({n: p.detach().cpu().contiguous() for n, p in extra.items()}, tmp)
            os.replace(tmp, path)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, EXTRA_WEIGHTS)
        params = self._extra_trainable(model)
        if params and not os.path.exists(path):
            raise ValueError(f"checkpoint {resume_from_checkpoint} has no {EXTRA_WEIGHTS}: resuming from it would put "
                             f"{len(params)} trained FWP tensors back at their starting values.")
        if params:
            with torch.no_grad():
                for n, t in load_file(path).items():
                    params[n].copy_(t)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        with torch.no_grad():
            t_logits = self.teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
        weights = torch.ones_like(ids, dtype=torch.float32) if mask is None else mask.float()
        T = self.temperature
        kl = distillation_kl(out.logits, t_logits, T)
        loss = self.kl_weight * T * T * (kl * weights).sum() / weights.sum()
        if self.ce_weight:
            labels = inputs.get("labels", ids)
            if mask is not None:
                labels = labels.masked_fill(mask == 0, -100)
            ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            loss = loss + self.ce_weight * ce
        return (loss, out) if return_outputs else loss


class _DistillationKL(torch.autograd.Function):
    """Per-token ``KL(softmax(t / T) || softmax(s / T))`` over the vocabulary, a few rows at a time.

    Written out, the loss makes four float32 tensors of the logits' size (both log-softmaxes, the teacher's
    probabilities, their difference) and autograd keeps two; with a 49k vocabulary that is 200 MB each for 4 x 256
    tokens, and on CPU most of their cost is the first touch of fresh memory. Here each block of rows is done while
    it is in cache, and the only full-size tensor is the gradient, ``(softmax(s / T) - softmax(t / T)) / T``, kept for
    the backward pass (0.59 -> 0.21 s per step for SmolLM2's logits, forward and backward, on 2 cores)."""

    @staticmethod
    def forward(ctx, s_logits, t_logits, T: float, rows: int):
        V = s_logits.shape[-1]
        S, Tl = s_logits.detach().reshape(-1, V), t_logits.detach().reshape(-1, V)
        kl = torch.empty(S.shape[0], dtype=torch.float32, device=S.device)
        grad = torch.empty(S.shape, dtype=torch.float32, device=S.device) if ctx.needs_input_grad[0] else None
        for i in range(0, S.shape[0], rows):
            s = F.log_softmax(S[i:i + rows].float() / T, dim=-1)
            t = F.log_softmax(Tl[i:i + rows].float() / T, dim=-1)
            p = t.exp()
            kl[i:i + rows] = (p * (t - s)).sum(-1)
            if grad is not None:
                grad[i:i + rows] = (s.exp_() - p).div_(T)
        ctx.save_for_backward(grad)
        ctx.dtype = s_logits.dtype
        return kl.view(s_logits.shape[:-1])

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad.view(*g.shape, -1) * g[..., None]).to(ctx.dtype), None, None, None


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                    rows: int = 64) -> torch.Tensor:
    """``[..., V]`` student and teacher logits (any float dtypes) -> the per-token ``KL(teacher_T || student_T)``
    ``[...]`` in float32, differentiable in the student's logits (their dtype for the gradient); computed ``rows``
    tokens at a time (see :class:`_DistillationKL`)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distillation_kl: student and teacher logits must have one shape; got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)} (do they share a vocabulary?).")
    return _DistillationKL.apply(student_logits, teacher_logits, float(temperature), rows)


def last_complete_checkpoint(output_dir, *, needs_extra: bool) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that was written to the end: its trainer state (saved last
    by ``Trainer``) and, when FWP parameters train beside the adapters, :data:`EXTRA_WEIGHTS`. Newer incomplete
    ones (a run killed while saving) are skipped with a warning, not resumed from."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted((int(m.group(1)), name) for name in os.listdir(output_dir)
                   if (m := re.fullmatch(r"checkpoint-(\d+)", name)))
    for _, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        needed = ["trainer_state.json"] + ([EXTRA_WEIGHTS] if needs_extra else [])
        missing = [f for f in needed if not os.path.exists(os.path.join(folder, f))]
        if not missing:
            return folder
        warnings.warn(f"skipping incomplete checkpoint {folder} (no {', '.join(missing)}); resuming from an older one")
    return None


def add_lora(student, *, targets=DEFAULT_LORA_TARGETS, rank: int = 8, alpha: int = 16, train_fwp: bool = False):
    """Wrap ``student`` with LoRA adapters on ``targets``; with ``train_fwp`` the FWP parameters train too."""
    import peft

    from hf_fwp.conversion.convert import is_new_fwp_parameter

    model = peft.get_peft_model(student, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                                         lora_dropout=0.0, task_type="CAUSAL_LM"))
    if train_fwp:
        for name, p in model.named_parameters():
            if is_new_fwp_parameter(name) and "lora_" not in name:
                p.requires_grad_(True)
    return model


@torch.no_grad()
def mean_kl(student, teacher, batches, temperature: float = 1.0) -> float:
    """Token-averaged KL(teacher || student) at ``temperature`` over ``batches`` of ``input_ids``."""
    total, n = 0.0, 0
    for b in batches:
        kl = distillation_kl(student(input_ids=b["input_ids"]).logits, teacher(input_ids=b["input_ids"]).logits,
                             temperature)
        total += kl.sum().item()
        n += b["input_ids"].numel()
    return total / n
