"""Conversion of pretrained softmax transformers into FWPs, installed as ``hf_fwp.conversion``."""

from hf_fwp.conversion.architectures import ARCHITECTURES
from hf_fwp.conversion.convert import CONVERSION_DEFAULTS, convert, plan_layer_types, supported_architectures

__all__ = ["ARCHITECTURES", "CONVERSION_DEFAULTS", "convert", "plan_layer_types", "supported_architectures"]
