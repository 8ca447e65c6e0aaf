"""SwiGLU activation ``silu(a) * b`` as Triton kernels, with autograd.

Used by the dense MLP and the experts of DeepSeek-V3 (``w2(silu(w1(x)) * w3(x))``; Shazeer 2020,
"GLU Variants Improve Transformer"). Math in fp32, stored in the input dtype::

    y  = a * sigmoid(a) * b
    da = dy * b * sigmoid(a) * (1 + a * (1 - sigmoid(a)))
    db = dy * a * sigmoid(a)

Two entry points:
    swiglu(a, b)        a, b [..., F] (same shape and dtype) -> y [..., F]
    swiglu_packed(x)    x [..., 2F] = cat([a, b], -1) (first half gate ``a``, second half ``b``,
                        i.e. the output of one fused w1|w3 GEMM) -> y [..., F]; its grad is [..., 2F]

Shapes and dtypes: any leading shape, last dim any size (masked); float32 | bfloat16 | float16.
Inputs whose last dim is not unit-stride are copied. Errors: TypeError (dtype), ValueError (shapes,
an odd packed last dim, device).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import new_empty, new_empty_like, check_device, check_dtype, next_pow2, num_warps_for

__all__ = ["swiglu", "swiglu_packed", "swiglu_ref", "swiglu_packed_ref",
           "SwiGLUFunction", "SwiGLUPackedFunction"]


@triton.jit
def _swiglu_fwd_kernel(A, B, Y, stride_a, stride_b, stride_y, F, n_cb, BLOCK: tl.constexpr):
    """Program row * n_cb + cb: y[row, cb*BLOCK : (cb+1)*BLOCK] = silu(a) * b."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_cb
    cols = (pid % n_cb) * BLOCK + tl.arange(0, BLOCK)
    m = cols < F
    a = tl.load(A + row * stride_a + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=m, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(DY, A, B, DA, DB, stride_dy, stride_a, stride_b, stride_da, stride_db, F,
                       n_cb, BLOCK: tl.constexpr):
    """Program row * n_cb + cb: da, db of y = silu(a) * b for one column block of one row."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_cb
    cols = (pid % n_cb) * BLOCK + tl.arange(0, BLOCK)
    m = cols < F
    dy = tl.load(DY + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
    a = tl.load(A + row * stride_a + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    da = dy * b * sig * (1.0 + a * (1.0 - sig))
    db = dy * silu
    tl.store(DA + row * stride_da + cols, da.to(DA.dtype.element_ty), mask=m)
    tl.store(DB + row * stride_db + cols, db.to(DB.dtype.element_ty), mask=m)


#: Tunables: elements per program and warps (H200: see benchmarks/bench_kernels.py).
CFG = {"block": 2048, "warps": 8}


def _block(F: int) -> int:
    return min(next_pow2(F), CFG["block"])


def _flat_rows(*ts: torch.Tensor):
    """View row tensors [N, F] as one row [1, N*F] when they are all contiguous (a 1-D launch)."""
    if all(t.is_contiguous() for t in ts):
        return [t.view(1, -1) for t in ts]
    return list(ts)


def swiglu_fwd(a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """a2, b2: row views [N, F] with unit column stride (may be halves of one packed tensor)."""
    N, F = a2.shape
    y = new_empty((N, F), a2.dtype, a2.device)
    if y.numel() == 0:
        return y
    a_, b_, y_ = _flat_rows(a2, b2, y)
    R, C = a_.shape
    BLOCK = _block(C)
    n_cb = triton.cdiv(C, BLOCK)
    _swiglu_fwd_kernel[(R * n_cb,)](
        a_, b_, y_, a_.stride(0), b_.stride(0), y_.stride(0), C, n_cb,
        BLOCK=BLOCK, num_warps=min(CFG["warps"], num_warps_for(BLOCK, hi=16)))
    return y


def swiglu_bwd(dy2, a2, b2, da2, db2) -> None:
    """Write da, db (row views [N, F], possibly halves of one packed [N, 2F] grad)."""
    N, F = a2.shape
    if N == 0 or F == 0:
        return
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    dy_, a_, b_, da_, db_ = _flat_rows(dy2, a2, b2, da2, db2)
    R, C = a_.shape
    BLOCK = _block(C)
    n_cb = triton.cdiv(C, BLOCK)
    _swiglu_bwd_kernel[(R * n_cb,)](
        dy_, a_, b_, da_, db_,
        dy_.stride(0), a_.stride(0), b_.stride(0), da_.stride(0), db_.stride(0), C, n_cb,
        BLOCK=BLOCK, num_warps=min(CFG["warps"], num_warps_for(BLOCK, hi=16)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.shape[-1] == 0 or t2.stride(-1) == 1 else t2.contiguous()


class SwiGLUFunction(torch.autograd.Function):
    """y = silu(a) * b for a, b [..., F]."""

    @staticmethod
    def forward(ctx, a, b):
        a2, b2 = _rows(a), _rows(b)
        ctx.save_for_backward(a2, b2)
        ctx.shape = a.shape
        return swiglu_fwd(a2, b2).view(a.shape)

    @staticmethod
    def backward(ctx, dy):
        a2, b2 = ctx.saved_tensors
        da = new_empty_like(a2)
        db = new_empty_like(b2)
        swiglu_bwd(_rows(dy), a2, b2, da, db)
        return da.view(ctx.shape), db.view(ctx.shape)


class SwiGLUPackedFunction(torch.autograd.Function):
    """y = silu(x[..., :F]) * x[..., F:] for x [..., 2F]."""

    @staticmethod
    def forward(ctx, x):
        x2 = _rows(x)
        F = x2.shape[1] // 2
        ctx.save_for_backward(x2)
        ctx.shape = x.shape
        return swiglu_fwd(x2[:, :F], x2[:, F:]).view(*x.shape[:-1], F)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        F = x2.shape[1] // 2
        dx = new_empty_like(x2)
        swiglu_bwd(_rows(dy), x2[:, :F], x2[:, F:], dx[:, :F], dx[:, F:])
        return dx.view(ctx.shape)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b. a, b [..., F], same shape and dtype (fp32|bf16|fp16) -> [..., F] in that dtype."""
    check_dtype("a", a)
    check_dtype("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {list(a.shape)} and {list(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.dim() < 1:
        raise ValueError("a, b must have at least one dimension")
    check_device(("a", a), ("b", b))
    return SwiGLUFunction.apply(a, b)


def swiglu_packed(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :F]) * x[..., F:] for x [..., 2F] -> [..., F] in x.dtype."""
    check_dtype("x", x)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x must be [..., 2F] with an even last dim, got {list(x.shape)}")
    check_device(("x", x))
    return SwiGLUPackedFunction.apply(x)


def swiglu_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference (fp32 math, output in a.dtype)."""
    return (torch.nn.functional.silu(a.float()) * b.float()).to(a.dtype)


def swiglu_packed_ref(x: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference of :func:`swiglu_packed`."""
    a, b = x.chunk(2, dim=-1)
    return swiglu_ref(a, b)
