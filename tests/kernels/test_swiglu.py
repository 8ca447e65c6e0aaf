"""kernels/swiglu.py: silu(a) * b (split and packed forms) vs the reference, fwd + every grad.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before import); with
CUDA the same tests run compiled on the GPU. References run on fp32 copies of the inputs; the bf16
tolerance covers one bf16 ulp (the interpreter rounds fp32 -> bf16 toward zero).
"""


import pytest
import torch


from tests.kernels.common import DEVICE, assert_close_finite, gpu, poison_outputs  # noqa: E402,F401
from kernels.swiglu import swiglu, swiglu_packed, swiglu_packed_ref, swiglu_ref  # noqa: E402


# dtype -> (atol, rtol)
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1, 1), (7, 17), (3, 5, 67), (33, 64)]  # [..., F]


def _close(got, want, dtype, what):
    assert_close_finite(got, want, TOL[dtype], what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_forward_backward(shape, dtype):
    torch.manual_seed(0)
    a = (2 * torch.randn(shape, device=DEVICE)).to(dtype).requires_grad_(True)
    b = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_(True)
    y = swiglu(a, b)
    assert y.dtype == dtype and y.shape == a.shape
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    da, db = torch.autograd.grad(y, (a, b), dy)
    ar = a.detach().float().requires_grad_(True)
    br = b.detach().float().requires_grad_(True)
    yr = swiglu_ref(ar, br)
    dar, dbr = torch.autograd.grad(yr, (ar, br), dy.float())
    _close(y, yr, dtype, "y")
    assert da.dtype == db.dtype == dtype
    _close(da, dar, dtype, "da")
    _close(db, dbr, dtype, "db")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_packed_forward_backward(shape, dtype):
    torch.manual_seed(1)
    shape2 = (*shape[:-1], 2 * shape[-1])
    x = (2 * torch.randn(shape2, device=DEVICE)).to(dtype).requires_grad_(True)
    y = swiglu_packed(x)
    assert y.dtype == dtype and y.shape == shape
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    (dx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().float().requires_grad_(True)
    yr = swiglu_packed_ref(xr)
    (dxr,) = torch.autograd.grad(yr, xr, dy.float())
    _close(y, yr, dtype, "y")
    assert dx.dtype == dtype and dx.shape == shape2
    _close(dx, dxr, dtype, "dx")
    # packed == split on the halves
    a, b = x.detach().chunk(2, dim=-1)
    assert torch.equal(swiglu(a, b), y.detach())


def test_strided_halves():
    """a, b given as views of one [N, 2F] buffer (row stride 2F), as after a fused w1|w3 GEMM."""
    torch.manual_seed(2)
    x = torch.randn(6, 2 * 13, device=DEVICE, requires_grad=True)
    a, b = x[:, :13], x[:, 13:]
    y = swiglu(a, b)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().clone().requires_grad_(True)
    yr = swiglu_ref(xr[:, :13], xr[:, 13:])
    (dxr,) = torch.autograd.grad(yr, xr, dy)
    _close(y, yr, torch.float32, "y")
    _close(dx, dxr, torch.float32, "dx")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # interpreter's exp(100)
def test_large_magnitudes_finite():
    a = torch.tensor([[-100.0, -20.0, 0.0, 20.0, 100.0]], device=DEVICE, requires_grad=True)
    b = torch.ones_like(a, requires_grad=True)
    y = swiglu(a, b)
    da, db = torch.autograd.grad(y.sum(), (a, b))
    ar, br = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    yr = swiglu_ref(ar, br)
    dar, dbr = torch.autograd.grad(yr.sum(), (ar, br))
    _close(y, yr, torch.float32, "y")
    _close(da, dar, torch.float32, "da")
    _close(db, dbr, torch.float32, "db")


def test_errors():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(2, 3, device=DEVICE), torch.randn(2, 4, device=DEVICE))
    with pytest.raises(TypeError, match="same dtype"):
        swiglu(torch.randn(2, 3, device=DEVICE), torch.randn(2, 3, device=DEVICE).to(torch.bfloat16))
    with pytest.raises(ValueError, match="even"):
        swiglu_packed(torch.randn(2, 5, device=DEVICE))
    with pytest.raises(TypeError):
        swiglu_packed(torch.zeros(2, 4, dtype=torch.int32, device=DEVICE))


# ---------------------------------------------------------------------------- real sizes (GPU)
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_real_size(packed):
    torch.manual_seed(0)
    N, F, dtype = 16384, 2048, torch.bfloat16
    x = torch.randn(N, 2 * F, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(N, F, device="cuda", dtype=dtype)
    if packed:
        y = swiglu_packed(x)
    else:
        a, b = x.detach()[:, :F].contiguous(), x.detach()[:, F:].contiguous()
        a.requires_grad_(True)
        b.requires_grad_(True)
        y = swiglu(a, b)
    grads = torch.autograd.grad(y, (x,) if packed else (a, b), dy)
    dx = grads[0] if packed else torch.cat(grads, dim=-1)
    xr = x.detach().float().requires_grad_(True)
    yr = swiglu_packed_ref(xr)
    (dxr,) = torch.autograd.grad(yr, xr, dy.float())
    _close(y, yr, dtype, "y")
    _close(dx, dxr, dtype, "dx")
