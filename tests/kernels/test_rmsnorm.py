"""kernels/rmsnorm.py: forward and every gradient vs the pure-torch reference.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
kernels/ and triton are imported). With CUDA the same small odd-shape tests run compiled on the GPU,
and the `gpu`-marked tests add real sizes.

Reference: the *_ref functions applied to fp32 copies of the (fp32- or bf16-stored) inputs, so the
reference carries no bf16 rounding of its own. The interpreter rounds fp32 -> bf16 toward zero
(the GPU rounds to nearest even): the bf16 tolerance covers one bf16 ulp plus the kernel's roundings.
"""


import pytest
import torch


from tests.kernels.common import DEVICE, assert_close_finite, gpu, poison_outputs  # noqa: E402,F401
from kernels.rmsnorm import (  # noqa: E402
    add_rmsnorm, add_rmsnorm_ref, rmsnorm, rmsnorm_bwd, rmsnorm_fwd, rmsnorm_ref,
)


# dtype -> (atol, rtol) for outputs and gradients compared in fp32
TOL = {
    torch.float32: (2e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1, 1), (7, 17), (3, 11, 67), (33, 64)]


def _close(got, want, dtype, what):
    assert_close_finite(got, want, TOL[dtype], what)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _check_rmsnorm(shape, dtype, seed):
    """rmsnorm and its gradients (under the current CFG) vs rmsnorm_ref on fp32 copies of the inputs."""
    torch.manual_seed(seed)
    D = shape[-1]
    x = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(D, device=DEVICE)).requires_grad_(True)
    y = rmsnorm(x, w, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    dx, dw = torch.autograd.grad(y, (x, w), dy)

    xr, wr = _leaf(x.float()), _leaf(w)
    yr = rmsnorm_ref(xr, wr, 1e-6)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy.float())
    _close(y, yr, dtype, "y")
    assert dx.dtype == dtype and dw.dtype == w.dtype
    _close(dx, dxr, dtype, "dx")
    _close(dw, dwr, dtype, "dw")


def _check_add_rmsnorm(shape, dtype, seed):
    """add_rmsnorm (normed, new residual) and the gradients of x, residual and weight (under the current CFG)
    vs the reference; returns (x, r, w, h) for further checks."""
    torch.manual_seed(seed)
    D = shape[-1]
    x = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_(True)
    r = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(D, device=DEVICE)).requires_grad_(True)
    y, h = add_rmsnorm(x, r, w, 1e-5)
    assert y.dtype == dtype and h.dtype == dtype and y.shape == h.shape == x.shape
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    dh = torch.randn(shape, device=DEVICE).to(dtype)
    dx, dr, dw = torch.autograd.grad((y, h), (x, r, w), (dy, dh))

    # the kernel normalises h as stored (rounded to the residual dtype); the reference normalises
    # that same stored h (straight-through for the gradient), after checking h itself
    xr, rr, wr = _leaf(x.float()), _leaf(r.float()), _leaf(w)
    hr = xr + rr
    yr = rmsnorm_ref(hr + (h.detach().float() - hr.detach()), wr, 1e-5)
    dxr, drr, dwr = torch.autograd.grad((yr, hr), (xr, rr, wr), (dy.float(), dh.float()))
    _close(h, hr, dtype, "h")
    _close(y, yr, dtype, "y")
    _close(dx, dxr, dtype, "dx")
    _close(dr, drr, dtype, "dresidual")
    _close(dw, dwr, dtype, "dw")
    return x, r, w, h


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rmsnorm_forward_backward(shape, dtype):
    _check_rmsnorm(shape, dtype, seed=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_rmsnorm_forward_backward(shape, dtype):
    x, r, w, h = _check_add_rmsnorm(shape, dtype, seed=1)
    # the module's own reference agrees with the unfused definition
    y2, h2 = add_rmsnorm_ref(x.detach(), r.detach(), w.detach(), 1e-5)
    _close(h2, h, dtype, "add_rmsnorm_ref h")


def test_add_rmsnorm_mixed_dtypes_and_unused_residual():
    """bf16 activations with an fp32 residual stream; only `normed` feeds the loss."""
    torch.manual_seed(2)
    x = torch.randn(5, 23, device=DEVICE).to(torch.bfloat16).requires_grad_(True)
    r = torch.randn(5, 23, device=DEVICE).requires_grad_(True)
    w = torch.randn(23, device=DEVICE).to(torch.bfloat16).requires_grad_(True)
    y, h = add_rmsnorm(x, r, w)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    dy = torch.randn(5, 23, device=DEVICE)
    dx, dr, dw = torch.autograd.grad(y, (x, r, w), dy.to(torch.bfloat16))
    assert dx.dtype == torch.bfloat16 and dr.dtype == torch.float32 and dw.dtype == torch.bfloat16
    xr, rr, wr = _leaf(x.float()), _leaf(r), _leaf(w.float())
    yr, hr = add_rmsnorm_ref(xr, rr, wr)
    dxr, drr, dwr = torch.autograd.grad(yr, (xr, rr, wr), dy.to(torch.bfloat16).float())
    _close(h, hr, torch.float32, "h")
    _close(y, yr, torch.bfloat16, "y")
    _close(dx, dxr, torch.bfloat16, "dx")
    _close(dr, drr, torch.bfloat16, "dresidual")
    _close(dw, dwr, torch.bfloat16, "dw")


def test_noncontiguous_input():
    torch.manual_seed(3)
    base = torch.randn(19, 6, device=DEVICE)
    x = base.t().requires_grad_(True)  # [6, 19], strides (1, 6)
    w = torch.randn(19, device=DEVICE, requires_grad=True)
    y = rmsnorm(x, w)
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    xr, wr = _leaf(x), _leaf(w)
    yr = rmsnorm_ref(xr, wr)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy)
    _close(y, yr, torch.float32, "y")
    _close(dx, dxr, torch.float32, "dx")
    _close(dw, dwr, torch.float32, "dw")


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("n_programs", [1, 2, 3, 7])
def test_backward_partial_sums_any_grid(n_programs, rows, monkeypatch):
    """dw from any number of programs (uneven row ranges) and rows per iteration (a partial last tile) equals the
    reference; dx unchanged; with a residual gradient too."""
    import kernels.rmsnorm as RN
    monkeypatch.setitem(RN.CFG, "bwd_rows", rows)
    torch.manual_seed(4)
    N, D = 7, 13
    x = torch.randn(N, D, device=DEVICE)
    w = torch.randn(D, device=DEVICE)
    dy = torch.randn(N, D, device=DEVICE)
    dho = torch.randn(N, D, device=DEVICE)
    _, _, rstd = rmsnorm_fwd(x, w, 1e-6)
    dx2, _ = rmsnorm_bwd(dy, x, w, rstd, torch.float32, dh_out2=dho, n_programs=n_programs)
    dx, dw = rmsnorm_bwd(dy, x, w, rstd, torch.float32, n_programs=n_programs)
    _close(dx2, dx + dho, torch.float32, "dx with dh_out")
    xr, wr = _leaf(x), _leaf(w)
    dxr, dwr = torch.autograd.grad(rmsnorm_ref(xr, wr), (xr, wr), dy)
    _close(dx, dxr, torch.float32, "dx")
    _close(dw, dwr, torch.float32, "dw")


