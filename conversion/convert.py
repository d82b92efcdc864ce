"""``convert(model, **options)``: turn a pretrained softmax causal LM into an :class:`FWPForCausalLM`.

The source is read through the declarative tables of :mod:`hf_fwp.conversion.architectures`. Attention projections,
MLPs, norms and embeddings are copied; what a softmax layer does not have (feature maps, beta, decay gates, hybrid
mixing factors) keeps the documented initialisation of ``FWPAttention.reset_fwp_parameters``: learned feature maps
start at the identity, beta at 0.5, decay gates as ``decay_init`` says, the hybrid FWP weight small
(``hybrid_mix_init``). A short conv (``use_short_conv=True``) starts as the identity, without activation unless one
is asked for, so the student's first q/k/v are the teacher's.
"""

from __future__ import annotations

import torch

from hf_fwp.conversion.architectures import ARCHITECTURES, layer_map, source_layer_types
from hf_fwp.modeling import FWPConfig, FWPForCausalLM

# Converted FWP layers start without the parts that would change what the pretrained projections compute
# (short conv, output norm and gate); pass them in **fwp_options to add them (a conv then starts as the identity).
CONVERSION_DEFAULTS = dict(fwp_rule="gated_delta", feature_map="identity", qk_l2norm=True, use_short_conv=False,
                           conv_activation=None, use_output_norm=False, use_output_gate=False)


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def plan_layer_types(num_layers: int, source_types: list[str], keep_softmax="none", fwp_layer_type="linear_attention"):
    """``layer_types`` of the converted model.

    ``keep_softmax``: ``"all"``, ``"none"``, a list of layer indices, or an int k (every k-th layer stays softmax:
    layers k-1, 2k-1, ...). Kept layers keep their source kind (full or sliding window); the others become
    ``fwp_layer_type`` (``"linear_attention"`` or ``"hybrid_sliding"``).
    """
    if fwp_layer_type not in ("linear_attention", "hybrid_sliding"):
        raise ValueError(f"fwp_layer_type must be 'linear_attention' or 'hybrid_sliding', got {fwp_layer_type!r}.")
    if isinstance(keep_softmax, bool) or (isinstance(keep_softmax, str) and keep_softmax not in ("all", "none")) \
            or not isinstance(keep_softmax, (str, int, list, tuple, set, type(None))):
        raise ValueError(f"keep_softmax must be 'all', 'none', an int k (every k-th layer) or a list of layer indices "
                         f"like [0, 3]; got {keep_softmax!r} (the command line's 'every:2' / '0,3' forms are "
                         "written 2 / [0, 3] in Python).")
    if keep_softmax == "all":
        keep = set(range(num_layers))
    elif keep_softmax in ("none", None):
        keep = set()
    elif isinstance(keep_softmax, int) and not isinstance(keep_softmax, bool):
        if keep_softmax < 1:
            raise ValueError(f"keep_softmax as an int means 'every k-th layer' and must be >= 1, got {keep_softmax}.")
        keep = set(range(keep_softmax - 1, num_layers, keep_softmax))
    else:
        keep = set(keep_softmax)
        if len(keep) != len(list(keep_softmax)):
            raise ValueError(f"keep_softmax lists a layer twice: {list(keep_softmax)}; name each layer once.")
        bad = sorted(i for i in keep if not isinstance(i, int) or not 0 <= i < num_layers)
        if bad:
            raise ValueError(f"keep_softmax indices {bad} are not layers of this {num_layers}-layer model.")
    return [source_types[i] if i in keep else fwp_layer_type for i in range(num_layers)]


