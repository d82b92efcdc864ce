"""FWPConfig: one config for every FWP rule, layer layout and backbone (the single source of truth).

The FWP layer fields pick the rule and its parts; ``layer_types`` picks, per layer, an FWP layer
(``"linear_attention"``), full softmax attention (``"full_attention"``), sliding-window softmax attention
(``"sliding_attention"``) or a LoLCATs-style hybrid of sliding-window softmax and the FWP in one layer
(``"hybrid_sliding"``). These are transformers' own layer-type names, so ``DynamicCache(config=...)`` builds the
right cache layer for each. The backbone fields cover what converted models need (Llama, Mistral, Qwen2/3, GPT-2).
"""

from __future__ import annotations

import difflib
import math
import warnings

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .layers_feature_maps import FEATURE_MAPS, LEARNED_FEATURE_MAPS

# The package version, here so that a saved model folder (which carries this file) knows it without hf-fwp installed.
HF_FWP_VERSION = "0.1.0"
FWP_RULES = ("linear", "gated_linear", "delta", "gated_delta")
LAYER_TYPES = ("linear_attention", "full_attention", "sliding_attention", "hybrid_sliding")


@strict
class FWPConfig(PreTrainedConfig):
    r"""Configuration of an FWP causal LM (``model_type = "fwp"``).

    Standard fields follow Llama's names and meaning. FWP fields:

    fwp_rule: ``"linear"``, ``"gated_linear"``, ``"delta"`` or ``"gated_delta"`` (see DESIGN.md's table).
    fwp_state_heads: ``"query"``: one fast-weight state per query head; ``"kv"``: one per key/value head, shared by
        the ``num_attention_heads // num_key_value_heads`` query heads of its group (as grouped-query attention
        shares keys and values): the key feature map, beta and the decay gate then exist per key/value head, and
        the decoding cache shrinks by the group size.
    feature_map: q/k feature map phi (``hf_fwp.modeling.layers_feature_maps``); ``share_feature_map`` uses one for both.
    feature_map_dim: projection width of a learned feature map (``hedgehog``: ``2 * feature_map_dim`` features,
        ``t2r``: ``feature_map_dim``); None: the head dim. Wider maps approximate softmax more closely for a larger
        state (``[feature_dim, head_dim]`` per state head) and slower steps; the Triton kernels' shared-memory fit
        is checked for feature dims up to 256. On a converted SmolLM2 (pure FWP, bf16, the CPU demo's time) twice
        the head dim matched the default at equal minutes (benchmarks/results/recipe_experiments.md).
    qk_l2norm: L2-normalise q and k after phi (required by the delta rules unless ``allow_unnormalized_delta``).
    allow_neg_eigval: beta in (0, 2) instead of (0, 1) (delta rules).
    Decay gate (gated rules, Mamba2 parameterisation): ``g = -exp(A_log) * softplus(a_proj(x) + dt_bias)``, per head.
    decay_init: how the decay gate starts (``a_proj`` at 0 either way). ``"mamba2"``: ``A ~ U(1, 16)``, ``dt ~
        logU(1e-3, 1e-1)``, per-token decays between about exp(-1.6) and exp(-1e-3) (for training from scratch);
        ``"slow"``: ``A = 1``, ``dt ~ logU(1e-4, 1e-2)``, decays between exp(-1e-2) and exp(-1e-4), i.e. memories of
        about 100 to 10,000 tokens (a student then starts close to undecayed attention; for a converted SmolLM2
        it measured worse than Mamba2's: benchmarks/results/recipe_experiments.md).
    use_short_conv / conv_size / conv_activation: causal depthwise conv on q, k, v before phi.
    fwp_rotary: rotate the FWP's q and k by the model's RoPE (after the conv, before phi), as softmax layers rotate
        theirs. Without it (or a conv, or decay) an FWP layer knows the order of its context only through
        causality; converted students then keep the teacher's positional signal in q.k (``position_embedding_type``
        must be ``"rope"``). Learned feature maps see only the rotations of the positions they were trained on:
        for a converted SmolLM2 it helped at the trained length and hurt beyond it (recipe_experiments.md).
    use_output_norm / use_output_gate: per-head RMSNorm of the FWP output, optionally times ``silu(g_proj(x))``.
    normalize_attention: classic linear attention with the denominator ``phi(q)^T sum phi(k)`` (linear rules only).
    fwp_scale: query scale of the FWP read-out (default ``feature_dim ** -0.5``).
    hybrid_window: window of ``hybrid_sliding`` layers when it differs from ``sliding_window`` (the window of
        ``sliding_attention`` layers, e.g. the kept layers of a converted Mistral); None: ``sliding_window``.
        Caches learn it through transformers' ``per_layer_config``, which this config fills in.
    hybrid_mix_init: initial per-head weight lambda of the FWP branch in hybrid layers,
        ``o = (1 - lambda) * softmax_window + lambda * fwp`` (lambda = sigmoid of a learned logit).
    hybrid_combine: how hybrid layers join their branches. ``"lerp"``: the mix above, the FWP branch reading every
        token. ``"shared_normalizer"`` (LoLCATs): the FWP state holds only the tokens that have left the softmax
        window, and one normaliser weighs both, ``o = ((1 - lambda) * sum_window e^(s - m) v + lambda * sum_older
        phi(q) phi(k) v) / ((1 - lambda) * sum_window e^(s - m) + lambda * sum_older phi(q) phi(k))`` (m: the
        query's largest window score), so tokens inside the window are read exactly once, by softmax. Needs
        ``normalize_attention`` (non-negative features, linear rules) and no output norm; decoding keeps the last
        window's FWP writes in a second cache state until they leave the window.
    fwp_backend / chunk_size: op backend (``"auto"``: Triton on CUDA, chunked torch elsewhere) and chunk length.

    Backbone: ``norm_type`` (``"rms"``/``"layer"``), ``mlp_type`` (``"gated"`` SwiGLU-style / ``"plain"``),
    ``position_embedding_type`` (``"rope"``, ``"learned"`` absolute like GPT-2, or ``"none"``), ``qk_norm``
    (RMSNorm on q/k heads in softmax layers, Qwen3), ``attention_bias`` (q/k/v), ``attention_output_bias``,
    ``mlp_bias``, ``rope_parameters`` (theta and scaling, transformers' format).
    """

    model_type = "fwp"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_output_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    norm_type: str = "rms"
    mlp_type: str = "gated"
    position_embedding_type: str = "rope"
    qk_norm: bool = False
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    hybrid_window: int | None = None
    fwp_rule: str = "gated_delta"
    fwp_state_heads: str = "query"
    feature_map: str = "identity"
    share_feature_map: bool = False
    feature_map_dim: int | None = None
    qk_l2norm: bool = True
    allow_unnormalized_delta: bool = False
    allow_neg_eigval: bool = False
    decay_init: str = "mamba2"
    use_short_conv: bool = True
    fwp_rotary: bool = False
    conv_size: int = 4
    conv_activation: str | None = "silu"
    use_output_norm: bool = True
    use_output_gate: bool = True
    normalize_attention: bool = False
    fwp_scale: float | None = None
    hybrid_mix_init: float = 0.1
    hybrid_combine: str = "lerp"
    fwp_backend: str = "auto"
    chunk_size: int = 64

    def __post_init__(self, **kwargs):
        kwargs.pop("_head_dim_given", None)  # written by earlier versions into config.json
        _check_unknown(kwargs)
        _check_writer_version(kwargs.pop("hf_fwp_version", None))
        for name in ("hidden_size", "num_attention_heads"):
            _positive_int(name, getattr(self, name))  # before they are divided below
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"FWPConfig: hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); change one of them or set `head_dim` explicitly."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = ["linear_attention"] * self.num_hidden_layers
        else:
            self.layer_types = list(self.layer_types)
        # Our checks run here (not as a strict `validate_*` hook) so that users get a plain ValueError.
        self.check_fwp_fields()
        hybrids = [i for i, t in enumerate(self.layer_types) if t == "hybrid_sliding"]
        if hybrids and self.hybrid_window is not None and self.hybrid_window != self.sliding_window:
            # transformers' caches size each window layer from its per-layer config: give hybrid layers theirs.
            per_layer = {int(k): dict(v) for k, v in (kwargs.pop("per_layer_config", None) or {}).items()}
            for i in hybrids:
                per_layer.setdefault(i, {})["sliding_window"] = self.hybrid_window
            kwargs["per_layer_config"] = per_layer
            # `config.sliding_window` stays readable: it is the window of sliding_attention layers.
            self.allow_global_per_layer_attribute_access = True
        super().__post_init__(**kwargs)
        if self.position_embedding_type == "rope":
            self._check_rope()

    # Validation -------------------------------------------------------------------------------------------------
    def check_fwp_fields(self):
        """Raise ``ValueError`` for impossible combinations (run at construction; call again after editing)."""
        _choice("fwp_rule", self.fwp_rule, FWP_RULES)
        _choice("feature_map", self.feature_map, FEATURE_MAPS)
        _choice("norm_type", self.norm_type, ("rms", "layer"))
        _choice("mlp_type", self.mlp_type, ("gated", "plain"))
        _choice("position_embedding_type", self.position_embedding_type, ("rope", "learned", "none"))
        _choice("fwp_backend", self.fwp_backend, ("auto", "naive", "chunk", "triton"))
        _choice("fwp_state_heads", self.fwp_state_heads, ("query", "kv"))
        _choice("conv_activation", self.conv_activation, (None, "silu"))
        _choice("decay_init", self.decay_init, ("mamba2", "slow"))
        _choice("hybrid_combine", self.hybrid_combine, ("lerp", "shared_normalizer"))
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "vocab_size", "intermediate_size", "chunk_size", "max_position_embeddings"):
            _positive_int(name, getattr(self, name))
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FWPConfig: `{name}` must be True or False, got {getattr(self, name)!r}.")
        if not _is_number(self.rms_norm_eps) or self.rms_norm_eps <= 0:
            raise ValueError(f"FWPConfig: `rms_norm_eps` must be a positive number, got {self.rms_norm_eps!r}.")
        if not _is_number(self.initializer_range) or self.initializer_range < 0:
            raise ValueError(f"FWPConfig: `initializer_range` must be a number >= 0, got {self.initializer_range!r}.")
        if not _is_number(self.attention_dropout) or not 0 <= self.attention_dropout < 1:
            raise ValueError(f"FWPConfig: `attention_dropout` must be in [0, 1), got {self.attention_dropout!r}.")
        if self.feature_map_dim is not None and (
                not isinstance(self.feature_map_dim, int) or isinstance(self.feature_map_dim, bool)
                or self.feature_map_dim < 1 or self.feature_map not in LEARNED_FEATURE_MAPS):
            raise ValueError(f"FWPConfig: `feature_map_dim` must be None or an integer >= 1 for a learned feature map "
                             f"{LEARNED_FEATURE_MAPS}; got {self.feature_map_dim!r} with feature_map="
                             f"{self.feature_map!r} (fixed maps have no width to set: leave it None).")
        if self.fwp_scale is not None and (not _is_number(self.fwp_scale) or self.fwp_scale <= 0):
            raise ValueError(f"FWPConfig: `fwp_scale` must be None or a positive number, got {self.fwp_scale!r}.")
        if not _is_number(self.hybrid_mix_init):
            raise ValueError(f"FWPConfig: `hybrid_mix_init` must be a number in (0, 1), got {self.hybrid_mix_init!r}.")
        from transformers.activations import ACT2FN

        if self.hidden_act not in ACT2FN:
            near = difflib.get_close_matches(str(self.hidden_act), list(ACT2FN), n=3)
            raise ValueError(f"FWPConfig: unknown hidden_act {self.hidden_act!r}"
                             f"{'; did you mean ' + ' or '.join(map(repr, near)) if near else ''}? See "
                             "transformers.activations.ACT2FN for the names.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"FWPConfig: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.fwp_state_heads == "kv" and self.share_feature_map and self.num_key_value_heads != self.num_attention_heads:
            raise ValueError("FWPConfig: share_feature_map=True needs as many key as query feature-map heads, but "
                             "fwp_state_heads='kv' maps keys per key/value head; set share_feature_map=False or "
                             "fwp_state_heads='query'.")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"FWPConfig: `layer_types` has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}; give one entry per layer."
            )
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if bad:
            raise ValueError(f"FWPConfig: unknown layer_types {bad}; each entry must be one of {LAYER_TYPES}.")
        for kind in ("sliding_attention", "hybrid_sliding"):
            windowed = [i for i, t in enumerate(self.layer_types) if t == kind]
            window = self.layer_window(kind)
            if windowed and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
                name = "`hybrid_window` (or `sliding_window`)" if kind == "hybrid_sliding" else "`sliding_window`"
                raise ValueError(f"FWPConfig: layers {windowed} use a sliding window, so {name} must be a positive "
                                 f"int (got {window!r}).")
        if self.hybrid_window is not None and "hybrid_sliding" not in self.layer_types:
            raise ValueError(f"FWPConfig: hybrid_window={self.hybrid_window!r} sets the window of hybrid_sliding "
                             "layers and there are none; leave it out (sliding_attention layers use sliding_window).")
        if self.hybrid_window is not None and (not isinstance(self.hybrid_window, int) or self.hybrid_window < 1):
            raise ValueError(f"FWPConfig: `hybrid_window` must be None or a positive int, got {self.hybrid_window!r}.")
        if self.fwp_rule in ("delta", "gated_delta") and not self.qk_l2norm and not self.allow_unnormalized_delta:
            raise ValueError(
                f"FWPConfig: the {self.fwp_rule!r} rule needs unit-norm keys to stay stable; set qk_l2norm=True, or "
                "allow_unnormalized_delta=True if your feature map keeps ||k|| <= 1 by construction."
            )
        if self.allow_neg_eigval and not self.fwp_delta:
            raise ValueError(f"FWPConfig: allow_neg_eigval widens the delta rules' beta to (0, 2); the "
                             f"{self.fwp_rule!r} rule has no beta. Set allow_neg_eigval=False or use a delta rule.")
        if self.normalize_attention and self.fwp_rule not in ("linear", "gated_linear"):
            raise ValueError(
                f"FWPConfig: normalize_attention (the linear-attention denominator) only applies to the 'linear' and "
                f"'gated_linear' rules, not {self.fwp_rule!r}."
            )
        if self.normalize_attention and self.feature_map in ("identity", "silu") and not self.qk_l2norm:
            raise ValueError(
                f"FWPConfig: normalize_attention needs non-negative features; feature_map={self.feature_map!r} can "
                "be negative. Use elu_plus_one, relu, dpfp, hedgehog or t2r."
            )
        if self.use_short_conv and (not isinstance(self.conv_size, int) or self.conv_size < 2):
            raise ValueError(f"FWPConfig: conv_size must be an int >= 2 with use_short_conv, got {self.conv_size!r}.")
        if not 0.0 < self.hybrid_mix_init < 1.0:
            raise ValueError(f"FWPConfig: hybrid_mix_init must be in (0, 1), got {self.hybrid_mix_init}.")
        if self.hybrid_combine == "shared_normalizer":
            if "hybrid_sliding" not in self.layer_types:
                raise ValueError("FWPConfig: hybrid_combine='shared_normalizer' joins the branches of hybrid_sliding "
                                 "layers, but layer_types has none; use 'lerp' (the default) or add hybrid layers.")
            if not self.normalize_attention or self.use_output_norm:
                raise ValueError("FWPConfig: hybrid_combine='shared_normalizer' shares the softmax normaliser with "
                                 "the FWP's own denominator: set normalize_attention=True (a linear rule with "
                                 "non-negative features) and use_output_norm=False.")
        if self.fwp_rotary and self.position_embedding_type != "rope":
            raise ValueError(f"FWPConfig: fwp_rotary=True rotates the FWP's q/k by RoPE, but position_embedding_type "
                             f"is {self.position_embedding_type!r}; set fwp_rotary=False or use 'rope'.")
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise ValueError(f"FWPConfig: RoPE needs an even head_dim, got {self.head_dim}.")

    def _check_rope(self) -> None:
        """transformers only logs an unknown ``rope_type`` and fails later with a KeyError: refuse it here, with a
        ``rope_theta`` that is not a positive number and missing keys of the type (e.g. ``factor``)."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = self.rope_parameters or {}
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default" and kind not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"FWPConfig: unknown rope_parameters rope_type {kind!r}; choose 'default' or one of "
                             f"{sorted(ROPE_INIT_FUNCTIONS)}.")
        theta = params.get("rope_theta")
        if not _is_number(theta) or theta <= 0:
            raise ValueError(f"FWPConfig: rope_parameters rope_theta must be a positive number, got {theta!r}.")
        try:
            self.validate_rope()
        except (KeyError, TypeError) as e:
            problem = str(e).strip('"')
            raise ValueError(f"FWPConfig: rope_parameters {params!r} are incomplete: {problem}.") from None

    def layer_window(self, layer_type: str) -> int | None:
        """The attention window of a layer kind: ``hybrid_window`` (else ``sliding_window``) for hybrid layers,
        ``sliding_window`` for sliding ones, None otherwise."""
        if layer_type == "hybrid_sliding":
            return self.hybrid_window if self.hybrid_window is not None else self.__dict__.get("sliding_window")
        return self.__dict__.get("sliding_window") if layer_type == "sliding_attention" else None

    # Properties and constructors ----------------------------------------------------------------------------------
    @property
    def fwp_gated(self) -> bool:
        return self.fwp_rule in ("gated_linear", "gated_delta")

    @property
    def number_of_conv_states(self) -> int:
        """States per cache layer (transformers reads this name): shared-normaliser hybrids keep the FWP writes of
        the last window (state 1) beside the fast weights (state 0)."""
        return 2 if self.hybrid_combine == "shared_normalizer" else 1

    @property
    def fwp_delta(self) -> bool:
        return self.fwp_rule in ("delta", "gated_delta")

    @classmethod
    def gated_deltanet(cls, **kwargs) -> "FWPConfig":
        """Gated DeltaNet (Yang et al. 2024): gated delta rule, short conv, L2-normalised q/k, gated RMSNorm out."""
        return cls(**{**dict(fwp_rule="gated_delta", feature_map="identity", qk_l2norm=True, use_short_conv=True,
                             use_output_norm=True, use_output_gate=True), **kwargs})

    @classmethod
    def deltanet(cls, **kwargs) -> "FWPConfig":
        """DeltaNet (Schlag et al. 2021; Yang et al. 2024): delta rule with SiLU features, L2 norm, short conv."""
        return cls(**{**dict(fwp_rule="delta", feature_map="silu", qk_l2norm=True, use_short_conv=True,
                             use_output_norm=True, use_output_gate=False), **kwargs})

    def to_dict(self) -> dict:
        """transformers' dict plus ``hf_fwp_version``: the version of the code that writes it (as transformers
        records ``transformers_version``)."""
        output = super().to_dict()
        output["hf_fwp_version"] = HF_FWP_VERSION
        return output

    @classmethod
    def linear_transformer(cls, **kwargs) -> "FWPConfig":
        """The linear transformer (Katharopoulos et al. 2020): elu+1 features with the normalising denominator."""
        return cls(**{**dict(fwp_rule="linear", feature_map="elu_plus_one", qk_l2norm=False, use_short_conv=False,
                             normalize_attention=True, use_output_norm=False, use_output_gate=False), **kwargs})


_BOOL_FIELDS = ("use_cache", "tie_word_embeddings", "attention_bias", "attention_output_bias", "mlp_bias", "qk_norm",
                "share_feature_map", "qk_l2norm", "allow_unnormalized_delta", "allow_neg_eigval", "use_short_conv",
                "fwp_rotary", "use_output_norm", "use_output_gate", "normalize_attention")
# Keys a saved config.json may carry beside the fields (transformers' own bookkeeping).
_METADATA_KEYS = {"auto_map", "model_type", "architectures", "transformers_version", "dtype", "torch_dtype",
                  "_name_or_path", "name_or_path", "hf_fwp_version"}


def _is_number(x) -> bool:
    """A finite int or float (not a bool, NaN or inf)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"FWPConfig: `{name}` must be a positive integer, got {value!r}.")


