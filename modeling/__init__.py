"""Model classes, installed as ``hf_fwp.modeling``: FWPConfig, FWPModel, FWPForCausalLM and FWPCache."""

from .configuration_fwp import FWPConfig
from .modeling_fwp import FWPCache, FWPForCausalLM, FWPModel, FWPPreTrainedModel

__all__ = ["FWPConfig", "FWPCache", "FWPModel", "FWPForCausalLM", "FWPPreTrainedModel"]