# backward variants besides the default (kernels/rmsnorm.py CFG: bwd_stages, bwd_rows, bwd_max_tile), each against
# the reference
BWD_VARIANTS = {
    "plain_loop_rows2": {"bwd_stages": 1, "bwd_rows": 2},
    "stages2_rows2": {"bwd_stages": 2, "bwd_rows": 2},
    "rows4_max_tile": {"bwd_rows": 4, "bwd_max_tile": 1024},  # capped: 2 rows of BLOCK_D 512 at D=300; 4 at D=130
}
# D=300 and 130: not a multiple of the block; 37 rows over 4 programs: several tiles, a partial last one
VARIANT_SHAPES = [(37, 300), (3, 9, 130), (1, 1)]


@pytest.fixture(params=list(BWD_VARIANTS), ids=list(BWD_VARIANTS))
def bwd_variant(request, monkeypatch):
    """CFG set to one backward variant for the test (monkeypatch restores it)."""
    import kernels.rmsnorm as RN
    for k, v in BWD_VARIANTS[request.param].items():
        assert k in RN.CFG, k
        monkeypatch.setitem(RN.CFG, k, v)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", VARIANT_SHAPES, ids=str)
def test_rmsnorm_backward_variants(bwd_variant, shape, dtype):
    _check_rmsnorm(shape, dtype, seed=6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", VARIANT_SHAPES, ids=str)
def test_add_rmsnorm_backward_variants(bwd_variant, shape, dtype):
    _check_add_rmsnorm(shape, dtype, seed=7)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("D,dtype", [(7168, torch.float32), (16384, torch.bfloat16), (16384, torch.float32),
                                     (65536, torch.bfloat16)], ids=str)
def test_gpu_wide_rows_fit_shared_memory(D, dtype, fused):
    """Widths and dtypes whose pipelined backward would not fit in shared memory at the default stages: the
    launcher lowers the stages (down to the plain loop) and the results stay right."""
    _check_gpu(515, D, dtype, fused)


def test_backward_rows_cap(monkeypatch):
    """bwd_max_tile caps ROWS * block columns (16384 by default: 2 rows at D=7168, BLOCK_D 8192)."""
    import kernels.rmsnorm as RN
    monkeypatch.setitem(RN.CFG, "bwd_rows", 2)
    assert RN._bwd_rows(8192) == 2 and RN._bwd_rows(16384) == 1
    monkeypatch.setitem(RN.CFG, "bwd_rows", 4)
    assert RN._bwd_rows(8192) == 2 and RN._bwd_rows(4096) == 4
    monkeypatch.setitem(RN.CFG, "bwd_max_tile", 32768)
    assert RN._bwd_rows(8192) == 4 and RN._bwd_rows(65536) == 1


def test_backward_stages_fit_shared_memory(monkeypatch):
    """The pipelined backward keeps CFG's stages only while Triton's (stages - 1) buffers of rows x BLOCK_D x (bytes
    of one column of the loaded inputs), plus 1 KB, fit in the device's shared memory; else fewer, down to the
    plain loop (1). The H200 numbers are the ones measured (benchmarks/README.md)."""
    import kernels.rmsnorm as RN
    cuda = torch.device("cuda")
    monkeypatch.setattr(RN, "max_shared_mem", lambda device: 232448)   # H100 / H200: 227 KB
    assert RN._bwd_stages(8192, 1, 3 * 2, cuda) == 3      # add_rmsnorm bf16, D = 7168: 2 x 48 KB
    assert RN._bwd_stages(8192, 1, 3 * 4, cuda) == 3      # add_rmsnorm fp32, D = 7168: 2 x 96 KB (ran)
    assert RN._bwd_stages(16384, 1, 2 * 4, cuda) == 2     # rmsnorm fp32, D = 16384: 3 stages asked 262,184 B
    assert RN._bwd_stages(16384, 1, 3 * 4, cuda) == 2     # add_rmsnorm fp32, D = 16384: 1 x 192 KB
    assert RN._bwd_stages(65536, 1, 2 * 2, cuda) == 1     # rmsnorm bf16, D = 65536: one buffer is 256 KB
    monkeypatch.setattr(RN, "max_shared_mem", lambda device: 101376)   # 99 KB (consumer / older GPUs)
    assert RN._bwd_stages(8192, 1, 3 * 2, cuda) == 3
    assert RN._bwd_stages(8192, 1, 3 * 4, cuda) == 2
    assert RN._bwd_stages(16384, 1, 3 * 4, cuda) == 1
    monkeypatch.setitem(RN.CFG, "bwd_stages", 1)
    assert RN._bwd_stages(16, 1, 2, cuda) == 1


def test_backward_deterministic():
    torch.manual_seed(5)
    x = torch.randn(33, 67, device=DEVICE, requires_grad=True)
    w = torch.randn(67, device=DEVICE, requires_grad=True)
    dy = torch.randn(33, 67, device=DEVICE)
    g1 = torch.autograd.grad(rmsnorm(x, w), (x, w), dy)
    g2 = torch.autograd.grad(rmsnorm(x, w), (x, w), dy)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_errors():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight must have shape"):
        rmsnorm(x, torch.ones(7, device=DEVICE))
    with pytest.raises(TypeError, match="dtype"):
        rmsnorm(x.to(torch.int32), torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="residual shape"):
        add_rmsnorm(x, torch.randn(3, 7, device=DEVICE), torch.ones(8, device=DEVICE))


def test_empty_rows():
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE, requires_grad=True)
    y = rmsnorm(x, w)
    assert y.shape == (0, 8)
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8, device=DEVICE))


