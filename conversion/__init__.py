"""Conversion of pretrained softmax transformers into FWPs, installed as ``hf_fwp.conversion``."""
