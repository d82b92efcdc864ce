"""The model and everything it runs, installed as ``hf_fwp.modeling``: FWPConfig, FWPModel, FWPForCausalLM, FWPCache.

Every module here is flat and imports its siblings with single-level relative imports, because that is what
transformers' remote-code loader copies: ``save_pretrained`` writes ``modeling_fwp.py``, ``configuration_fwp.py``
and every sibling they import into the model folder, and ``from_pretrained(folder, trust_remote_code=True)`` runs
them with only transformers and torch installed. The same files are the installed package's source (``hf_fwp.ops``
and ``hf_fwp.layers`` re-export them), so the shipped code cannot drift from the tested code. No module here
imports ``hf_fwp`` (it is absent on the loading side), and Triton is imported only inside try blocks (optional).

The file prefixes give the dependency order, ``ops_* <- layers_* <- configuration_fwp <- modeling_fwp``:

* ``ops_dispatch``, ``ops_utils``, ``ops_chunking``: backend choice, input checks, the chunk layout helpers;
* ``ops_linear_attn`` / ``ops_delta_rule`` (public op, dispatch), ``*_reference`` (pure torch: the token
  recurrence and the chunked path), ``*_triton`` (kernels); ``ops_triton_common`` (what both Triton families share);
* ``ops_step`` (one decoding step, state in place), ``ops_step_reference``, ``ops_step_triton``;
* ``layers_*``: FWP attention, softmax / sliding attention, feature maps, norms, short conv, rotary embeddings;
* ``configuration_fwp``, ``modeling_fwp``: the transformers classes and the cache.
"""

from .configuration_fwp import FWPConfig
from .modeling_fwp import FWPCache, FWPForCausalLM, FWPModel, FWPPreTrainedModel

__all__ = ["FWPConfig", "FWPCache", "FWPModel", "FWPForCausalLM", "FWPPreTrainedModel"]
