"""Rotary position embedding (RoPE), interleaved-pair convention of DeepSeek-V3, as a Triton kernel.

Convention (DeepSeek-V3 ``apply_rotary_emb``: ``view_as_complex(x.view(..., -1, 2)) * freqs_cis``):
the last dim holds Dr/2 pairs ``(x[2i], x[2i+1])``, read as the complex number ``x[2i] + 1j*x[2i+1]``
and multiplied by ``freqs_cis[t, i] = cos[t, i] + 1j*sin[t, i]``::

    y[2i]   = x[2i] * cos[t, i] - x[2i+1] * sin[t, i]
    y[2i+1] = x[2i] * sin[t, i] + x[2i+1] * cos[t, i]

This is NOT the "rotate_half" (GPT-NeoX / HF Llama) layout, which pairs i with i + Dr/2. The angles
(YaRN-scaled, with any mscale folded in by the caller) come precomputed: ``cos = freqs_cis.real``,
``sin = freqs_cis.imag`` for the positions of the sequence.

Backward: a rotation by -theta (the same kernel with sin negated): dx = rope(dy, cos, -sin).
cos and sin are constants: no gradient flows to them (ValueError if they require grad).

Shapes and dtypes:
    x    [B, T, H, Dr] float32 | bfloat16 | float16, Dr even (Dr/2 any size: masked). Any strides on
         B, T, H (e.g. a slice q[..., nope:] of a larger tensor) with unit stride on the last dim;
         otherwise x is copied.
    cos  [T, Dr/2], sin [T, Dr/2]: any float dtype (fp32 recommended), on x's device.
    out  [B, T, H, Dr] contiguous, x.dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import new_empty, check_device, check_dtype, next_pow2, num_warps_for

__all__ = ["rope", "rope_ref", "RoPEFunction"]


@triton.jit
def _rope_kernel(
    X, COS, SIN, Y,
    T, H, P,
    sxb, sxt, sxh, syb, syt, syh, sct, sst,
    CONJ: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Program (b*T + t, hb) rotates heads [hb*BLOCK_H, (hb+1)*BLOCK_H) of token (b, t).

    SPLIT: load the rows contiguously and de-interleave the pairs in registers (reshape + split,
    join on the way out); otherwise two stride-2 loads / stores.
    """
    bt = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    b = bt // T
    t = bt % T
    p = tl.arange(0, BLOCK_P)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    pm = p < P
    c = tl.load(COS + t * sct + p, mask=pm, other=0.0).to(tl.float32)[None, :]
    s = tl.load(SIN + t * sst + p, mask=pm, other=0.0).to(tl.float32)[None, :]
    if CONJ:
        s = -s
    xrow = X + b * sxb + t * sxt + h[:, None].to(tl.int64) * sxh
    yrow = Y + b * syb + t * syt + h[:, None].to(tl.int64) * syh
    if SPLIT:
        d = tl.arange(0, 2 * BLOCK_P)
        m = (h[:, None] < H) & (d[None, :] < 2 * P)
        x = tl.load(xrow + d[None, :], mask=m, other=0.0).to(tl.float32)
        x0, x1 = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_P, 2]))
        y = tl.reshape(tl.join(x0 * c - x1 * s, x0 * s + x1 * c), [BLOCK_H, 2 * BLOCK_P])
        tl.store(yrow + d[None, :], y.to(Y.dtype.element_ty), mask=m)
    else:
        m = (h[:, None] < H) & pm[None, :]
        x0 = tl.load(xrow + 2 * p[None, :], mask=m, other=0.0).to(tl.float32)
        x1 = tl.load(xrow + 2 * p[None, :] + 1, mask=m, other=0.0).to(tl.float32)
        tl.store(yrow + 2 * p[None, :], (x0 * c - x1 * s).to(Y.dtype.element_ty), mask=m)
        tl.store(yrow + 2 * p[None, :] + 1, (x0 * s + x1 * c).to(Y.dtype.element_ty), mask=m)


# the forward and the backward are one kernel (the backward rotates by -theta: CONJ=True)
_rope_fwd_kernel = _rope_bwd_kernel = _rope_kernel

#: Tunables: de-interleave in registers (True) or with stride-2 accesses; elements per program.
CFG = {"split": True, "block_elems": 8192}  # H200 sweep 2026-11-30: 3.93 TB/s (4096: 3.79)


def rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, conj: bool = False) -> torch.Tensor:
    """Rotate x [B, T, H, Dr] by (cos, sin) [T, Dr/2] (by -theta when ``conj``); returns a new tensor."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, T, H, Dr = x.shape
    P = Dr // 2
    y = new_empty((B, T, H, Dr), x.dtype, x.device)
    if y.numel() == 0:
        return y
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    BLOCK_P = next_pow2(P)
    BLOCK_H = min(next_pow2(H), max(1, CFG["block_elems"] // (2 * BLOCK_P)))
    grid = (B * T, triton.cdiv(H, BLOCK_H))
    _rope_kernel[grid](
        x, cos, sin, y,
        T, H, P,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        cos.stride(0), sin.stride(0),
        CONJ=conj, SPLIT=CFG["split"], BLOCK_H=BLOCK_H, BLOCK_P=BLOCK_P,
        num_warps=num_warps_for(2 * BLOCK_H * BLOCK_P, hi=8),
    )
    return y


class RoPEFunction(torch.autograd.Function):
    """y = rope(x, cos, sin); dx = rope(dy, cos, -sin). No grads for cos / sin."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_launch(x, cos, sin, conj=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rope_launch(dy, cos, sin, conj=True), None, None


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    check_dtype("x", x)
    check_dtype("cos", cos)
    check_dtype("sin", sin)
    if x.dim() != 4:
        raise ValueError(f"x must be [B, T, H, Dr], got shape {list(x.shape)}")
    B, T, H, Dr = x.shape
    if Dr % 2:
        raise ValueError(f"rope dim Dr={Dr} must be even (interleaved pairs)")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (T, Dr // 2):
            raise ValueError(f"{name} must be [T, Dr/2] = [{T}, {Dr // 2}], got {list(t.shape)}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad, but rope() treats cos/sin as constants")
    check_device(("x", x), ("cos", cos), ("sin", sin))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair RoPE (DeepSeek-V3). x [B, T, H, Dr]; cos, sin [T, Dr/2] -> [B, T, H, Dr]."""
    _check(x, cos, sin)
    return RoPEFunction.apply(x, cos, sin)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference (fp32 math, output in x.dtype); same as V3's complex multiplication."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c = cos.float()[None, :, None, :]
    s = sin.float()[None, :, None, :]
    y = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return y.to(x.dtype)