def convert(model, *, keep_softmax="none", fwp_layer_type="linear_attention", sliding_window=None,
            **fwp_options) -> FWPForCausalLM:
    """Convert a loaded transformers causal LM into an FWP model with the same weights.

    Args:
        model: a ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` or
            ``GPT2LMHeadModel`` (see :func:`supported_architectures`).
        keep_softmax: which layers stay softmax (see :func:`plan_layer_types`); ``"all"`` reproduces the source.
        fwp_layer_type: ``"linear_attention"`` (pure FWP) or ``"hybrid_sliding"`` (sliding softmax + FWP).
        sliding_window: window of hybrid layers (required for them); kept sliding-window layers keep the source's.
        **fwp_options: any FWPConfig FWP field (``fwp_rule``, ``feature_map``, ``normalize_attention``, ...);
            defaults in :data:`CONVERSION_DEFAULTS`.

    Returns an ``FWPForCausalLM`` in the source's dtype and device, in eval mode.
    """
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ValueError(
            f"hf_fwp.convert does not support {name}; supported architectures: {', '.join(supported_architectures())}."
        )
    arch = ARCHITECTURES[name]
    src = model.config
    fields = arch.config_map(src)
    types = plan_layer_types(fields["num_hidden_layers"], source_layer_types(name, src), keep_softmax, fwp_layer_type)
    if fwp_layer_type == "linear_attention" and sliding_window is not None:
        raise ValueError(f"convert: sliding_window={sliding_window!r} sets the window of hybrid_sliding layers, and "
                         "fwp_layer_type='linear_attention' makes none; leave it out, or use "
                         "fwp_layer_type='hybrid_sliding' (kept softmax layers keep the source's own window).")
    if fwp_layer_type == "hybrid_sliding" and sliding_window is None and "hybrid_sliding" in types:
        raise ValueError("fwp_layer_type='hybrid_sliding' needs sliding_window=<tokens> (e.g. 64).")
    # Kept sliding layers keep the source's window; hybrid layers get their own (FWPConfig.hybrid_window).
    kept_window = getattr(src, "sliding_window", None) if "sliding_attention" in types else None
    hybrid_window = sliding_window if "hybrid_sliding" in types else None
    if "hybrid_sliding" not in types and fwp_options.get("hybrid_combine") == "shared_normalizer":
        # A Recipe cannot know the teacher's layer count: with a keep-everything spec (every:1, a full list) there
        # is no hybrid layer to join, so its hybrid_combine has nothing to apply to.
        fwp_options = {k: v for k, v in fwp_options.items() if k != "hybrid_combine"}
    unknown = sorted(set(fwp_options) - set(FWPConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"convert: unknown FWPConfig options {unknown}.")
    if "layer_types" in fwp_options or "num_hidden_layers" in fwp_options:
        raise ValueError("convert: the layer layout is set by keep_softmax (which layers stay softmax) and "
                         "fwp_layer_type ('linear_attention' or 'hybrid_sliding'), not by layer_types / "
                         "num_hidden_layers.")
    owned = sorted(set(fwp_options) & set(fields))
    if owned:
        raise ValueError(f"convert: {owned} come from the source model's config ({name}) and cannot change in a "
                         "conversion (the pretrained weights fix them).")
    config = FWPConfig(**{**fields, **CONVERSION_DEFAULTS, **fwp_options, "layer_types": types,
                          "sliding_window": kept_window if kept_window is not None else hybrid_window,
                          "hybrid_window": hybrid_window if kept_window not in (None, hybrid_window) else None})
    sd = model.state_dict()
    out = FWPForCausalLM(config)
    target = out.state_dict()
    new = {}
    new["model.embed_tokens.weight"] = sd[f"{arch.embed}.weight"]
    if arch.positions:
        new["model.embed_positions.weight"] = sd[f"{arch.positions}.weight"]
    for suffix in ("weight", "bias"):
        if f"{arch.final_norm}.{suffix}" in sd:
            new[f"model.norm.{suffix}"] = sd[f"{arch.final_norm}.{suffix}"]
    if not config.tie_word_embeddings:
        new["lm_head.weight"] = model.get_output_embeddings().weight.detach()
    table = layer_map(name, src)
    for i in range(config.num_hidden_layers):
        for dst, (source, transform) in table.items():
            key = f"model.layers.{i}.{dst}"
            if key not in target:
                if ".softmax." in dst:
                    continue  # q/k norms of a layer that became pure FWP
                raise KeyError(f"converter table for {name} names {dst}, which FWP layer {i} does not have")
            new[key] = _transform(sd[f"{arch.layers}.{i}.{source}"], transform)
    missing, unexpected = out.load_state_dict(new, strict=False)
    if unexpected:
        raise KeyError(f"converter produced unknown weights {unexpected}")
    copied_but_missing = [k for k in missing if not is_new_fwp_parameter(k)]
    if copied_but_missing and not (config.tie_word_embeddings and copied_but_missing == ["lm_head.weight"]):
        raise KeyError(f"converter left pretrained weights unset: {copied_but_missing}")
    for layer in out.model.layers:
        conv = getattr(layer.self_attn, "conv", None)
        if conv is not None:
            conv.init_identity()
    if config.tie_word_embeddings:
        out.tie_weights()
    param = next(model.parameters())
    return out.to(device=param.device, dtype=param.dtype).eval()


_NEW_FWP_PARTS = ("feature_map_", "b_proj", "a_proj", "A_log", "dt_bias", "mix_logit", ".conv.", "o_norm", "g_proj")


def is_new_fwp_parameter(key: str) -> bool:
    """True for parameters a softmax source does not have (what attention transfer trains)."""
    return any(part in key for part in _NEW_FWP_PARTS)


def _transform(t: torch.Tensor, transform) -> torch.Tensor:
    t = t.detach()
    if transform is None:
        return t
    if transform == "t":
        return t.t().contiguous()
    _, i, n = transform
    if t.dim() == 2:  # Conv1D [in, n * out]: transpose to Linear's [n * out, in], then take part i
        t = t.t()
    return t.chunk(n, dim=0)[i].contiguous()
