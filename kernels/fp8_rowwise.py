"""Fused FP8 quantisation for the tensorwise / rowwise recipes (``moetrain.precision.fp8`` / ``fp8_grouped``).

The eager recipe code quantises with abs / amax / divide / clamp / cast: several full passes with fp32
temporaries per operand. These kernels read each operand once (rowwise rows) or twice (column / tensor amax,
then the cast) and write the FP8 result straight into the layout its GEMM consumes.

Scale convention (the eager ``moetrain.precision.fp8._scale`` / ``_cast``, reproduced bit for bit)::

    scale = amax.clamp_min(1e-12) / fp8_max   if amax > 0 else 1.0;  NaN if amax is inf / nan
    q     = fp8((x.float() / scale).clamp(-fp8_max, fp8_max))        (RTNE)

with fp8_max 448 (E4M3) or 57344 (E5M2). Note on ``amax / fp8_max``: torch on CUDA divides a tensor by a Python
scalar as ``amax * fl32(1 / fp8_max)`` (``div_true_kernel_cuda``'s reciprocal shortcut), on CPU it divides; the
one kernel that computes scales itself (``quant_rows``) follows whichever the device does (``_scalar_div_mode``
checks it once per device). Every other kernel reduces amax on the device and the scale vector is then made by
the same torch expression as the eager code. Element division is IEEE (``tl.math.div_rn``; plain ``/`` may be
approximate on the GPU), the clamp propagates NaN (as torch's clamp does).

Kernels and their pure-torch references (``*_ref``: transcriptions of the eager code, the tests' oracle):

  quant_rows(t [M, K], dtype, src=None)         -> q [M', K] row-major, s [M'] (one launch: amax per row, cast);
        with ``src`` (int32 [M'], -1 = padding) output row i is input row src[i], or zeros with scale 1:
        the grouped path's padded operand written directly (no zero-fill / index_copy pass).
  quant_cols(t [R, C] | [B, R, C], dtype)       -> q [C, R] (| [B, C, R]) = the transposed, row-major result, and
        s [C] (| [B, C]): one scale per column over R, i.e. ``quant_rows(t.t())`` without reading t transposed.
        Two launches (column amax by ``tl.atomic_max`` on the int bits of non-negative fp32 -- order independent,
        deterministic -- then the cast with a transposed store).
  quant_tensor(t [R, C] | [B, R, C], dtype)     -> q (t's shape, contiguous), s 0-dim (| [B]): a tensor amax
        (same column-amax launch, then a max over C) and the cast.
  quant_rows_grouped_tensorwise(t, eid, src, E, dtype) -> padded q, per-buffer-row scale, per-expert scale
        (one scale per expert over its rows).
  quant_cols_grouped_t(t [M, C], eid, src, E, dtype, tensorwise) -> qt [C, rows] (the padded operand, transposed:
        column b holds input row src[b], zeros for padding), s [E, C]: per (expert, column) over the expert's rows.

Non-finite inputs: a reduction group holding inf or nan gets a NaN scale (its amax is recorded as +inf, which
``_scale`` maps to NaN exactly as the eager NaN / inf amax), and its elements quantise like the eager path's
``x / NaN`` (fp8 NaN 0x7F, the sign of a NaN input kept on CPU).

Casts: on the GPU the hardware cvt (RTNE, satfinite; values are clamped first). Under the interpreter
(``EXACT_CAST``) the fp8 bit pattern is computed with integer ops and stored through a uint8 view (the
interpreter's own fp32 -> fp8 conversion rounds wrongly). Both modes are bit-identical to torch's cast.

This module never imports moetrain.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import interpreting, new_empty, next_pow2

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
DTYPES = (E4M3, E5M2)
AMAX_EPS = 1e-12

__all__ = [
    "INTERPRETED", "EXACT_CAST", "CFG",
    "quant_rows", "quant_cols", "quant_tensor", "quant_rows_grouped_tensorwise", "quant_cols_grouped_t",
    "quant_rows_ref", "quant_cols_ref", "quant_tensor_ref", "quant_rows_grouped_tensorwise_ref",
    "quant_cols_grouped_t_ref", "scale_ref", "cast_ref",
]


# ----------------------------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _fp8_code(v, OUT_E5M2: tl.constexpr):
    """fp32 ``v`` (already clamped to +-fp8_max, may be NaN) -> the fp8 bit pattern (int32 in [0, 255]), RTNE,
    the same as torch's (c10) float -> float8 conversion, NaN -> 0x7F | sign."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    abits = bits & 0x7FFFFFFF
    av = abits.to(tl.float32, bitcast=True)
    if OUT_E5M2:
        lsb = (abits >> 21) & 1
        normal = ((abits + 0xFFFFF + lsb) >> 21) - (112 << 2)        # rebias 127 -> 15, 2 mantissa bits
        is_sub = av < 6.103515625e-05                                 # < 2^-14: subnormal
        a_sub = tl.where(is_sub, av, 0.0)
        sub = ((a_sub + 192.0) - 192.0) * 65536.0                     # multiples of 2^-16, RTNE by fp32 add
        code = tl.where(is_sub, sub.to(tl.int32), normal)
    else:
        lsb = (abits >> 20) & 1
        normal = ((abits + 0x7FFFF + lsb) >> 20) - (120 << 3)         # rebias 127 -> 7, 3 mantissa bits
        is_sub = av < 0.015625                                        # < 2^-6: subnormal
        a_sub = tl.where(is_sub, av, 0.0)
        sub = ((a_sub + 24576.0) - 24576.0) * 512.0                   # multiples of 2^-9, RTNE by fp32 add
        code = tl.where(is_sub, sub.to(tl.int32), normal)
    code = tl.where(av != av, 0x7F, code)
    return code | sign


