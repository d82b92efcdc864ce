"""What a linearisation run builds and how long it trains: :class:`Recipe` (validated on construction), the
named student layouts of :data:`NAMED_RECIPES` (the CLI's ``--recipe``), and where a run trains (:func:`placement`).
:func:`hf_fwp.conversion.pipeline.run` takes a Recipe; the pipeline module re-exports these names."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch

from hf_fwp.conversion.trainer import DEFAULT_LORA_TARGETS

class RecipeError(ValueError):
    """A bad :class:`Recipe` field: ``field`` names it (the CLI turns it into its flag)."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"Recipe: {field_name} {problem}")
        self.field, self.problem = field_name, problem


# The softmax window of hybrid layers when a Recipe names none: 128 (LoLCATs uses 64; on SmolLM2 128 gave 1.200 vs
# 1.555 mean student/teacher perplexity on 256-token blocks and 1.616 vs 2.084 on 1024-token ones, at 40 + 60 steps).
DEFAULT_WINDOW = 128
# How hybrid layers join softmax and FWP when a Recipe names nothing (FWPConfig.hybrid_combine), for the rules and
# feature maps that can share softmax's normaliser (linear rules with non-negative features); the rest mix ("lerp").
# The mix stays the default: a shared normaliser measured worse at the CPU budget (1.653 vs 1.555 with a 64-token
# window, 1.242 vs 1.200 with 128; benchmarks/results/recipe_experiments.md).
DEFAULT_COMBINE = "lerp"