# ---------------------------------------------------------------------------- real sizes (GPU)
def _check_gpu(N, D, dtype, fused):
    """rmsnorm / add_rmsnorm on CUDA at [N, D]: output and gradients vs the fp32 reference (dw, a sum over N
    rows, relative to its scale)."""
    torch.manual_seed(0)
    x = torch.randn(N, D, device="cuda", dtype=dtype, requires_grad=True)
    r = torch.randn(N, D, device="cuda", dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(D, device="cuda")).requires_grad_(True)
    dy = torch.randn(N, D, device="cuda", dtype=dtype)
    xr, rr, wr = _leaf(x.float()), _leaf(r.float()), _leaf(w)
    if fused:
        y, h = add_rmsnorm(x, r, w)
        dx, dr, dw = torch.autograd.grad(y, (x, r, w), dy)
        hr = xr + rr
        yr = rmsnorm_ref(hr + (h.detach().float() - hr.detach()), wr)  # normalise the kernel's rounded h
        dxr, drr, dwr = torch.autograd.grad(yr, (xr, rr, wr), dy.float())
        _close(dr, drr, dtype, "dresidual")
    else:
        y = rmsnorm(x, w)
        dx, dw = torch.autograd.grad(y, (x, w), dy)
        yr = rmsnorm_ref(xr, wr)
        dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy.float())
    _close(y, yr, dtype, "y")
    _close(dx, dxr, dtype, "dx")
    torch.testing.assert_close(dw, dwr, atol=1e-3 * dwr.abs().max().item(), rtol=1e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_real_size(fused):
    _check_gpu(8192, 7168, torch.bfloat16, fused)