@triton.jit
def _quantise(x, s, fp8_max, OUT_E5M2: tl.constexpr, EXACT_CAST: tl.constexpr):
    """(x / s).clamp(-fp8_max, fp8_max) cast to fp8 (EXACT_CAST: as uint8 bit patterns)."""
    v = tl.math.div_rn(x, s)
    v = tl.minimum(tl.maximum(v, -fp8_max, propagate_nan=tl.PropagateNan.ALL), fp8_max,
                   propagate_nan=tl.PropagateNan.ALL)
    if EXACT_CAST:
        return _fp8_code(v, OUT_E5M2).to(tl.uint8)
    elif OUT_E5M2:
        return v.to(tl.float8e5)
    else:
        return v.to(tl.float8e4nv)


@triton.jit
def _bad(ax):
    """1 where |x| is inf or nan."""
    return ((ax != ax) | (ax == float("inf"))).to(tl.int32)


@triton.jit
def _rows_kernel(x_ptr, q_ptr, s_ptr, src_ptr, n_out, K, stride_xm, stride_xk, stride_qm,
                 fp8_max, inv_max,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE: tl.constexpr, HAS_SRC: tl.constexpr,
                 RECIP: tl.constexpr, OUT_E5M2: tl.constexpr, EXACT_CAST: tl.constexpr):
    # BLOCK_M output rows per program: amax over K (in registers when SINGLE, else a loop), scale, cast.
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_out
    if HAS_SRC:
        src = tl.load(src_ptr + rows, mask=rmask, other=-1)
        valid = src >= 0
        src = tl.maximum(src, 0)
    else:
        src = rows
        valid = rmask
    xrow = x_ptr + src.to(tl.int64)[:, None] * stride_xm
    qrow = q_ptr + rows.to(tl.int64)[:, None] * stride_qm
    cols = tl.arange(0, BLOCK_K)
    if SINGLE:
        m = valid[:, None] & (cols < K)[None, :]
        x = tl.load(xrow + cols[None, :] * stride_xk, mask=m, other=0.0).to(tl.float32)
        ax = tl.abs(x)
        amax = tl.max(ax, axis=1)
        bad = tl.max(_bad(ax), axis=1)
    else:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        bad = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + cols
            m = valid[:, None] & (kk < K)[None, :]
            x = tl.load(xrow + kk[None, :] * stride_xk, mask=m, other=0.0).to(tl.float32)
            ax = tl.abs(x)
            amax = tl.maximum(amax, tl.max(ax, axis=1))
            bad = tl.maximum(bad, tl.max(_bad(ax), axis=1))
    # the eager _scale: clamp_min(eps) / fp8_max (torch on CUDA: * fl32(1 / fp8_max)), 1 for 0, NaN for inf/nan
    c = tl.maximum(amax, 1e-12)
    if RECIP:
        s = c * inv_max
    else:
        s = tl.math.div_rn(c, fp8_max)
    s = tl.where(amax > 0.0, s, 1.0)
    s = tl.where(bad > 0, float("nan"), s)
    s = tl.where(valid, s, 1.0)
    tl.store(s_ptr + rows, s, mask=rmask)
    if SINGLE:
        q = _quantise(x, s[:, None], fp8_max, OUT_E5M2, EXACT_CAST)
        tl.store(qrow + cols[None, :], q, mask=rmask[:, None] & (cols < K)[None, :])
    else:
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + cols
            m = valid[:, None] & (kk < K)[None, :]
            x = tl.load(xrow + kk[None, :] * stride_xk, mask=m, other=0.0).to(tl.float32)
            q = _quantise(x, s[:, None], fp8_max, OUT_E5M2, EXACT_CAST)
            tl.store(qrow + kk[None, :], q, mask=rmask[:, None] & (kk < K)[None, :])


