"""FWP models for transformers: FWPModel and FWPForCausalLM, one class for every rule and layer layout.

Layers come from ``config.layer_types``: ``"linear_attention"`` (FWP), ``"full_attention"`` /
``"sliding_attention"`` (softmax) and ``"hybrid_sliding"`` (sliding softmax + FWP in one layer). The cache is
:class:`FWPCache`, a ``DynamicCache`` (so transformers builds a ``LinearAttentionLayer`` holding the fast-weight
state for FWP layers and KV layers for softmax ones) that also counts the tokens it has seen.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep

from .layers_conv import ShortConvolution
from .layers_feature_maps import FeatureMap
from .layers_fwp_attention import FWPAttention
from .layers_linear import Linear
from .layers_norms import build_norm
from .layers_rotary import RotaryEmbedding
from .layers_softmax_attention import SoftmaxAttention, attention_allowed
from .configuration_fwp import HF_FWP_VERSION, FWPConfig

_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "code_revision")


def temporary_folder_beside(target: Path) -> Path:
    """A new empty folder ``.<name>.tmp-*`` beside ``target`` (same file system, so it can be renamed into place),
    with the permissions any new folder gets (``mkdtemp`` makes it private, 0700)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def give_files_default_modes(folder: Path) -> None:
    """The files of ``folder`` get the permissions any new file gets (0644 under the usual umask): safetensors writes
    its files private (0600), so saved weights were the one file of a model folder that others could not read."""
    mode = 0o666 & ~_umask()
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(mode)


def _saved_code_differs(where: str, hub_kwargs: dict) -> bool:
    """Whether the model code saved at ``where`` (a folder or a Hub id) is not this code: for a folder, a saved
    ``*.py`` whose bytes differ from this module's siblings; for a Hub id, another recorded ``hf_fwp_version``."""
    here = Path(__file__).parent
    if os.path.isdir(where):
        if not (Path(where) / "modeling_fwp.py").is_file():
            return False  # no saved code to run
        ours = {f.name for f in here.glob("*.py")}
        # The model's modules (other .py files a user keeps in the folder are not model code).
        saved = [f for f in Path(where).glob("*.py") if f.name in ours or f.name.startswith(("ops_", "layers_"))]
        return any(not (here / f.name).is_file() or f.read_bytes() != (here / f.name).read_bytes() for f in saved)
    try:
        from transformers.utils import cached_file

        with open(cached_file(where, "config.json", **hub_kwargs)) as f:
            written_by = json.load(f).get("hf_fwp_version")
    except Exception:  # noqa: BLE001 - no config to compare against: nothing to defer to
        return False
    return written_by is not None and written_by != HF_FWP_VERSION


class FWPCache(DynamicCache):
    """``DynamicCache(config=...)`` plus a count of the tokens seen, which transformers' own cache cannot report
    for a model whose layers are all recurrent. FWP layers keep a fixed-size state (and softmax window layers a
    fixed-size window), so memory does not grow with generated tokens except in full-attention layers."""

    def __init__(self, config: FWPConfig, **kwargs):
        super().__init__(config=config, **kwargs)
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reset(self):
        super().reset()
        self.seen_tokens = 0

    def crop(self, max_length: int):
        raise ValueError("FWPCache holds recurrent states that cannot be cropped; recompute from the prompt instead.")

    @property
    def is_compileable(self) -> bool:
        # generate() compiles the decode step for any compileable cache on CUDA; like transformers' DynamicCache,
        # the default cache opts out: ask for it with cache_implementation="static".
        return False


def _past_length(cache) -> int:
    if cache is None:
        return 0
    if isinstance(cache, FWPCache):
        return cache.seen_tokens
    try:
        return int(cache.get_seq_length())  # static caches count in a tensor
    except ValueError:
        raise ValueError(
            "This cache cannot tell how many tokens it has seen (all layers are recurrent). Pass an "
            "hf_fwp.FWPCache(config) or let the model create its cache (use_cache=True)."
        ) from None


