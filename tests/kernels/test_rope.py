"""kernels/rope.py: interleaved-pair RoPE (DeepSeek-V3 convention) vs the reference, fwd + grad.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before import); with
CUDA the same tests run compiled on the GPU. References run on fp32 copies of the inputs; the bf16
tolerance covers one bf16 ulp (the interpreter rounds fp32 -> bf16 toward zero).
"""

import math

import pytest
import torch


from tests.kernels.common import DEVICE, assert_close_finite, gpu, poison_outputs  # noqa: E402,F401
import kernels.rope as rope_mod  # noqa: E402
from kernels.rope import rope, rope_ref  # noqa: E402


# dtype -> (atol, rtol)
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1, 1, 1, 2), (2, 7, 3, 10), (1, 5, 17, 64), (3, 4, 1, 6)]  # [B, T, H, Dr]


def _close(got, want, dtype, what):
    assert_close_finite(got, want, TOL[dtype], what)


def _freqs(T, Dr, theta=10000.0, device=DEVICE):
    """cos, sin [T, Dr/2] of plain RoPE (YaRN would only change the frequencies)."""
    inv = 1.0 / theta ** (torch.arange(0, Dr, 2, device=device, dtype=torch.float32) / Dr)
    ang = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def _v3_apply_rotary_emb(x, freqs_cis):
    """DeepSeek-V3 inference/model.py apply_rotary_emb, verbatim in spirit."""
    dtype = x.dtype
    x = torch.view_as_complex(x.float().view(*x.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, x.size(1), 1, x.size(-1))
    y = torch.view_as_real(x * freqs_cis).flatten(3)
    return y.to(dtype)


@pytest.mark.parametrize("split", [True, False], ids=["split", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rope_forward_backward(shape, dtype, split, monkeypatch):
    """Both code paths of the kernel (pairs de-interleaved in registers, or stride-2 accesses)."""
    monkeypatch.setitem(rope_mod.CFG, "split", split)
    torch.manual_seed(0)
    B, T, H, Dr = shape
    cos, sin = _freqs(T, Dr)
    x = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_(True)
    y = rope(x, cos, sin)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    (dx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().float().requires_grad_(True)
    yr = rope_ref(xr, cos, sin)
    (dxr,) = torch.autograd.grad(yr, xr, dy.float())
    _close(y, yr, dtype, "y")
    assert dx.dtype == dtype
    _close(dx, dxr, dtype, "dx")


def test_matches_deepseek_v3_complex_convention():
    torch.manual_seed(1)
    B, T, H, Dr = 2, 9, 3, 16
    cos, sin = _freqs(T, Dr)
    x = torch.randn(B, T, H, Dr, device=DEVICE)
    freqs_cis = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))
    _close(rope(x, cos, sin), _v3_apply_rotary_emb(x, freqs_cis), torch.float32, "vs V3")
    _close(rope_ref(x, cos, sin), _v3_apply_rotary_emb(x, freqs_cis), torch.float32, "ref vs V3")


def test_backward_is_inverse_rotation_and_norm_preserving():
    torch.manual_seed(2)
    B, T, H, Dr = 1, 6, 2, 8
    cos, sin = _freqs(T, Dr)
    x = torch.randn(B, T, H, Dr, device=DEVICE, requires_grad=True)
    y = rope(x, cos, sin)
    # the gradient of <y, g> is R^T g = R(-theta) g; with g = y it returns x
    (dx,) = torch.autograd.grad(y, x, y.detach())
    _close(dx, x.detach(), torch.float32, "R^T R x")
    pair_norm = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    _close(pair_norm(y), pair_norm(x.detach()), torch.float32, "pair norms")


def test_strided_input_slice():
    """x is the rope slice of a larger q (as MLA splits q into nope | rope parts)."""
    torch.manual_seed(3)
    B, T, H, nope, Dr = 2, 5, 3, 7, 12
    q = torch.randn(B, T, H, nope + Dr, device=DEVICE, requires_grad=True)
    q_pe = q[..., nope:]
    assert not q_pe.is_contiguous()
    cos, sin = _freqs(T, Dr)
    y = rope(q_pe, cos, sin)
    dy = torch.randn_like(y)
    (dq,) = torch.autograd.grad(y, q, dy)
    qr = q.detach().clone().requires_grad_(True)
    yr = rope_ref(qr[..., nope:], cos, sin)
    (dqr,) = torch.autograd.grad(yr, qr, dy)
    _close(y, yr, torch.float32, "y")
    _close(dq, dqr, torch.float32, "dq")


def test_cos_sin_any_values():
    """cos/sin need not be unit-norm (e.g. an mscale folded in by the caller)."""
    torch.manual_seed(4)
    B, T, H, Dr = 1, 3, 2, 6
    cos = torch.randn(T, Dr // 2, device=DEVICE)
    sin = torch.randn(T, Dr // 2, device=DEVICE)
    x = torch.randn(B, T, H, Dr, device=DEVICE)
    _close(rope(x, cos, sin), rope_ref(x, cos, sin), torch.float32, "y")


def test_errors():
    cos, sin = _freqs(4, 8)
    with pytest.raises(ValueError, match="even"):
        rope(torch.randn(1, 4, 2, 7, device=DEVICE), cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match=r"\[T, Dr/2\]"):
        rope(torch.randn(1, 5, 2, 8, device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match=r"\[B, T, H, Dr\]"):
        rope(torch.randn(4, 2, 8, device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match="requires grad"):
        rope(torch.randn(1, 4, 2, 8, device=DEVICE), cos.requires_grad_(True), sin)
    with pytest.raises(TypeError):
        rope(torch.zeros(1, 4, 2, 8, dtype=torch.int64, device=DEVICE), cos.detach(), sin)


# ---------------------------------------------------------------------------- real sizes (GPU)
@pytest.mark.gpu
@gpu
def test_gpu_real_size():
    torch.manual_seed(0)
    B, T, H, Dr, dtype = 2, 4096, 128, 64, torch.bfloat16
    cos, sin = _freqs(T, Dr, device="cuda")
    x = torch.randn(B, T, H, Dr, device="cuda", dtype=dtype, requires_grad=True)
    y = rope(x, cos, sin)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().float().requires_grad_(True)
    yr = rope_ref(xr, cos, sin)
    (dxr,) = torch.autograd.grad(yr, xr, dy.float())
    _close(y, yr, dtype, "y")
    _close(dx, dxr, dtype, "dx")
    assert math.isfinite(y.float().sum().item())
