"""FWP ops: one call per rule family, every backend behind one signature (layout ``[B, T, H, D]``).

* :func:`linear_attention` -- the ``linear`` and (with ``g``) ``gated_linear`` rules;
* :func:`delta_rule` -- the ``delta`` and (with ``g``) ``gated_delta`` rules.
"""

from hf_fwp.ops.delta_rule import chunk_delta_rule, delta_rule, naive_delta_rule
from hf_fwp.ops.linear_attn import chunk_linear_attention, linear_attention, naive_linear_attention

__all__ = [
    "linear_attention",
    "delta_rule",
    "naive_linear_attention",
    "chunk_linear_attention",
    "naive_delta_rule",
    "chunk_delta_rule",
]