class FWPMLP(nn.Module):
    """``gated``: down(act(gate(x)) * up(x)) (Llama/Qwen); ``plain``: down(act(up(x))) (GPT-2)."""

    def __init__(self, config: FWPConfig):
        super().__init__()
        self.gated = config.mlp_type == "gated"
        if self.gated:
            self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act_fn(self.up_proj(x))
        return self.down_proj(h)


class FWPDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; the attention kind comes from layer_types."""

    def __init__(self, config: FWPConfig, layer_idx: int):
        super().__init__()
        kind = config.layer_types[layer_idx]
        self.layer_type = kind
        if kind == "linear_attention":
            self.self_attn = FWPAttention(config, layer_idx)
        elif kind == "hybrid_sliding":
            self.self_attn = FWPAttention(config, layer_idx, hybrid=True)
        else:
            window = config.layer_window(kind)
            self.self_attn = SoftmaxAttention(config, layer_idx, window)
        self.input_layernorm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        self.mlp = FWPMLP(config)

    def forward(self, hidden_states, position_embeddings=None, cache=None, past=0, attention_mask=None, mask=None):
        h = self.self_attn(self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
                           cache=cache, past=past, attention_mask=attention_mask, mask=mask)
        hidden_states = hidden_states + h
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class FWPPreTrainedModel(PreTrainedModel):
    config: FWPConfig
    config_class = FWPConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FWPDecoderLayer"]
    _supports_sdpa = True
    # Recurrent states cannot be cropped or rolled back (assisted decoding, cache cropping).
    _is_stateful = True
    # The decode step has no graph break and no host sync (tests compile it with fullgraph=True).
    _can_compile_fullgraph = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``, with two guards.

        * A folder whose saved code is not this code runs its own code when ``trust_remote_code=True``
          (transformers would otherwise pick the installed hf-fwp, registered with the Auto classes, and mix a
          model saved by one version with the code of another); without it, a warning says so.
        * A checkpoint that lacks weights of the model, or holds tensors of another shape, is an error naming them
          (transformers would initialise them randomly with a warning: a model that quietly computes something else).
        """
        where = str(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
        if _saved_code_differs(where, {k: v for k, v in hub_kwargs.items() if k != "code_revision"}):
            if kwargs.get("trust_remote_code"):
                saved_cls = get_class_from_dynamic_module(f"modeling_fwp.{cls.__name__}", where, **hub_kwargs)
                if isinstance(kwargs.get("config"), FWPConfig):
                    kwargs.pop("config")  # this code's config class; the saved class reads its own
                return saved_cls.from_pretrained(*args, **kwargs)
            warnings.warn(f"{where} was saved with other hf-fwp model code than the installed hf-fwp "
                          f"{HF_FWP_VERSION}, which runs it now; pass trust_remote_code=True to run the code saved "
                          "with it.", stacklevel=2)
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing, mismatched = sorted(info["missing_keys"]), sorted(info.get("mismatched_keys") or [])
        if missing or mismatched:
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing ({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''})")
            if mismatched:
                names = [m[0] if isinstance(m, tuple) else m for m in mismatched]
                parts.append(f"{len(names)} of another shape ({', '.join(map(str, names[:6]))})")
            hint = "It is incomplete or was saved from another layout; save it again from the trained model."
            if any(".feature_map_" in k and ".layers." in k for k in info.get("unexpected_keys") or ()):
                hint = ("Its feature maps hold one Linear per head (the layout of earlier hf-fwp code): load it with "
                        "trust_remote_code=True to run the code it was saved with, or load its state dict into this "
                        "model with load_state_dict, which stacks the heads.")
            raise ValueError(f"{where}: the checkpoint does not fit this {cls.__name__}: {'; '.join(parts)}. {hint}")
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' ``save_pretrained``, never half-written: everything is written to a temporary folder beside
        ``save_directory`` and then moved in, with the old ``config.json`` removed first and the new one moved last.
        An interrupted save leaves the old model, a folder without ``config.json`` (which does not load), or the new
        model; never a folder that loads as a mix. Pushing (``push_to_hub``) and non-main processes save as usual."""
        target = Path(save_directory)
        if kwargs.get("push_to_hub") or not kwargs.get("is_main_process", True) or target.is_file():
            return super().save_pretrained(save_directory, *args, **kwargs)
        tmp = temporary_folder_beside(target)
        try:
            super().save_pretrained(tmp, *args, **kwargs)
            give_files_default_modes(tmp)
            if not target.exists():
                tmp.rename(target)
                return
            (target / "config.json").unlink(missing_ok=True)
            new = {f.name for f in tmp.iterdir()}
            for stale in (*target.glob("model*.safetensors*"), *target.glob("pytorch_model*.bin*")):
                if stale.name not in new:  # weights of an earlier save in another sharding
                    stale.unlink()
            for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
                os.replace(f, target / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, FWPAttention):
            for p in module.parameters(recurse=False):
                init.zeros_(p)
            with torch.no_grad():
                module.reset_fwp_parameters()
        elif isinstance(module, FeatureMap):
            module.reset_parameters()
        elif isinstance(module, ShortConvolution):
            # PyTorch's own conv init: the generic normal(0.02) would all but silence a depthwise conv.
            nn.Conv1d.reset_parameters(module)


class FWPModel(FWPPreTrainedModel):
    """The decoder stack: embeddings (+ learned positions), layers, final norm."""

    def __init__(self, config: FWPConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        if config.position_embedding_type == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(FWPDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        needs_rope = config.position_embedding_type == "rope" and (
            config.fwp_rotary or any(t != "linear_attention" for t in config.layer_types))
        self.rotary_emb = RotaryEmbedding(config) if needs_rope else None
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``attention_mask`` is 2-D, 1 for tokens and 0 for padding, covering either the new tokens ``[B, T]`` or
        the cached ones too ``[B, past + T]`` (what ``generate`` passes), or the dict of per-layer-kind masks that
        :meth:`FWPForCausalLM.create_masks_for_generate` builds for compiled decoding."""
        if "past_key_values" in kwargs and cache is None:
            cache = kwargs.pop("past_key_values")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("FWPModel: pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]
        if T == 0 or B == 0:
            raise ValueError(f"FWPModel: the input has no tokens (shape {tuple(inputs_embeds.shape[:2])}); pass at "
                             "least one token per row.")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and any(getattr(layer, "gradient_checkpointing", False) for layer in self.layers):
            use_cache = False  # recomputed layers would write their cache entries twice
        if use_cache and cache is None:
            cache = FWPCache(self.config)
        ready = {}
        if isinstance(attention_mask, dict):
            ready, attention_mask = attention_mask, attention_mask.get("linear_attention")
        softmax_layers = not ready and self.config.layer_types.count("linear_attention") < len(self.layers)
        needs_positions = self.rotary_emb is not None or hasattr(self, "embed_positions")
        # Only softmax layers and default positions need the cached length (an all-FWP cache may not know it).
        past = _past_length(cache) if softmax_layers or (position_ids is None and needs_positions) else None
        if attention_mask is not None:
            attention_mask = self._full_padding_mask(attention_mask, B, T, past, softmax_layers)
        if position_ids is None and needs_positions:
            if attention_mask is not None:
                # Left padding: positions count real tokens only, so a padded row matches the row alone.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None].expand(B, T)
        hidden_states = inputs_embeds
        if hasattr(self, "embed_positions"):
            if not torch.compiler.is_compiling() and int(position_ids.max()) >= self.config.max_position_embeddings:
                raise ValueError(
                    f"FWPModel: position {int(position_ids.max())} is beyond max_position_embeddings "
                    f"({self.config.max_position_embeddings}) of the learned position table."
                )
            hidden_states = hidden_states + self.embed_positions(position_ids)
        position_embeddings = self.rotary_emb(hidden_states, position_ids) if self.rotary_emb is not None else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings=position_embeddings, cache=cache, past=past,
                                  attention_mask=attention_mask, mask=ready.get(layer.layer_type))
        if isinstance(cache, FWPCache):
            cache.seen_tokens += T
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache if use_cache else None)

    @staticmethod
    def _full_padding_mask(mask: torch.Tensor, B: int, T: int, past: int | None, softmax_layers: bool):
        """Check a 2-D padding mask and return it as ``[B, past + T]`` (``[B, T]`` when only FWP layers read it),
        or None when it masks nothing."""
        if mask.dim() != 2:
            raise ValueError(f"FWPModel: attention_mask must be 2-D [batch, length]; got {tuple(mask.shape)}.")
        if past is None:
            if mask.shape[1] < T:
                raise ValueError(f"FWPModel: attention_mask has length {mask.shape[1]}, shorter than the {T} new tokens.")
            mask = mask[:, -T:]
        elif mask.shape[1] == T and past:
            mask = torch.cat([mask.new_ones(B, past), mask], dim=1)
        elif mask.shape[1] != past + T:
            raise ValueError(
                f"FWPModel: attention_mask has length {mask.shape[1]}, expected {T} (new tokens) or {past + T} "
                f"(cached + new tokens)."
            )
        if T == 1 and not softmax_layers:
            return None  # a single new token is never padding (as in transformers' recurrent masks)
        if not torch.compiler.is_compiling() and bool(mask.all()):
            return None  # no padding: take the fast unmasked paths
        return mask


