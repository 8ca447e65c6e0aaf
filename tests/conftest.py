"""Test-session set-up shared by every test module.

Without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET=1 must be set before triton
is first imported, so it is set here, before any test module is collected. With CUDA the kernels run
compiled and the `gpu`-marked tests run too.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
