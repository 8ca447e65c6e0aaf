"""Where the kernel tests run: compiled on a GPU, or in Triton's interpreter on CPU (tests/conftest.py)."""
import pytest
import torch

import kernels._utils as kutils

INTERPRET = kutils.interpreting()
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA (compiled Triton)")
