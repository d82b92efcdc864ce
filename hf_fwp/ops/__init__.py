"""FWP ops: one call per rule family, every backend behind one signature (layout ``[B, T, H, D]``).

* :func:`linear_attention` -- the ``linear`` and (with ``g``) ``gated_linear`` rules;
* :func:`delta_rule` -- the ``delta`` and (with ``g``) ``gated_delta`` rules;
* :func:`fwp_step` -- one decoding step of any rule, the state updated in place.

The implementations live as flat modules ``hf_fwp.modeling.ops_*`` (so that a saved model folder carries them as
remote code, see ``hf_fwp.modeling``); this namespace is the public entry point.
"""

from hf_fwp.modeling.ops_delta_rule import chunk_delta_rule, delta_rule, naive_delta_rule
from hf_fwp.modeling.ops_linear_attn import chunk_linear_attention, linear_attention, naive_linear_attention
from hf_fwp.modeling.ops_step import fwp_step, torch_fwp_step

__all__ = [
    "linear_attention",
    "delta_rule",
    "fwp_step",
    "naive_linear_attention",
    "chunk_linear_attention",
    "naive_delta_rule",
    "chunk_delta_rule",
    "torch_fwp_step",
]