class FWPForCausalLM(FWPPreTrainedModel, GenerationMixin):
    """FWP language model with a (optionally tied) LM head; ``labels`` give the shifted next-token loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FWPConfig):
        super().__init__(config)
        self.model = FWPModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             past_key_values=kwargs.pop("past_key_values", None))
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            if attention_mask is not None:
                # Padding positions carry no target, whatever the labels say there.
                labels = labels.masked_fill(attention_mask[:, -labels.shape[1]:] == 0, -100)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """The default (dynamic) cache of ``generate`` is an :class:`FWPCache`, which counts the tokens it has seen;
        ``cache_implementation="static"`` (and the rest) go to transformers, whose ``StaticCache`` maps every
        layer type of ours to a fixed-address layer."""
        if (model_kwargs.get("cache") is None and generation_config.use_cache is not False
                and generation_config.cache_implementation in (None, "dynamic")):
            model_kwargs["cache"] = FWPCache(self.config)
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        step = inputs.get("input_ids", inputs.get("inputs_embeds"))
        if step is not None and step.shape[1] == 1 and isinstance(inputs.get("attention_mask"), torch.Tensor):
            if all(t == "linear_attention" for t in self.config.layer_types):
                # FWP layers never read the mask of a single new token; a growing input would recompile the step.
                inputs.pop("attention_mask")
        return inputs

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, cache, position_ids=None, **kwargs):
        """Called by ``generate`` outside the compiled step, before every forward with a compileable (static) cache:
        for a single-token step, build each softmax layer kind's 4-D mask here, so that the compiled graph holds no
        mask logic and no host sync (the cached length is read here). Multi-token steps (prefill) run eagerly and
        keep the 2-D mask, which the model turns into blocked sliding-window attention.

        Returns ``{"linear_attention": None, "full_attention": [B, 1, 1, L], "sliding_attention": ...,
        "hybrid_sliding": ...}`` for the layer kinds the model has (each windowed kind has its own window)."""
        B, T = inputs_embeds.shape[:2]
        if T != 1 or cache is None or (attention_mask is not None and attention_mask.dim() != 2):
            return attention_mask  # prefill, or a mask the forward validates (and refuses if not 2-D) itself
        past = _past_length(cache)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: causality (and the window) only
        masks = {"linear_attention": None}
        for kind in ("full_attention", "sliding_attention", "hybrid_sliding"):
            idx = next((i for i, t in enumerate(config.layer_types) if t == kind), None)
            if idx is None:
                continue
            L, kv_offset = cache.get_mask_sizes(T, idx)
            allowed = attention_allowed(B, T, L, past=past, kv_offset=kv_offset, window=config.layer_window(kind),
                                        key_mask=attention_mask, device=inputs_embeds.device)
            masks[kind] = allowed.expand(B, 1, T, L).contiguous()
        return masks


__all__ = ["FWPCache", "FWPModel", "FWPForCausalLM", "FWPPreTrainedModel"]
