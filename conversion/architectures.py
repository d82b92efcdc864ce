"""Declarative per-architecture tables: where a source causal LM keeps each weight and how its config maps to
:class:`~hf_fwp.modeling.FWPConfig`.

A table gives the source's module paths (embeddings, layer list, final norm, LM head) and, per decoder layer, a map
``FWP parameter name -> (source parameter name, transform)``. Transforms: ``None`` (copy), ``"t"`` (transpose: GPT-2's
Conv1D stores ``[in, out]``), and ``("split", i, n)`` (rows ``i`` of ``n`` equal parts of a fused tensor, after the
transpose for Conv1D weights: GPT-2's ``c_attn`` holds q, k and v).
"""

from __future__ import annotations

from dataclasses import dataclass, field

Transform = None | str | tuple


@dataclass(frozen=True)
class Architecture:
    """How to read one source architecture."""

    embed: str
    layers: str
    final_norm: str
    layer_map: dict[str, tuple[str, Transform]]
    positions: str | None = None  # learned absolute position table, if any
    config_map: callable = field(default=None)
    attention: str = "self_attn"  # the attention block inside a source layer (hooked for attention transfer)


def _llama_like_layer(q_norm: bool = False, attn_bias: bool = False, o_bias: bool = False, mlp_bias: bool = False):
    names = {
        "self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.k_proj",
        "self_attn.v_proj": "self_attn.v_proj", "self_attn.o_proj": "self_attn.o_proj",
        "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj",
    }
    table = {f"{t}.weight": (f"{s}.weight", None) for t, s in names.items()}
    for proj in ("q_proj", "k_proj", "v_proj"):
        if attn_bias:
            table[f"self_attn.{proj}.bias"] = (f"self_attn.{proj}.bias", None)
    if o_bias:
        table["self_attn.o_proj.bias"] = ("self_attn.o_proj.bias", None)
    if mlp_bias:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            table[f"mlp.{proj}.bias"] = (f"mlp.{proj}.bias", None)
    table["input_layernorm.weight"] = ("input_layernorm.weight", None)
    table["post_attention_layernorm.weight"] = ("post_attention_layernorm.weight", None)
    if q_norm:
        # Softmax and hybrid layers keep q/k norms in their softmax branch; pure FWP layers have none (dropped).
        table["self_attn.softmax.q_norm.weight"] = ("self_attn.q_norm.weight", None)
        table["self_attn.softmax.k_norm.weight"] = ("self_attn.k_norm.weight", None)
    return table


def _base_config(src) -> dict:
    heads = src.num_attention_heads
    return dict(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size, intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers, num_attention_heads=heads,
        num_key_value_heads=getattr(src, "num_key_value_heads", None) or heads,
        head_dim=getattr(src, "head_dim", None) or src.hidden_size // heads, hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings, rms_norm_eps=src.rms_norm_eps,
        rope_parameters=dict(src.rope_parameters), tie_word_embeddings=src.tie_word_embeddings,
        bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id, pad_token_id=src.pad_token_id,
        initializer_range=src.initializer_range, norm_type="rms", mlp_type="gated", position_embedding_type="rope",
    )


def _source_layer_types(src) -> list[str]:
    types = getattr(src, "layer_types", None)
    if types is None:
        window = getattr(src, "sliding_window", None)
        types = ["sliding_attention" if window else "full_attention"] * src.num_hidden_layers
    return list(types)


def _llama_config(src) -> dict:
    bias = bool(getattr(src, "attention_bias", False))
    return dict(_base_config(src), attention_bias=bias, attention_output_bias=bias,
                mlp_bias=bool(getattr(src, "mlp_bias", False)))


def _qwen2_config(src) -> dict:
    return dict(_base_config(src), attention_bias=True, attention_output_bias=False)


def _qwen3_config(src) -> dict:
    return dict(_llama_config(src), qk_norm=True)