@dataclass
class Recipe:
    """What to build and how long to train it.

    Defaults: the LoLCATs-style hybrid (every layer: a 128-token softmax window + Hedgehog linear attention, mixed
    per head), chosen by measurement on SmolLM2-135M (``benchmarks/results/recipe_experiments.md``): the hybrid
    against a pure gated-delta student (1.39 vs 1062 student/teacher perplexity after 8 CPU minutes), one
    fast-weight state per key/value head (``fwp_state_heads="kv"``: 1.391 vs 1.388 per query head, a 3x smaller
    state), a 128-token window (1.200 vs 1.555 with 64 on the mixed offline corpus at 40 + 60 steps), a stage-2
    learning rate of 3e-3 (with the window: 1.161) and the stage-2 KL at temperature 1 (at the demo's budget: 1.083
    vs 1.101 at temperature 2; 1.308 vs 1.337 on 1024-token blocks).

    Where it runs: on a CUDA GPU when one is present (else the CPU); ``precision="auto"`` trains in bf16 mixed
    precision on a GPU that supports it (teacher in bf16, student weights in float32 under autocast, the Triton
    kernels) and in float32 on the CPU; ``"bf16"`` / ``"fp32"`` force one. ``gradient_checkpointing`` recomputes
    the student's layers in stage 2's backward pass (less activation memory for long blocks on a GPU).
    """

    fwp_rule: str = "linear"
    feature_map: str = "hedgehog"
    keep_softmax: str | int | list = "none"
    fwp_layer_type: str = "hybrid_sliding"
    sliding_window: int | None = None  # hybrid_sliding: None means DEFAULT_WINDOW; linear_attention: must be None
    hybrid_combine: str | None = None  # hybrid_sliding: None means DEFAULT_COMBINE where the rule allows it
    fwp_state_heads: str = "kv"
    fwp_options: dict = field(default_factory=dict)
    decay_from_teacher: bool = False  # gated rules: start each head's decay at its teacher heads' attention span
    stage1_objective: str = "output"  # what stage 1 matches per layer (distill.STAGE1_OBJECTIVES)
    block_size: int = 256
    batch_size: int = 4
    stage1_steps: int = 100
    stage1_lr: float = 1e-2
    stage2_steps: int = 100
    stage2_lr: float = 3e-3
    grad_accum: int = 1
    lora_rank: int = 8
    lora_targets: tuple = DEFAULT_LORA_TARGETS
    train_fwp_in_stage2: bool = True
    temperature: float = 1.0
    ce_weight: float = 0.0
    save_steps: int = 50
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        """Validate every field before any work: a bad value found after stage 1 would cost its minutes."""
        from hf_fwp.conversion.distill import STAGE1_OBJECTIVES
        from hf_fwp.modeling.configuration_fwp import FEATURE_MAPS, FWP_RULES

        def need(ok: bool, name: str, rule: str):
            if not ok:
                raise RecipeError(name, f"must be {rule}; got {getattr(self, name)!r}.")

        def number(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        def count(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        need(self.fwp_rule in FWP_RULES, "fwp_rule", f"one of {FWP_RULES}")
        need(self.feature_map in FEATURE_MAPS, "feature_map", f"one of {FEATURE_MAPS}")
        need(self.fwp_layer_type in ("linear_attention", "hybrid_sliding"), "fwp_layer_type",
             "'linear_attention' or 'hybrid_sliding'")
        need(self.sliding_window is None or (count(self.sliding_window) and self.sliding_window >= 1),
             "sliding_window", "None or a positive number of tokens")
        if self.fwp_layer_type == "hybrid_sliding" and self.sliding_window is None:
            self.sliding_window = DEFAULT_WINDOW
        need(self.fwp_layer_type == "hybrid_sliding" or self.sliding_window is None, "sliding_window",
             "None with fwp_layer_type='linear_attention' (it is the window of hybrid_sliding layers; kept softmax "
             "layers keep the teacher's own)")
        need(self.fwp_state_heads in ("query", "kv"), "fwp_state_heads", "'query' or 'kv'")
        # A shared normaliser needs the linear-attention denominator (see _normalizes()).
        shareable = self.fwp_layer_type == "hybrid_sliding" and self._normalizes()
        if self.hybrid_combine is None:
            self.hybrid_combine = DEFAULT_COMBINE if shareable else "lerp"
        need(self.hybrid_combine in ("lerp", "shared_normalizer"), "hybrid_combine",
             "None, 'lerp' or 'shared_normalizer'")
        need(self.hybrid_combine == "lerp" or shareable, "hybrid_combine",
             "'lerp' here: 'shared_normalizer' needs hybrid_sliding layers with a linear rule ('linear', "
             "'gated_linear') and a non-negative feature map (e.g. hedgehog, t2r, elu_plus_one)")
        def keep_spec(keep) -> bool:
            if isinstance(keep, str):
                return keep in ("all", "none")
            if isinstance(keep, (list, tuple)):
                return all(count(i) and i >= 0 for i in keep)
            return count(keep) and keep >= 1

        need(keep_spec(self.keep_softmax), "keep_softmax",
             "'all', 'none', an int k >= 1 (every k-th layer) or a list of layer indices")
        need(not isinstance(self.keep_softmax, (list, tuple)) or len(set(self.keep_softmax)) == len(self.keep_softmax),
             "keep_softmax", "a list naming each layer once")
        for name in ("batch_size", "stage2_steps", "grad_accum", "lora_rank", "save_steps"):
            need(count(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer >= 1")
        need(count(self.block_size) and self.block_size >= 2, "block_size", "an integer >= 2 (tokens per block)")
        need(count(self.seed), "seed", "an integer")
        need(isinstance(self.train_fwp_in_stage2, bool), "train_fwp_in_stage2", "True or False")
        need(isinstance(self.decay_from_teacher, bool), "decay_from_teacher", "True or False")
        need(not self.decay_from_teacher or self.fwp_rule.startswith("gated_"), "decay_from_teacher",
             f"False with fwp_rule={self.fwp_rule!r}, which has no decay (use 'gated_linear' or 'gated_delta')")
        need(self.stage1_objective in STAGE1_OBJECTIVES, "stage1_objective", f"one of {STAGE1_OBJECTIVES}")
        need(self.stage1_objective == "output" or (self.fwp_layer_type == "linear_attention" and self._normalizes()),
             "stage1_objective", "'output' here: matching attention weights needs linear_attention layers of a "
             "normalised linear rule ('linear' or 'gated_linear' with a non-negative feature map, e.g. hedgehog)")
        need(isinstance(self.gradient_checkpointing, bool), "gradient_checkpointing", "True or False")
        need(self.precision in ("auto", "fp32", "bf16"), "precision", "'auto', 'fp32' or 'bf16'")
        need(isinstance(self.lora_targets, (list, tuple)) and len(self.lora_targets) > 0
             and all(isinstance(t, str) and t for t in self.lora_targets), "lora_targets",
             "a non-empty list of module names (e.g. ('q_proj', 'v_proj'))")
        need(count(self.stage1_steps) and self.stage1_steps >= 0, "stage1_steps", "an integer >= 0")
        for name in ("stage1_lr", "stage2_lr", "temperature"):
            need(number(getattr(self, name)) and 0 < getattr(self, name) < math.inf, name, "a positive finite number")
        need(number(self.ce_weight) and 0 <= self.ce_weight < math.inf, "ce_weight", "a finite number >= 0")
        need(isinstance(self.fwp_options, dict), "fwp_options", "a dict of FWPConfig fields")
        own = sorted(set(self.fwp_options) & {"fwp_rule", "feature_map", "fwp_state_heads", "keep_softmax",
                                              "fwp_layer_type", "sliding_window", "hybrid_combine"})
        need(not own, "fwp_options", f"other FWPConfig fields than Recipe's own ({', '.join(own)}: set those as "
             "Recipe fields)")
        if (self.fwp_layer_type == "hybrid_sliding" and self.sliding_window is not None
                and self.sliding_window >= self.block_size):
            warnings.warn(f"Recipe: sliding_window {self.sliding_window} >= block_size {self.block_size}: the softmax "
                          "window covers every training block, so distillation never needs the FWP branch (it learns "
                          "nothing about contexts beyond the window). Use a block_size several times the window.",
                          stacklevel=3)

    def _normalizes(self) -> bool:
        """Whether the student is classic normalised linear attention: a linear rule with a non-negative feature map
        and no L2 norm chosen in ``fwp_options`` (convert_options() then sets ``normalize_attention``)."""
        return (self.fwp_rule in ("linear", "gated_linear") and self.feature_map not in ("identity", "silu")
                and "qk_l2norm" not in self.fwp_options)

    def convert_options(self, teacher=None) -> dict:
        """``convert()``'s keyword arguments for this recipe. With ``teacher`` given, an ``fwp_rotary`` of
        ``fwp_options`` is kept only for a teacher with rotary positions: one with a learned position table
        (GPT-2) adds its positions to the hidden states, so its q/k already carry them."""
        extra = dict(self.fwp_options)
        if teacher is not None and extra.get("fwp_rotary") and learned_positions(teacher) is not None:
            del extra["fwp_rotary"]
        opts = dict(fwp_rule=self.fwp_rule, feature_map=self.feature_map, fwp_state_heads=self.fwp_state_heads,
                    **extra)
        if self._normalizes():
            opts.update(qk_l2norm=False, normalize_attention=True)
        if self.fwp_layer_type == "hybrid_sliding":
            opts.update(hybrid_combine=self.hybrid_combine)
        return dict(keep_softmax=self.keep_softmax, fwp_layer_type=self.fwp_layer_type,
                    sliding_window=self.sliding_window, **opts)


# Named recipes: the student layouts the README table reports, by the names the CLI's --recipe takes. Each is a set
# of Recipe fields (its layout, and its training lengths where they were measured to differ); the rest are Recipe()'s.
NAMED_RECIPES = {
    # The default: every layer mixes a 128-token softmax window with Hedgehog linear attention (Recipe()).
    "hybrid": {},
    # No softmax at all (decode memory constant in the context, no window): normalised Hedgehog linear attention
    # that knows the order of its context, by a decay gate (Mamba2's initialisation) and a short conv started at the
    # identity, with one state per query head. At 40 + 60 steps: 2.66 mean student/teacher perplexity (3.85 on
    # 1024-token blocks) against 6.46 (11.20) for the same attention without decay and conv; one state per query
    # head instead of per key/value head 2.27 (3.21), for a 3x larger (still constant) state. Measured and left
    # out: decays started slow (3.15 / 4.68) or at the teacher heads' spans (decay_from_teacher: 2.64 / 3.84), RoPE
    # on the FWP's q/k (better at the trained length, worse beyond it; fwp_options={"fwp_rotary": True}), LoRA on
    # the MLPs too (2.22 / 3.11 with per-query states, for 15% slower steps), stage 1 on attention weights instead
    # of outputs (stage1_objective="attention": 3.11 / 5.10; "both": 2.77 / 4.12). Stage 1 is its cheapest lever
    # (a step costs half a stage-2 step): with stage 2 held at 60 steps, 40 / 80 / 160 / 320 stage-1 steps gave
    # 2.27 / 1.95 / 1.75 / 1.62 (3.19 / 2.73 / 2.44 / 2.25), so its training budget goes mostly to stage 1: at the
    # demo's budget 300 + 80 steps gave 1.62 (2.12) against 1.74 (2.31) for 80 + 180, in float32; in bf16 500 + 150
    # gave 1.49 (2.00). Also measured and left out: stage 1 moving the q/k projections too (2.24 vs 2.27 at 40 + 60)
    # and a Hedgehog map twice as wide (feature_map_dim=128: level at equal minutes, 1.48 vs 1.49)
    # (benchmarks/results/recipe_experiments.md).
    "pure-fwp": dict(fwp_rule="gated_linear", feature_map="hedgehog", fwp_layer_type="linear_attention",
                     fwp_state_heads="query", fwp_options=dict(use_short_conv=True), stage1_steps=300,
                     stage2_steps=80),
}


def named_recipe(name: str, **fields) -> Recipe:
    """``Recipe`` of a :data:`NAMED_RECIPES` layout, with ``fields`` (any Recipe field) on top."""
    if name not in NAMED_RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {', '.join(NAMED_RECIPES)}.")
    return Recipe(**{**copy.deepcopy(NAMED_RECIPES[name]), **fields})


def placement(recipe: Recipe, *, cuda: bool | None = None, cuda_bf16: bool | None = None) -> tuple[str, bool]:
    """``(device, bf16)`` for a run of ``recipe``: the GPU when there is one, bf16 mixed precision per
    ``recipe.precision`` (``"auto"``: on a GPU that supports it). ``cuda`` / ``cuda_bf16`` override the detection."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda_bf16 is None:
        cuda_bf16 = cuda and torch.cuda.is_bf16_supported()
    bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and cuda and cuda_bf16)
    return ("cuda" if cuda else "cpu"), bf16


def learned_positions(model) -> int | None:
    """The length of a model's learned position table (GPT-2 style, or an FWP student converted from one); None
    when positions are not a table (rotary)."""
    config = model.config
    if getattr(config, "position_embedding_type", None) == "learned":
        return config.max_position_embeddings
    return getattr(config, "n_positions", None)