@triton.jit
def _tile(R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # this program's [BLOCK_R, BLOCK_C] tile of an [R, C] matrix (grid: row blocks, column blocks, batch):
    # (batch index int64, rows, cols, row mask, column mask)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return tl.program_id(2).to(tl.int64), rows, cols, rows < R, cols < C


@triton.jit
def _col_amax_kernel(x_ptr, amax_ptr, eid_ptr, R, C, stride_xb, stride_xr, stride_xc, stride_ab,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUPED: tl.constexpr):
    # column amax of a [BLOCK_R, BLOCK_C] tile, combined over row blocks by atomic max on the int32 bits of the
    # non-negative fp32 amax (inf for a column holding inf/nan). GROUPED: rows belong to group eid[row] (sorted),
    # one atomic per group present in the tile; else one per batch entry (program_id 2).
    pid_b, rows, cols, rmask, cmask = _tile(R, C, BLOCK_R, BLOCK_C)
    m = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + pid_b * stride_xb + rows.to(tl.int64)[:, None] * stride_xr + cols[None, :] * stride_xc,
                mask=m, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    ax = tl.where(_bad(ax) > 0, float("inf"), ax)
    bits = ax.to(tl.int32, bitcast=True)
    if GROUPED:
        e = tl.load(eid_ptr + rows, mask=rmask, other=0)
        e_lo = tl.min(tl.where(rmask, e, 2147483647), axis=0)
        e_hi = tl.max(tl.where(rmask, e, -1), axis=0)
        for g in range(e_lo, e_hi + 1):
            cm = tl.max(tl.where(m & (e == g)[:, None], bits, 0), axis=0)
            tl.atomic_max(amax_ptr + g * stride_ab + cols, cm, mask=cmask)
    else:
        cm = tl.max(tl.where(m, bits, 0), axis=0)
        tl.atomic_max(amax_ptr + pid_b * stride_ab + cols, cm, mask=cmask)


@triton.jit
def _cast_kernel(x_ptr, q_ptr, s_ptr, src_ptr, eid_ptr, R_out, C,
                 stride_xb, stride_xr, stride_xc, stride_qb, stride_qr, stride_qc, stride_sb, stride_sr, stride_sc,
                 fp8_max,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SRC: tl.constexpr, GROUP_SCALE: tl.constexpr,
                 TRANS: tl.constexpr, OUT_E5M2: tl.constexpr, EXACT_CAST: tl.constexpr):
    # q[b, r, c] (TRANS: stored at q[b, c, r]) = quantise(x[b, src[r], c], s[b, g, c]) with g = eid[src[r]]
    # (GROUP_SCALE) or src[r]; the scale strides broadcast (0) what a recipe does not vary. Padding rows
    # (src = -1) are zeros.
    pid_b, rows, cols, rmask, cmask = _tile(R_out, C, BLOCK_R, BLOCK_C)
    if HAS_SRC:
        src = tl.load(src_ptr + rows, mask=rmask, other=-1)
        valid = src >= 0
        src = tl.maximum(src, 0)
    else:
        src = rows
        valid = rmask
    m = valid[:, None] & cmask[None, :]
    x = tl.load(x_ptr + pid_b * stride_xb + src.to(tl.int64)[:, None] * stride_xr + cols[None, :] * stride_xc,
                mask=m, other=0.0).to(tl.float32)
    if GROUP_SCALE:
        g = tl.load(eid_ptr + src, mask=valid, other=0)
    else:
        g = src
    s = tl.load(s_ptr + pid_b * stride_sb + g.to(tl.int64)[:, None] * stride_sr + cols[None, :] * stride_sc,
                mask=m, other=1.0)
    q = _quantise(x, s, fp8_max, OUT_E5M2, EXACT_CAST)
    qb = q_ptr + pid_b * stride_qb
    if TRANS:
        tl.store(qb + cols.to(tl.int64)[:, None] * stride_qc + rows[None, :] * stride_qr, tl.trans(q),
                 mask=cmask[:, None] & rmask[None, :])
    else:
        tl.store(qb + rows.to(tl.int64)[:, None] * stride_qr + cols[None, :] * stride_qc, q,
                 mask=rmask[:, None] & cmask[None, :])


INTERPRETED: bool = type(_rows_kernel).__name__ == "InterpretedFunction" or interpreting()
"""True when this module's kernels run in the Triton interpreter (TRITON_INTERPRET=1 at import)."""

#: Cast mode: exact integer bit patterns (required under the interpreter; valid on the GPU too) or the hardware cvt.
EXACT_CAST: bool = INTERPRETED

#: GPU launch tunables. rows kernel: a whole row in registers up to ``single_k`` columns, else ``loop_k``-wide
#: blocks (two passes over the row, the second from L1/L2); tile kernels: [block_r, block_c] tiles.
CFG = {"single_k": 16384, "loop_k": 4096, "row_elems": 4096, "block_r": 64, "block_c": 64, "warps_tile": 4}


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------
def _fp8_max(dtype: torch.dtype) -> float:
    if dtype not in DTYPES:
        raise TypeError(f"fp8_rowwise: output dtype must be float8_e4m3fn or float8_e5m2, got {dtype}")
    return float(torch.finfo(dtype).max)


def _check(t: torch.Tensor, name: str, ndims=(2,)) -> None:
    if t.dim() not in ndims:
        raise ValueError(f"{name}: expected a {' or '.join(map(str, ndims))}-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: expected float32/bfloat16/float16, got {t.dtype}")
    if not t.is_cuda and not INTERPRETED:
        raise RuntimeError(f"{name}: Triton kernels need a CUDA tensor (got {t.device}); set TRITON_INTERPRET=1 "
                           "before importing kernels to run them on CPU, or use the *_ref functions")


_DIV_MODE: dict = {}


def _scalar_div_mode(device: torch.device, fp8_max: float) -> bool:
    """True when torch computes ``tensor / python_float`` on ``device`` as a multiplication by the fp32
    reciprocal (CUDA's div_true_kernel), False for a true division (CPU). Checked once per (device, fp8_max) on
    values where the two differ; raises if torch does neither (the in-kernel scale could not match)."""
    key = (device.type, device.index, fp8_max)
    if key not in _DIV_MODE:
        g = torch.Generator().manual_seed(0)
        v = torch.rand(4096, generator=g) * 1000.0 + 1e-3
        inv = torch.tensor(1.0 / fp8_max, dtype=torch.float32)
        got = (v.to(device) / fp8_max).cpu()
        recip, div = v * inv, torch.div(v, torch.tensor(fp8_max, dtype=torch.float32))
        if torch.equal(got, div) and not torch.equal(got, recip):
            _DIV_MODE[key] = False
        elif torch.equal(got, recip):
            _DIV_MODE[key] = True
        else:  # pragma: no cover - a torch that rounds some other way
            raise RuntimeError(f"fp8_rowwise: torch's tensor / scalar on {device} is neither a division nor a "
                               "multiplication by the reciprocal; use the eager quantisation")
    return _DIV_MODE[key]


def _q_out(shape, dtype, device):
    q = new_empty(shape, dtype, device)
    return q, (q.view(torch.uint8) if EXACT_CAST else q)


def quant_rows(t: torch.Tensor, dtype: torch.dtype = E4M3, src: torch.Tensor | None = None):
    """One scale per row (amax over K), one launch. t [M, K] (unit stride along K preferred; any strides work).

    Returns (q [M', K] ``dtype`` contiguous, s [M'] fp32) with M' = M, or with ``src`` (int32 [M'], values in
    [-1, M)): output row i is input row src[i] (scale and values), or zeros with scale 1 where src[i] = -1."""
    _check(t, "quant_rows")
    fp8_max = _fp8_max(dtype)
    M, K = t.shape
    n_out = M if src is None else src.numel()
    q, qk = _q_out((n_out, K), dtype, t.device)
    s = new_empty((n_out,), torch.float32, t.device)
    if n_out == 0:
        return q, s
    if K == 0 or M == 0:
        # nothing to read (an empty input may have no storage): amax 0 -> scale 1, no elements / zero padding
        q.view(torch.uint8).zero_()
        s.fill_(1.0)
        return q, s
    recip = _scalar_div_mode(t.device, fp8_max)
    kp = next_pow2(K)
    single = kp <= CFG["single_k"]
    block_k = kp if single else CFG["loop_k"]
    block_m = max(1, min(64, CFG["row_elems"] // block_k))
    if INTERPRETED:
        block_m = max(1, min(128, 65536 // block_k))
    warps = 4 if block_m * block_k <= 4096 else 8 if block_m * block_k <= 8192 else 16
    _rows_kernel[(triton.cdiv(n_out, block_m),)](
        t, qk, s, src if src is not None else s, n_out, K, t.stride(0), t.stride(1), q.stride(0),
        fp8_max, float(torch.tensor(1.0 / fp8_max, dtype=torch.float32)),
        BLOCK_M=block_m, BLOCK_K=block_k, SINGLE=single, HAS_SRC=src is not None, RECIP=recip,
        OUT_E5M2=dtype == E5M2, EXACT_CAST=EXACT_CAST, num_warps=warps)
    return q, s


def _tiles():
    if INTERPRETED:
        return 128, 128, 4
    return CFG["block_r"], CFG["block_c"], CFG["warps_tile"]


def _col_amax(t3: torch.Tensor, eid: torch.Tensor | None = None, n_groups: int = 0) -> torch.Tensor:
    """Column amax of t3 [B, R, C] -> [B, C] fp32 (or grouped by eid [R] sorted -> [n_groups, C]); +inf marks a
    column (group) holding inf / nan."""
    B, R, C = t3.shape
    G = n_groups if eid is not None else B
    bits = torch.zeros((G, C), dtype=torch.int32, device=t3.device)
    if R and C and B:
        br, bc, w = _tiles()
        _col_amax_kernel[(triton.cdiv(R, br), triton.cdiv(C, bc), 1 if eid is not None else B)](
            t3, bits, eid if eid is not None else bits, R, C, t3.stride(0), t3.stride(1), t3.stride(2),
            bits.stride(0), BLOCK_R=br, BLOCK_C=bc, GROUPED=eid is not None, num_warps=w)
    return bits.view(torch.float32)


def _cast(t3, q, qk, s, s_strides, dtype, trans, src=None, eid=None):
    """Launch the cast kernel: t3 [B, R, C] -> q (strides of qk give its layout; TRANS stores [.., C, R])."""
    B, R, C = t3.shape
    R_out = R if src is None else src.numel()
    if not (B and R_out and C):
        return
    br, bc, w = _tiles()
    if trans:
        qs = (qk.stride(0), qk.stride(2), qk.stride(1))  # q [B, C, R_out]: r stride, c stride
    else:
        qs = (qk.stride(0), qk.stride(1), qk.stride(2))
    dummy = s
    _cast_kernel[(triton.cdiv(R_out, br), triton.cdiv(C, bc), B)](
        t3, qk, s, src if src is not None else dummy, eid if eid is not None else dummy, R_out, C,
        t3.stride(0), t3.stride(1), t3.stride(2), *qs, *s_strides, _fp8_max(dtype),
        BLOCK_R=br, BLOCK_C=bc, HAS_SRC=src is not None, GROUP_SCALE=eid is not None, TRANS=trans,
        OUT_E5M2=dtype == E5M2, EXACT_CAST=EXACT_CAST, num_warps=w)


def quant_cols(t: torch.Tensor, dtype: torch.dtype = E4M3):
    """One scale per column (amax over rows), the result stored transposed: t [R, C] -> (q [C, R] contiguous,
    s [C]); batched t [B, R, C] -> (q [B, C, R], s [B, C]). Equals ``quant_rows(t.t())`` (per batch entry).
    Two launches (column amax, cast) plus the scale expression on the [.., C] amax."""
    _check(t, "quant_cols", (2, 3))
    fp8_max = _fp8_max(dtype)
    t3 = t if t.dim() == 3 else t.unsqueeze(0)
    B, R, C = t3.shape
    amax = _col_amax(t3)                                        # [B, C]
    s = scale_ref(amax, fp8_max)
    q, qk = _q_out((B, C, R), dtype, t.device)
    _cast(t3, q, qk, s, (s.stride(0), 0, s.stride(1)), dtype, trans=True)
    if t.dim() == 2:
        return q[0], s[0]
    return q, s


def quant_tensor(t: torch.Tensor, dtype: torch.dtype = E4M3):
    """One scale per tensor: t [R, C] -> (q [R, C] contiguous, s 0-dim fp32); t [B, R, C] -> (q, s [B]) with one
    scale per batch entry (expert)."""
    _check(t, "quant_tensor", (2, 3))
    fp8_max = _fp8_max(dtype)
    t3 = t if t.dim() == 3 else t.unsqueeze(0)
    B, R, C = t3.shape
    if R * C == 0:
        amax = torch.zeros((B,), dtype=torch.float32, device=t.device)
    else:
        amax = _col_amax(t3).amax(dim=1)                        # [B]
    s = scale_ref(amax, fp8_max)
    q, qk = _q_out((B, R, C), dtype, t.device)
    _cast(t3, q, qk, s, (s.stride(0), 0, 0), dtype, trans=False)
    if t.dim() == 2:
        return q[0], s[0]
    return q, s


def quant_rows_grouped_tensorwise(t: torch.Tensor, eid: torch.Tensor, src: torch.Tensor, n_groups: int,
                                  dtype: torch.dtype = E4M3):
    """Rows sorted by group (``eid`` [M] int, non-decreasing), one scale per group over its rows, written into the
    padded layout ``src`` (int32 [rows], -1 = padding: ``GroupPlan.src`` of ``moetrain.precision.fp8_grouped``).
    Returns (q [rows, C], s_rows [rows] (the row's group scale, 1 for padding), s_group [n_groups] (1 for groups
    without rows))."""
    _check(t, "quant_rows_grouped_tensorwise")
    fp8_max = _fp8_max(dtype)
    M, C = t.shape
    eid32 = eid.to(torch.int32)
    if M and C:
        amax = _col_amax(t.unsqueeze(0), eid32, n_groups).amax(dim=1)
    else:
        amax = torch.zeros((n_groups,), dtype=torch.float32, device=t.device)
    s_group = scale_ref(amax, fp8_max)
    q, qk = _q_out((src.numel(), C), dtype, t.device)
    if M == 0:
        q.view(torch.uint8).zero_()
    else:
        _cast(t.unsqueeze(0), q.unsqueeze(0), qk.unsqueeze(0), s_group, (0, 1, 0), dtype, trans=False,
              src=src, eid=eid32)
    if M:
        s_rows = torch.where(src >= 0, s_group[eid32.long()[src.clamp_min(0).long()]], 1.0)
    else:
        s_rows = torch.ones((src.numel(),), dtype=torch.float32, device=t.device)
    return q, s_rows, s_group


def quant_cols_grouped_t(t: torch.Tensor, eid: torch.Tensor, src: torch.Tensor, n_groups: int,
                         dtype: torch.dtype = E4M3, tensorwise: bool = False):
    """Per (group, column) scales over the group's rows (``tensorwise``: one per group, repeated over C), the
    result written padded and transposed: qt [C, rows] with column b = input row src[b] (zeros for src = -1).
    Returns (qt, s [n_groups, C] contiguous)."""
    _check(t, "quant_cols_grouped_t")
    fp8_max = _fp8_max(dtype)
    M, C = t.shape
    eid32 = eid.to(torch.int32)
    if M and C:
        amax = _col_amax(t.unsqueeze(0), eid32, n_groups)       # [E, C]
    else:
        amax = torch.zeros((n_groups, C), dtype=torch.float32, device=t.device)
    if tensorwise:
        s = scale_ref(amax.amax(dim=1) if C else amax.new_zeros(n_groups), fp8_max)[:, None].expand(-1, C)
    else:
        s = scale_ref(amax, fp8_max)
    s = s.contiguous()
    q, qk = _q_out((1, C, src.numel()), dtype, t.device)
    if M == 0:
        q.view(torch.uint8).zero_()
    else:
        _cast(t.unsqueeze(0), q, qk, s, (0, s.stride(0), 1), dtype, trans=True, src=src, eid=eid32)
    return q[0], s


# ----------------------------------------------------------------------------------------------------------
# pure-torch references: the eager code of moetrain.precision.fp8 / fp8_grouped, verbatim in effect
# ----------------------------------------------------------------------------------------------------------
def scale_ref(amax: torch.Tensor, fp8_max: float) -> torch.Tensor:
    """``fp8._scale``: amax -> dequantisation scale (zero -> 1, tiny -> eps, non-finite -> NaN)."""
    amax = amax.float()
    s = torch.where(amax > 0, amax.clamp_min(AMAX_EPS) / fp8_max, torch.ones_like(amax))
    return torch.where(torch.isfinite(amax), s, torch.full_like(s, float("nan")))


def cast_ref(t: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``fp8._cast``."""
    m = torch.finfo(dtype).max
    return (t.float() / s).clamp(-m, m).to(dtype)


def quant_rows_ref(t: torch.Tensor, dtype: torch.dtype = E4M3, src: torch.Tensor | None = None):
    """``fp8._quant_rowwise`` (scales flattened to [M]); with ``src`` the rows are then placed as in
    ``fp8_grouped.pad_rows`` (zeros, scale 1 elsewhere)."""
    s = scale_ref(t.detach().abs().amax(dim=1), torch.finfo(dtype).max)
    q = cast_ref(t, s[:, None], dtype).contiguous()
    if src is None:
        return q, s
    return _place_rows(q, s, src)


def _place_rows(q, s, src):
    keep = src >= 0
    idx = src.clamp_min(0).long()
    qp = torch.where(keep[:, None], q.view(torch.uint8)[idx], torch.zeros((), dtype=torch.uint8, device=q.device))
    sp = torch.where(keep, s[idx], torch.ones((), dtype=s.dtype, device=s.device))
    return qp.view(q.dtype).contiguous(), sp


def quant_cols_ref(t: torch.Tensor, dtype: torch.dtype = E4M3):
    """``fp8._quant_rowwise(t.t())`` (per batch entry for 3-D t)."""
    if t.dim() == 3:
        outs = [quant_rows_ref(te.t(), dtype) for te in t]
        if not outs:
            return (torch.empty((0, t.shape[2], t.shape[1]), dtype=dtype, device=t.device),
                    torch.empty((0, t.shape[2]), device=t.device))
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])
    return quant_rows_ref(t.t(), dtype)


def quant_tensor_ref(t: torch.Tensor, dtype: torch.dtype = E4M3):
    """``fp8._quant_tensorwise`` (3-D: ``fp8_grouped._quant_weight`` tensorwise scale, one per batch entry)."""
    fp8_max = torch.finfo(dtype).max
    if t.dim() == 3:
        s = scale_ref(t.detach().abs().amax(dim=(1, 2)), fp8_max)
        return cast_ref(t, s[:, None, None], dtype).contiguous(), s
    s = scale_ref(t.detach().abs().amax(), fp8_max)
    return cast_ref(t, s, dtype), s


def _group_amax_ref(v, eid, n_groups):
    idx = eid if v.dim() == 1 else eid[:, None].expand_as(v)
    out = torch.zeros((n_groups, *v.shape[1:]), dtype=torch.float32, device=v.device)
    return out.scatter_reduce_(0, idx, v.float(), reduce="amax", include_self=True)


def quant_rows_grouped_tensorwise_ref(t, eid, src, n_groups, dtype=E4M3):
    """``fp8_grouped._quant_rows`` tensorwise, then ``pad_rows`` of values and scales."""
    amax = t.detach().abs().amax(dim=1).float()
    s_group = scale_ref(_group_amax_ref(amax, eid.long(), n_groups), torch.finfo(dtype).max)
    s = s_group[eid.long()]
    q = cast_ref(t, s[:, None], dtype)
    qp, sp = _place_rows(q, s, src)
    return qp, sp, s_group


def quant_cols_grouped_t_ref(t, eid, src, n_groups, dtype=E4M3, tensorwise=False):
    """``fp8_grouped._quant_cols_per_group``, then ``pad_rows`` and the fp8 transpose of ``_wgrad``."""
    fp8_max = torch.finfo(dtype).max
    a = t.detach().abs()
    eid = eid.long()
    if tensorwise:
        s = scale_ref(_group_amax_ref(a.amax(dim=1), eid, n_groups), fp8_max)[:, None].expand(-1, t.shape[1])
    else:
        s = scale_ref(_group_amax_ref(a, eid, n_groups), fp8_max)
    s = s.contiguous()
    q = cast_ref(t, s[eid], dtype)
    qp, _ = _place_rows(q, torch.ones(t.shape[0], device=t.device), src)
    return qp.view(torch.uint8).t().contiguous().view(dtype), s
