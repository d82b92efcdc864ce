"""Test-wide setup.

Without a GPU the Triton kernels run in Triton's CPU interpreter. TRITON_INTERPRET must be set before any
module defines a ``@triton.jit`` kernel, hence here, before the tests import anything.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
