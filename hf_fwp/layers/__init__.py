"""FWP layers (attention blocks, feature maps, norms, short convolutions).

The implementations live as flat modules ``hf_fwp.modeling.layers_*`` (so that a saved model folder carries them
as remote code, see ``hf_fwp.modeling``); this namespace is the public entry point.
"""

from hf_fwp.modeling.layers_conv import ShortConvolution
from hf_fwp.modeling.layers_feature_maps import FEATURE_MAPS, FeatureMap, feature_dim
from hf_fwp.modeling.layers_fwp_attention import FWPAttention
from hf_fwp.modeling.layers_linear import Linear
from hf_fwp.modeling.layers_norms import GatedRMSNorm, RMSNorm, build_norm
from hf_fwp.modeling.layers_rotary import RotaryEmbedding, apply_rotary
from hf_fwp.modeling.layers_softmax_attention import SoftmaxAttention, attention_allowed, softmax_attention

__all__ = [
    "FWPAttention", "SoftmaxAttention", "ShortConvolution", "FeatureMap", "FEATURE_MAPS", "feature_dim", "RMSNorm",
    "GatedRMSNorm", "build_norm", "RotaryEmbedding", "apply_rotary", "attention_allowed", "softmax_attention",
    "Linear",
]
