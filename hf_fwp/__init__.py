"""hf-fwp: Fast Weight Programmers for Hugging Face Transformers.

``import hf_fwp`` registers ``model_type = "fwp"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``, and exports the ops and the model classes.
"""

from hf_fwp.modeling.configuration_fwp import HF_FWP_VERSION as __version__  # noqa: E402  (one source of truth)
from hf_fwp.ops import delta_rule, fwp_step, linear_attention  # noqa: E402
from hf_fwp.modeling import FWPCache, FWPConfig, FWPForCausalLM, FWPModel  # noqa: E402
from hf_fwp.conversion import convert  # noqa: E402


def _register() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register("fwp", FWPConfig, exist_ok=True)
    AutoModel.register(FWPConfig, FWPModel, exist_ok=True)
    AutoModelForCausalLM.register(FWPConfig, FWPForCausalLM, exist_ok=True)
    # save_pretrained then writes `auto_map` and copies the modeling code, for trust_remote_code loading.
    FWPConfig.register_for_auto_class()
    FWPModel.register_for_auto_class("AutoModel")
    FWPForCausalLM.register_for_auto_class("AutoModelForCausalLM")


_register()

__all__ = ["__version__", "linear_attention", "delta_rule", "fwp_step", "FWPConfig", "FWPModel", "FWPForCausalLM", "FWPCache", "convert"]
