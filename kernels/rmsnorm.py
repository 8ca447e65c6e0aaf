"""RMSNorm and fused residual-add + RMSNorm as Triton kernels, with autograd.

Math (fp32 inside the kernel, whatever the storage dtype)::

    rmsnorm(x, w, eps)     = x * rsqrt(mean(x**2, -1) + eps) * w
    add_rmsnorm(x, r, w)   : h = x + r (rounded to r's dtype, i.e. the residual stream)
                             returns (rmsnorm(h, w, eps), h)

This is the RMSNorm of DeepSeek-V3 (``F.rms_norm(x, (dim,), weight, eps)``, Zhang & Sennrich 2019)
and the pre-norm block pattern ``h = x + residual; y = norm(h)``, fused so that h is read once.

Shapes and dtypes:
    x         [..., D] float32 | bfloat16 | float16; any leading shape; last dim any size (masked),
              D <= 65536. Non-contiguous inputs are copied to a contiguous [N, D] view.
    residual  same shape as x; its dtype is the residual stream's (new_residual keeps it).
    weight    [D], float32 | bfloat16 | float16 (its grad is returned in its dtype).
    outputs   normed in x's dtype; new_residual in residual's dtype.

Backward: grads for x, residual and weight. The weight grad is deterministic: a fixed grid of
programs, each owning a contiguous range of rows, writes fp32 partial sums [G, D] which are then
reduced with ``torch.sum`` (no atomics). The grad of x and of residual is the same tensor
``dh = d(normed)/dh + d(new_residual)`` (cast to each input's dtype). CFG sets the backward's launch
shape and whether the row loop is software-pipelined (the default); every variant computes the same math.

Errors: TypeError for unsupported dtypes; ValueError for shape mismatches, D > 65536 or a
non-CUDA device without the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (new_empty, MAX_FUSED_DIM, check_device, check_dtype, max_shared_mem, next_pow2, num_warps_for,
                     sm_count)

__all__ = [
    "rmsnorm",
    "add_rmsnorm",
    "rmsnorm_ref",
    "add_rmsnorm_ref",
    "RMSNormFunction",
    "AddRMSNormFunction",
]


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rmsnorm_fwd_kernel(
    X, R, W, Y, H, RSTD,
    stride_x, stride_r, stride_y, stride_h,
    D, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per row: y = h * rstd * w with h = x (+ r, stored to H)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h_st = (h + r).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h_st, mask=mask)
        h = h_st.to(tl.float32)  # normalise exactly what the residual stream holds
    ms = tl.sum(h * h, axis=0) / D
    rstd = 1.0 / tl.sqrt(ms + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = h * rstd * w
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd_tile(
    DY, H, w, RSTD, DX, DH_OUT,
    stride_dy, stride_h, stride_dx, stride_dho,
    D, r64, row_end, cols, mask,
    HAS_DH_OUT: tl.constexpr,
):
    """Rows r64 [ROWS] (int64) x cols [BLOCK_D] (whole rows; w [BLOCK_D] the loaded weight, fp32): store dx,
    return this tile's dw contribution [BLOCK_D] fp32."""
    rm = r64 < row_end
    m = mask[None, :] & rm[:, None]
    dy = tl.load(DY + r64[:, None] * stride_dy + cols[None, :], mask=m, other=0.0).to(tl.float32)
    h = tl.load(H + r64[:, None] * stride_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + r64, mask=rm, other=0.0)
    xhat = h * rstd[:, None]
    wdy = dy * w[None, :]
    c = tl.sum(xhat * wdy, axis=1) / D
    dx = (wdy - xhat * c[:, None]) * rstd[:, None]
    if HAS_DH_OUT:
        dx += tl.load(DH_OUT + r64[:, None] * stride_dho + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(DX + r64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)
    return tl.sum(dy * xhat, axis=0)


@triton.jit
def _rmsnorm_bwd_kernel(
    DY, H, W, RSTD, DX, DH_OUT, DW_PARTIAL,
    stride_dy, stride_h, stride_dx, stride_dho,
    N, D, rows_per_prog,
    HAS_DH_OUT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Program p owns rows [p*rows_per_prog, (p+1)*rows_per_prog), ROWS of them per loop iteration (a
    [ROWS, BLOCK_D] tile: more loads in flight per program). STAGES > 1 software-pipelines the row loop
    (``tl.range(num_stages=STAGES)``: the next tiles' loads are issued, into shared memory, while this one
    is reduced and stored); STAGES == 1 is a plain loop.

    dx = rstd * (dy*w - xhat * mean(dy*w*xhat)) (+ dh_out);  dw_partial[p] = sum_rows dy * xhat.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    if STAGES > 1:
        for i in tl.range(0, rows_per_prog, ROWS, num_stages=STAGES):
            r64 = row_start + i + tl.arange(0, ROWS).to(tl.int64)  # [ROWS]
            dw_acc += _rmsnorm_bwd_tile(DY, H, w, RSTD, DX, DH_OUT, stride_dy, stride_h, stride_dx, stride_dho,
                                        D, r64, row_end, cols, mask, HAS_DH_OUT)
    else:
        for i in range(0, rows_per_prog, ROWS):
            r64 = row_start + i + tl.arange(0, ROWS).to(tl.int64)  # [ROWS]
            dw_acc += _rmsnorm_bwd_tile(DY, H, w, RSTD, DX, DH_OUT, stride_dy, stride_h, stride_dx, stride_dho,
                                        D, r64, row_end, cols, mask, HAS_DH_OUT)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * D + cols, dw_acc, mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _as_rows(t: torch.Tensor, D: int) -> torch.Tensor:
    t2 = t.reshape(-1, D)
    if D > 0 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> int:
    check_dtype("x", x)
    check_dtype("weight", weight)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., D]")
    D = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != D:
        raise ValueError(f"weight must have shape [{D}] (x.shape[-1]), got {list(weight.shape)}")
    if D > MAX_FUSED_DIM:
        raise ValueError(f"last dim {D} > {MAX_FUSED_DIM}: a row must fit in one block")
    named = [("x", x), ("weight", weight)]
    if residual is not None:
        check_dtype("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {list(residual.shape)} != x shape {list(x.shape)}")
        named.append(("residual", residual))
    check_device(*named)
    return D


#: Tunables (swept by ``bench_kernels.py --sweep``; each config is checked against the default first):
#:   ``bwd_programs_per_sm`` backward grid (each program owns a contiguous range of rows);
#:   ``fwd_max_warps`` / ``bwd_max_warps`` warp caps;
#:   ``bwd_rows``     rows per iteration of the backward's row loop (a [ROWS, BLOCK_D] tile);
#:   ``bwd_max_tile`` cap on ROWS * BLOCK_D (elements of one fp32 tile); bwd_rows is lowered to fit
#:                    (16384 allows 2 rows at D = 7168, BLOCK_D 8192);
#:   ``bwd_stages``   > 1: the row loop is software-pipelined with ``tl.range(num_stages=bwd_stages)`` (the next
#:                    rows' loads in flight while this one is reduced; Triton pipelines loads that feed no dot
#:                    only through the loop's own num_stages, not the launch's); 1: a plain loop. Lowered per
#:                    launch so the tiles in flight fit in shared memory (:func:`_bwd_stages`).
#: H200 (2026-11-30, 16384 x 7168 bf16, bench_kernels.py --sweep): 1 program/SM, 1 row, 3 stages, 8 warps:
#: rmsnorm bwd 3.70 TB/s, add_rmsnorm bwd 3.86 TB/s (87% / 91% of the 4.24 TB/s copy); the plain loop's best
#: (1/SM x 2 rows) 3.24 / 3.25 TB/s; 4 rows (bwd_max_tile 32768) <= 0.84 TB/s (register spills); a two-pass kernel
#: over column chunks (tried, removed) <= 2.83 TB/s.
CFG = {"bwd_programs_per_sm": 1, "fwd_max_warps": 16, "bwd_max_warps": 8, "bwd_rows": 1,
       "bwd_stages": 3, "bwd_max_tile": 16384}


def rmsnorm_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float,
                residual2: torch.Tensor | None = None):
    """Launch the forward on row views [N, D].

    Returns (y [N, D] x.dtype, h [N, D] residual.dtype or None, rstd [N] fp32).
    """
    N, D = x2.shape
    y = new_empty((N, D), x2.dtype, x2.device)
    rstd = new_empty((N,), torch.float32, x2.device)
    h = None
    if residual2 is not None:
        h = new_empty((N, D), residual2.dtype, x2.device)
    if N == 0 or D == 0:
        if D == 0:
            rstd.fill_(float(eps) ** -0.5)
            if h is not None:
                h.copy_(residual2)
        return y, h, rstd
    BLOCK_D = next_pow2(D)
    r_arg = residual2 if residual2 is not None else x2
    h_arg = h if h is not None else y
    _rmsnorm_fwd_kernel[(N,)](
        x2, r_arg, weight, y, h_arg, rstd,
        x2.stride(0), r_arg.stride(0), y.stride(0), h_arg.stride(0),
        D, float(eps),
        HAS_RESIDUAL=residual2 is not None,
        BLOCK_D=BLOCK_D,
        num_warps=num_warps_for(BLOCK_D, hi=CFG["fwd_max_warps"]),
    )
    return y, h, rstd


