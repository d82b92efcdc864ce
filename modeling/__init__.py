"""Model classes, installed as ``hf_fwp.modeling`` (FWPConfig, FWPModel, FWPForCausalLM)."""
