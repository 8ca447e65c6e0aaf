"""Where the kernel tests run: compiled on a GPU, or in Triton's interpreter on CPU (tests/conftest.py)."""
import pytest
import torch

import kernels._utils as kutils

INTERPRET = kutils.interpreting()
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA (compiled Triton)")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN (integer minimum), so an unwritten element cannot pass."""
    monkeypatch.setattr(kutils, "POISON_OUTPUTS", True)


def assert_close_finite(got, want, tol: tuple[float, float], what: str) -> None:
    """``got`` is finite (every output element was written) and within ``tol = (atol, rtol)`` of ``want``."""
    atol, rtol = tol
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten output?)"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
