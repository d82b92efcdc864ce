"""hf-fwp: Fast Weight Programmers for Hugging Face Transformers.

The public API is small: the ops (:func:`linear_attention`, :func:`delta_rule`) and, with later modules, the
model classes and conversion entry points.
"""

__version__ = "0.1.0"

from hf_fwp.ops import delta_rule, linear_attention  # noqa: E402

__all__ = ["__version__", "linear_attention", "delta_rule"]