def _bwd_rows(block_d: int) -> int:
    """Rows per backward iteration: CFG's, capped so a [ROWS, block_d] fp32 tile stays <= CFG["bwd_max_tile"]
    elements (16384 by default)."""
    return max(1, min(next_pow2(CFG["bwd_rows"]), CFG["bwd_max_tile"] // block_d))


def _bwd_stages(block_d: int, rows: int, elem_bytes: int, device: torch.device) -> int:
    """Pipeline stages of the backward's row loop: CFG["bwd_stages"], lowered while the buffers Triton allocates
    for them, (stages - 1) x rows x block_d x elem_bytes (elem_bytes: the bytes one column of every loaded input
    takes) plus 1 KB, exceed the device's shared memory; 1 = the plain loop (no buffers). Measured on an H200
    (227 KB): 3 stages of fp32 rmsnorm at D = 16384 asked for 262,184 bytes (2 x 128 KB + 40) and failed to
    launch; bf16 add_rmsnorm at D = 7168 keeps its 3 stages (96 KB)."""
    stages = max(1, int(CFG["bwd_stages"]))
    per_stage = rows * block_d * elem_bytes
    budget = max_shared_mem(device) - 1024
    while stages > 1 and (stages - 1) * per_stage > budget:
        stages -= 1
    return stages


def rmsnorm_bwd(dy2: torch.Tensor, h2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                dx_dtype: torch.dtype, dh_out2: torch.Tensor | None = None,
                n_programs: int | None = None):
    """Launch the backward on row views [N, D]; returns (dx [N, D] dx_dtype, dw [D] weight.dtype).

    dy2, h2 [N, D] (any float dtype, unit column stride), weight [D], rstd [N] fp32 (from the forward);
    dh_out2 [N, D] or None: added to dx (add_rmsnorm's grad of new_residual). n_programs overrides the grid
    size (default CFG["bwd_programs_per_sm"] per SM). The kernel variant follows CFG (bwd_* keys).
    """
    N, D = h2.shape
    dx = new_empty((N, D), dx_dtype, h2.device)
    if N == 0 or D == 0:
        if dh_out2 is not None:
            dx.copy_(dh_out2)
        return dx, torch.zeros_like(weight)
    dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
    if dh_out2 is not None and dh_out2.stride(-1) != 1:
        dh_out2 = dh_out2.contiguous()
    G = n_programs or min(N, CFG["bwd_programs_per_sm"] * sm_count(h2.device))
    G = max(1, min(G, N))
    rows_per_prog = triton.cdiv(N, G)
    G = triton.cdiv(N, rows_per_prog)
    dw_partial = new_empty((G, D), torch.float32, h2.device)
    BLOCK_D = next_pow2(D)
    dho_arg = dh_out2 if dh_out2 is not None else dy2
    rows = _bwd_rows(BLOCK_D)
    elem_bytes = dy2.element_size() + h2.element_size() + (dh_out2.element_size() if dh_out2 is not None else 0)
    _rmsnorm_bwd_kernel[(G,)](
        dy2, h2, weight, rstd, dx, dho_arg, dw_partial,
        dy2.stride(0), h2.stride(0), dx.stride(0), dho_arg.stride(0),
        N, D, rows_per_prog,
        HAS_DH_OUT=dh_out2 is not None,
        BLOCK_D=BLOCK_D,
        ROWS=rows,
        STAGES=_bwd_stages(BLOCK_D, rows, elem_bytes, h2.device),
        num_warps=num_warps_for(BLOCK_D, hi=CFG["bwd_max_warps"]),
    )
    dw = dw_partial.sum(dim=0).to(weight.dtype)
    return dx, dw


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class RMSNormFunction(torch.autograd.Function):
    """y = rmsnorm(x, weight, eps); grads for x and weight."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        D = x.shape[-1]
        x2 = _as_rows(x, D)
        y, _, rstd = rmsnorm_fwd(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        D = x2.shape[-1]
        dx, dw = rmsnorm_bwd(_as_rows(dy, D), x2, weight, rstd, x2.dtype)
        return (dx.view(ctx.x_shape) if ctx.needs_input_grad[0] else None,
                dw if ctx.needs_input_grad[1] else None, None)


class AddRMSNormFunction(torch.autograd.Function):
    """(normed, h) = add_rmsnorm(x, residual, weight, eps); grads for x, residual and weight."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        D = x.shape[-1]
        y, h, rstd = rmsnorm_fwd(_as_rows(x, D), weight, eps, residual2=_as_rows(residual, D))
        ctx.save_for_backward(h, weight, rstd)
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.r_dtype = residual.dtype
        return y.view(x.shape), h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh_out):
        h2, weight, rstd = ctx.saved_tensors
        D = h2.shape[-1]
        if dy is None:
            dy = torch.zeros(ctx.x_shape, dtype=ctx.x_dtype, device=h2.device)
        dho = _as_rows(dh_out, D) if dh_out is not None else None
        dh, dw = rmsnorm_bwd(_as_rows(dy, D), h2, weight, rstd, ctx.x_dtype, dh_out2=dho)
        dh = dh.view(ctx.x_shape)
        dx = dh if ctx.needs_input_grad[0] else None
        dr = None
        if ctx.needs_input_grad[1]:
            dr = dh if ctx.r_dtype == ctx.x_dtype else dh.to(ctx.r_dtype)
        return dx, dr, (dw if ctx.needs_input_grad[2] else None), None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim. x [..., D] (fp32|bf16|fp16), weight [D] -> [..., D] in x.dtype."""
    _check(x, weight)
    return RMSNormFunction.apply(x, weight, float(eps))


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``h = x + residual; return rmsnorm(h, weight, eps), h``.

    x, residual [..., D]; weight [D]. Returns (normed [..., D] in x.dtype, h [..., D] in
    residual.dtype). h is rounded to residual.dtype before it is normalised, exactly as the unfused
    ``h = (x + residual).to(residual.dtype); rmsnorm(h)``.
    """
    _check(x, weight, residual)
    return AddRMSNormFunction.apply(x, residual, weight, float(eps))


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pure-torch reference (fp32 math, output in x.dtype)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of :func:`add_rmsnorm` (fp32 math)."""
    h = (x.float() + residual.float()).to(residual.dtype)
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype), h