def _gpt2_config(src) -> dict:
    # FWP softmax layers scale scores by head_dim ** -0.5, as GPT-2's default; its other scalings have no field here.
    if not getattr(src, "scale_attn_weights", True) or getattr(src, "scale_attn_by_inverse_layer_idx", False):
        flags = {k: getattr(src, k, None) for k in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx")}
        raise ValueError("hf_fwp.convert supports GPT-2 attention scaled by head_dim ** -0.5 only; this teacher has "
                         f"{', '.join(f'{k}={v}' for k, v in flags.items())}, which the student could not reproduce.")
    return dict(
        vocab_size=src.vocab_size, hidden_size=src.n_embd, intermediate_size=src.n_inner or 4 * src.n_embd,
        num_hidden_layers=src.n_layer, num_attention_heads=src.n_head, num_key_value_heads=src.n_head,
        head_dim=src.n_embd // src.n_head, hidden_act=src.activation_function,
        max_position_embeddings=src.n_positions, rms_norm_eps=src.layer_norm_epsilon,
        tie_word_embeddings=src.tie_word_embeddings, bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id,
        pad_token_id=getattr(src, "pad_token_id", None), initializer_range=src.initializer_range,
        norm_type="layer", mlp_type="plain", position_embedding_type="learned", attention_bias=True,
        attention_output_bias=True, mlp_bias=True,
    )


_GPT2_LAYER = {
    "self_attn.q_proj.weight": ("attn.c_attn.weight", ("split", 0, 3)),
    "self_attn.k_proj.weight": ("attn.c_attn.weight", ("split", 1, 3)),
    "self_attn.v_proj.weight": ("attn.c_attn.weight", ("split", 2, 3)),
    "self_attn.q_proj.bias": ("attn.c_attn.bias", ("split", 0, 3)),
    "self_attn.k_proj.bias": ("attn.c_attn.bias", ("split", 1, 3)),
    "self_attn.v_proj.bias": ("attn.c_attn.bias", ("split", 2, 3)),
    "self_attn.o_proj.weight": ("attn.c_proj.weight", "t"),
    "self_attn.o_proj.bias": ("attn.c_proj.bias", None),
    "mlp.up_proj.weight": ("mlp.c_fc.weight", "t"),
    "mlp.up_proj.bias": ("mlp.c_fc.bias", None),
    "mlp.down_proj.weight": ("mlp.c_proj.weight", "t"),
    "mlp.down_proj.bias": ("mlp.c_proj.bias", None),
    "input_layernorm.weight": ("ln_1.weight", None),
    "input_layernorm.bias": ("ln_1.bias", None),
    "post_attention_layernorm.weight": ("ln_2.weight", None),
    "post_attention_layernorm.bias": ("ln_2.bias", None),
}

ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("model.embed_tokens", "model.layers", "model.norm", {}, config_map=_llama_config),
    "MistralForCausalLM": Architecture("model.embed_tokens", "model.layers", "model.norm", {},
                                       config_map=_llama_config),
    "Qwen2ForCausalLM": Architecture("model.embed_tokens", "model.layers", "model.norm", {}, config_map=_qwen2_config),
    "Qwen3ForCausalLM": Architecture("model.embed_tokens", "model.layers", "model.norm", {}, config_map=_qwen3_config),
    "GPT2LMHeadModel": Architecture("transformer.wte", "transformer.h", "transformer.ln_f", _GPT2_LAYER,
                                    positions="transformer.wpe", config_map=_gpt2_config, attention="attn"),
}


def layer_map(arch_name: str, src_config) -> dict[str, tuple[str, Transform]]:
    """The per-layer weight map of ``arch_name`` for this source config (Llama-like maps depend on bias flags)."""
    arch = ARCHITECTURES[arch_name]
    if arch.layer_map:
        return arch.layer_map
    cfg = arch.config_map(src_config)
    return _llama_like_layer(q_norm=cfg.get("qk_norm", False), attn_bias=cfg["attention_bias"],
                             o_bias=cfg["attention_output_bias"], mlp_bias=cfg.get("mlp_bias", False))


def source_layer_types(arch_name: str, src_config) -> list[str]:
    """Softmax layer kinds of the source (``full_attention`` / ``sliding_attention``), one per layer."""
    if arch_name == "GPT2LMHeadModel":
        return ["full_attention"] * src_config.n_layer
    return _source_layer_types(src_config)