def _check_unknown(kwargs: dict) -> None:
    """A misspelt field is an error (it would silently keep its default); other unknown keys get a warning."""
    fields = [f for f in FWPConfig.__dataclass_fields__ if not f.startswith("_")]
    known = _METADATA_KEYS | set(getattr(PreTrainedConfig, "__dataclass_fields__", {}))
    for key in sorted(k for k in kwargs if k not in known and not hasattr(PreTrainedConfig, k)):
        near = difflib.get_close_matches(key, fields, n=1, cutoff=0.8)
        if near:
            raise ValueError(f"FWPConfig: unknown field {key!r}; did you mean {near[0]!r}?")
        if not key.startswith("_"):
            warnings.warn(f"FWPConfig: {key!r} is not an FWPConfig field; it is stored but nothing reads it.",
                          stacklevel=3)


def _check_writer_version(written_by) -> None:
    """Warn when a config.json written by another hf-fwp version is read by this code: the folder carries the code
    that wrote it, which ``trust_remote_code=True`` runs instead of the installed package."""
    if written_by is not None and written_by != HF_FWP_VERSION:
        warnings.warn(f"FWPConfig: this config was written by hf-fwp {written_by} and is read by the code of hf-fwp "
                      f"{HF_FWP_VERSION}; to run the model with the code it was saved with, load the folder with "
                      "trust_remote_code=True.", stacklevel=3)


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"FWPConfig: unknown {name} {value!r}; choose one of {allowed}.")


__all__ = ["FWPConfig", "FWP_RULES", "FEATURE_MAPS", "LAYER_TYPES", "HF_FWP_VERSION"]
