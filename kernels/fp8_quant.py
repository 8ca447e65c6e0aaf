"""Fine-grained FP8 (E4M3) quantisation: 1x128 activation tiles and 128x128 weight blocks.

Source: DeepSeek-V3 technical report, §3.3.1-3.3.2 ("fine-grained quantization"): activations are scaled
per token per 128 channels (1x128 tiles), weights per 128x128 block; every tile/block gets its own scale
computed online from its absolute maximum.

Scale convention (everywhere in moetrain)
----------------------------------------
``scale`` is the *dequantisation* multiplier, stored as float32::

    scale   = amax(|tile|) / 448                 (448 = largest finite float8_e4m3fn)
    x_fp8   = float8_e4m3fn(clamp(x / scale, -448, 448))     (round to nearest even)
    x      ~= x_fp8.float() * scale

so a tile whose largest magnitude is 896 gets scale 2.0 and its largest element quantises to 448 exactly.

Guards:
  * amax == 0 (all-zero tile, including the all-padding part of nothing): scale = 1.0, x_fp8 = 0.
  * 0 < amax < AMAX_EPS (1e-12): amax is clamped to AMAX_EPS so the scale never underflows.
  * a tile holding inf or nan: its scale is NaN ("flag" convention). No exception is raised inside the
    kernels (that would need a host sync); the NaN scale propagates through dequantisation and the FP8
    GEMMs into the output, where loss / debug checks catch it. Pass ``check_finite=True`` to raise
    ``FloatingPointError`` instead (synchronises with the device).

Partial tiles (M or K not multiples of 128) are supported: the amax is taken over the valid elements only.

Shapes / layouts (all outputs contiguous unless noted):
  quant_1x128(x[M, K])                -> x_fp8[M, K] e4m3, scales[M, ceil(K/128)] fp32
  quant_1x128_with_transpose(x[M, K]) -> x_fp8[M, K], scales[M, ceil(K/128)],
                                         xt_fp8[K, M] (1x128 quantisation of x^T, tiles run along M),
                                         xt_scales[K, ceil(M/128)]
  quant_128x128(w[N, K])              -> w_fp8[N, K] e4m3, scales[ceil(N/128), ceil(K/128)] fp32
                                         (also batched: w[E, N, K] -> scales[E, ceil(N/128), ceil(K/128)];
                                         with_transpose=True adds wt_fp8[..., K, N], the same bytes transposed)
  col_major_scales=True (the 1x128 quantisers): the same scales with strides (1, rows), cuBLAS's layout
  grouped (MoE, rows sorted by expert, no host sync):
  grouped_tiles(counts[E], M)         -> GroupedTiles: 128-row tiles that never straddle two experts
  quant_1x128_with_transpose_grouped(x[M, K], tiles)
                                      -> x_fp8[M, K], scales[M, ceil(K/128)], xt_fp8[K, n_tiles*128] (tile-padded,
                                         zeros past each tile's rows), xt_scales[K, n_tiles]; group_major=True:
                                         x's rows tile-padded too and each expert's operands one contiguous block
                                         (group_block), for one GEMM per expert without copies

Quantising the transpose of a 128x128-blocked matrix gives the transposed fp8 matrix and the transposed
scale grid exactly (amax over a block is transpose invariant), so W^T never needs requantising.

The Triton kernels run on CUDA tensors, or on CPU tensors when this module was imported with
``TRITON_INTERPRET=1`` (``INTERPRETED`` is then True). The interpreter converts fp32 -> fp8 with a broken
rounding (e.g. -124 -> -64 in triton 3.9), so in interpreter mode the kernels first round the fp32 value to the
E4M3 grid with exact integer arithmetic (constexpr ``EXACT_CAST``); on the GPU the hardware cvt (RTNE,
satfinite) is used. Results are then bit-identical to the ``*_ref`` functions in both modes (up to fp32 division
rounding on the GPU, where Triton may use an approximate fp32 divide: at most one fp8 ulp on rare elements).

This module never imports moetrain.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_EPS = 1e-12
TILE = 128

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "AMAX_EPS", "TILE", "INTERPRETED",
    "quant_1x128", "quant_1x128_with_transpose", "quant_128x128",
    "dequant_1x128", "dequant_128x128",
    "quant_1x128_ref", "quant_1x128_with_transpose_ref", "quant_128x128_ref",
    "scale_from_amax_ref", "cast_to_fp8_ref",
    "GroupedTiles", "grouped_tiles", "quant_1x128_with_transpose_grouped", "quant_1x128_with_transpose_grouped_ref",
    "group_block",
]


# ----------------------------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _abs_nan_as_inf(x):
    """|x| with NaN read as +inf (fp32), so that one max reduction gives both the amax and the non-finite flag."""
    return tl.where(x == x, tl.abs(x), float("inf"))


@triton.jit
def _scale_from_amax(amax):
    """amax of ``_abs_nan_as_inf`` values (>= 0, fp32) -> dequant scale; inf (the tile held inf or nan) -> NaN."""
    s = tl.maximum(amax, 1e-12) / 448.0
    s = tl.where(amax > 0.0, s, 1.0)
    return tl.where(amax == float("inf"), float("nan"), s)


@triton.jit
def _round_to_e4m3_grid(v):
    """Round fp32 ``v`` (|v| <= 448) to the nearest E4M3 value (ties to even) with exact fp32/int ops.

    Only used under the interpreter, whose own fp32 -> fp8 conversion rounds wrongly."""
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    rb = (bits + 0x7FFFF + lsb) & -1048576  # keep 3 mantissa bits, RTNE
    normal = rb.to(tl.float32, bitcast=True)
    av = tl.abs(v)
    sub = (av + 24576.0) - 24576.0  # multiples of 2^-9 (E4M3 subnormal spacing), RTNE by fp32 add
    sub = tl.where(v < 0.0, -sub, sub)
    return tl.where(av < 0.015625, sub, normal)


@triton.jit
def _to_e4m3(v, EXACT_CAST: tl.constexpr):
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    if EXACT_CAST:
        v = _round_to_e4m3_grid(v)
    return v.to(tl.float8e4nv)


@triton.jit
def _quant_1x128_kernel(x_ptr, q_ptr, s_ptr, M, K,
                        stride_xm, stride_xk, stride_qm, stride_sm, stride_sk,
                        BLOCK_M: tl.constexpr, EXACT_CAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * 128 + tl.arange(0, 128)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)
    s = _scale_from_amax(tl.max(_abs_nan_as_inf(x), axis=1))
    q = _to_e4m3(x / s[:, None], EXACT_CAST)
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q, mask=mask)
    tl.store(s_ptr + offs_m * stride_sm + pid_k * stride_sk, s, mask=offs_m < M)


@triton.jit
def _quant_tile_t(x_ptr, row0, n_rows, pid_k, K, stride_xm, stride_xk,
                  q_ptr, qrow0, stride_qm, s_ptr, stride_sm, stride_sk, Q_PAD: tl.constexpr,
                  qt_ptr, stride_qtk, st_ptr, stride_stk, QT_PAD: tl.constexpr,
                  CH: tl.constexpr, EXACT_CAST: tl.constexpr):
    """1x128 quantisation of one tile of x (rows row0 .. row0 + n_rows, n_rows <= 128; columns pid_k * 128 .. +128)
    along its rows and along its columns, in two passes of CH rows / CH columns at a time:

    pass 1 (CH rows): the rows' 1x128 quantisation -> q rows qrow0 + r, scales at s[qrow0 + r, pid_k], and the
      running column amax; then the column scales -> st_ptr[k * stride_stk] (k: the tile's columns);
    pass 2 (CH columns): the tile re-read transposed (from L1 / L2), divided by the column scales read back ->
      qt_ptr[k * stride_qtk + r], r the tile's row.
    ``Q_PAD`` / ``QT_PAD``: also store rows / columns r >= n_rows (zeros, scale 1), for the tile-padded layouts.
    The transposition happens on the 16-bit input (a layout conversion that Triton does with ldmatrix.trans), not on
    fp8 bytes: the former one-pass kernel transposed its fp8 tile in registers (tl.trans), which Triton did through
    shared memory one byte per load (128 ld.shared.b8 per thread, sm_90 PTX) at 249-255 registers (4 warps).
    H200 (x [16384, 7168] bf16): 198 us at CH = 128 and 8 warps (59% of a bf16 copy's bandwidth) vs 235-284 us for
    the one-pass kernel; narrower passes (CH = 16-64) use fewer registers but serialise their loads and ran slower."""
    offs_r = tl.arange(0, 128)
    offs_k = pid_k * 128 + offs_r
    mask_k = offs_k < K
    valid_r = offs_r < n_rows
    keep_r = (offs_r < 128) if QT_PAD else valid_r
    offs_c = tl.arange(0, CH)
    colmax = tl.zeros([128], dtype=tl.float32)
    for c in tl.range(0, 128 // CH):
        r = c * CH + offs_c
        valid = r < n_rows
        x = tl.load(x_ptr + (row0 + r)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=valid[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        ax = _abs_nan_as_inf(x)
        sc = _scale_from_amax(tl.max(ax, axis=1))
        keep = (r < 128) if Q_PAD else valid
        tl.store(q_ptr + (qrow0 + r)[:, None] * stride_qm + offs_k[None, :], _to_e4m3(x / sc[:, None], EXACT_CAST),
                 mask=keep[:, None] & mask_k[None, :])
        tl.store(s_ptr + (qrow0 + r) * stride_sm + pid_k * stride_sk, sc, mask=keep)
        colmax = tl.maximum(colmax, tl.max(ax, axis=0))
    tl.store(st_ptr + offs_k * stride_stk, _scale_from_amax(colmax), mask=mask_k)
    tl.debug_barrier()          # the column scales, written by other threads of this program, are read back below
    for c in tl.range(0, 128 // CH):
        kk = pid_k * 128 + c * CH + offs_c
        mkc = kk < K
        stc = tl.load(st_ptr + kk * stride_stk, mask=mkc, other=1.0)
        xt = tl.load(x_ptr + (row0 + offs_r)[None, :] * stride_xm + kk[:, None] * stride_xk,
                     mask=mkc[:, None] & valid_r[None, :], other=0.0).to(tl.float32)
        tl.store(qt_ptr + kk[:, None] * stride_qtk + offs_r[None, :], _to_e4m3(xt / stc[:, None], EXACT_CAST),
                 mask=mkc[:, None] & keep_r[None, :])


@triton.jit
def _k_and_row_tile(K_FASTEST: tl.constexpr):
    """(column tile, row tile) of this program: grid (k tiles, row tiles) when K_FASTEST, else the reverse."""
    if K_FASTEST:
        return tl.program_id(0), tl.program_id(1)
    else:
        return tl.program_id(1), tl.program_id(0)


@triton.jit
def _quant_1x128_t_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, K,
                          stride_xm, stride_xk, stride_qm, stride_sm, stride_sk, stride_qtk, stride_stk, stride_stm,
                          EXACT_CAST: tl.constexpr, K_FASTEST: tl.constexpr, CH: tl.constexpr):
    # one 128x128 tile of x per program: row amax -> 1x128 scales of x, column amax -> 1x128 scales of x^T.
    # K_FASTEST: grid (k tiles, m tiles), so consecutive programs read neighbouring column tiles of the same rows
    pid_k, pid_m = _k_and_row_tile(K_FASTEST)
    m0 = pid_m * 128
    _quant_tile_t(x_ptr, m0, tl.minimum(M - m0, 128), pid_k, K, stride_xm, stride_xk,
                  q_ptr, m0, stride_qm, s_ptr, stride_sm, stride_sk, False,
                  qt_ptr + m0, stride_qtk, st_ptr + pid_m * stride_stm, stride_stk, False, CH, EXACT_CAST)


@triton.jit
def _quant_128x128_kernel(w_ptr, q_ptr, s_ptr, qt_ptr, N, K,
                          stride_wb, stride_wn, stride_wk, stride_qb, stride_qn, stride_sb, stride_sn,
                          stride_qtb, stride_qtk,
                          EXACT_CAST: tl.constexpr, WRITE_T: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * 128 + tl.arange(0, 128)
    offs_k = pid_k * 128 + tl.arange(0, 128)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = tl.load(w_ptr + pid_b * stride_wb + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                mask=mask, other=0.0)
    w = w.to(tl.float32)
    s = _scale_from_amax(tl.max(tl.max(_abs_nan_as_inf(w), axis=1), axis=0))
    q = _to_e4m3(w / s, EXACT_CAST)
    tl.store(q_ptr + pid_b * stride_qb + offs_n[:, None] * stride_qn + offs_k[None, :], q, mask=mask)
    if WRITE_T:
        # W^T's 128x128 quantisation is these bytes transposed (block amax is transpose invariant). The tile is read
        # again transposed (from L2) and cast, not transposed in registers: tl.trans of this kernel's tile stored
        # wrong bytes for fp32 weights on an H200 with triton 3.6 (37% of them; bf16 was right; 2026-12-01)
        wt = tl.load(w_ptr + pid_b * stride_wb + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                     mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0).to(tl.float32)
        tl.store(qt_ptr + pid_b * stride_qtb + offs_k[:, None] * stride_qtk + offs_n[None, :],
                 _to_e4m3(wt / s, EXACT_CAST), mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))
    tl.store(s_ptr + pid_b * stride_sb + pid_n * stride_sn + pid_k, s)


INTERPRETED: bool = type(_quant_1x128_kernel).__name__ == "InterpretedFunction"
"""True when this module's kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""

#: GPU launch tunables (``benchmarks/bench_fp8.py --sweep-quant`` times the candidates): rows per program and warps
#: of the 1x128 kernel, warps and grid order (``k_fastest``: column tiles of the same rows on consecutive programs)
#: of the with-transpose kernels (128x128 tile; ``_t`` dense, ``_tg`` grouped) and warps of the 128x128 weight kernel.
#: H200 (2026-11-30, x [4096, 2048], W [7168, 2048]): 1x128 32 rows / 2 warps 12.4 us (16 / 4: 13.0), with-transpose
#: 4 warps 25.6 us (8: 32.5), 128x128 8 warps 19.2 us (4: 20.8). H200 (2026-12-01, ninth session, x [16384, 7168];
#: grouped x [131072, 7168] over 16 experts): with-transpose k_fastest 235.0 us vs 242.4 (4 warps; 8: 340.8, 16: 439.2),
#: grouped 1770 us vs 1814 (4 warps; 8: 2681): about half of a bf16 copy's bandwidth either way. Tenth session (the
#: two-pass with-transpose tile, ``ch``: rows / columns per pass): dense 198 us at 8 warps, ch 128 (59% of a copy;
#: 4 warps 224, ch 64 at 2 warps 228), grouped 1439 us at 4 warps, ch 128 (65%; 8 warps 1478).
#: ``MOETRAIN_FP8_QUANT_CFG="warps_tg=8,k_fastest_tg=1"`` (read at import) overrides entries, for sweeps in a training run.
CFG = {"block_m": 32, "warps_1x128": 2, "warps_t": 8, "k_fastest_t": 1, "ch_t": 128, "warps_tg": 4, "k_fastest_tg": 1,
       "ch_tg": 128, "warps_128": 8}


def _chunk(ch: int) -> int:
    """A with-transpose kernel's pass width CH (``ch_t`` / ``ch_tg``): a power of two from 16 to 128."""
    if ch not in (16, 32, 64, 128):
        raise ValueError(f"kernels.fp8_quant.CFG: chunk {ch} must be 16, 32, 64 or 128")
    return ch


def _cfg_from_env(text: str) -> dict:
    """``"key=int,key=int"`` -> {key: int} for keys of CFG; ValueError naming the bad entry otherwise."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, val = item.partition("=")
        if key not in CFG or not val.strip().lstrip("-").isdigit():
            raise ValueError(f"MOETRAIN_FP8_QUANT_CFG: bad entry {item!r}; expected KEY=INT with KEY one of "
                             f"{', '.join(CFG)}")
        out[key] = int(val)
    return out


CFG.update(_cfg_from_env(os.environ.get("MOETRAIN_FP8_QUANT_CFG", "")))


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------
def _check_input(x: torch.Tensor, name: str, ndims: tuple[int, ...] = (2,)) -> None:
    if x.dim() not in ndims:
        raise ValueError(f"{name}: expected a {' or '.join(map(str, ndims))}-D tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: expected float32/bfloat16/float16, got {x.dtype}")
    if not x.is_cuda and not INTERPRETED:
        raise RuntimeError(
            f"{name}: Triton kernels need a CUDA tensor (got {x.device}); set TRITON_INTERPRET=1 before "
            "importing kernels.fp8_quant to run them on CPU, or use the *_ref functions")


def _check_scales_finite(name: str, *scales: torch.Tensor) -> None:
    for s in scales:
        if not bool(torch.isfinite(s).all()):
            raise FloatingPointError(f"{name}: input holds inf/nan (non-finite FP8 scale)")


def _scales(rows: int, cols: int, device, col_major: bool) -> torch.Tensor:
    """An empty fp32 [rows, cols] scale tensor, row-major or with strides (1, rows) (``col_major``)."""
    if col_major:
        return torch.empty((cols, rows), dtype=torch.float32, device=device).t()
    return torch.empty((rows, cols), dtype=torch.float32, device=device)


def quant_1x128(x: torch.Tensor, check_finite: bool = False,
                col_major_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 (per row, per 128 columns) E4M3 quantisation.

    x: [M, K] float32/bfloat16/float16 (any strides). Returns (x_fp8 [M, K] float8_e4m3fn contiguous,
    scales [M, ceil(K/128)] float32) with x ~= x_fp8 * scales.repeat_interleave(128, 1)[:, :K].
    ``col_major_scales``: the scales with strides (1, M) (the layout cuBLAS's block-scaled GEMMs read; same
    values). See the module docstring for the scale convention and the zero / inf / nan guards.
    """
    _check_input(x, "quant_1x128")
    M, K = x.shape
    kt = triton.cdiv(K, TILE)
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
    s = _scales(M, kt, x.device, col_major_scales)
    if M and K:
        block_m = 128 if INTERPRETED else CFG["block_m"]
        grid = (triton.cdiv(M, block_m), kt)
        _quant_1x128_kernel[grid](x, q, s, M, K, x.stride(0), x.stride(1), q.stride(0), s.stride(0), s.stride(1),
                                  BLOCK_M=block_m, EXACT_CAST=INTERPRETED, num_warps=CFG["warps_1x128"])
    if check_finite:
        _check_scales_finite("quant_1x128", s)
    return q, s


def quant_1x128_with_transpose(x: torch.Tensor, check_finite: bool = False, col_major_scales: bool = False):
    """1x128 quantisation of x and of x^T, one 128x128 tile per program (x read from HBM once; the tile's
    transposed re-read hits L1 / L2).

    x: [M, K] float32/bfloat16/float16. Returns (x_fp8 [M, K], scales [M, ceil(K/128)],
    xt_fp8 [K, M], xt_scales [K, ceil(M/128)]), fp8 tensors contiguous, scales row-major (or both with strides
    (1, rows) when ``col_major_scales``); (xt_fp8, xt_scales) equals ``quant_1x128(x.t())``. Used for backward:
    the dgrad GEMM reduces along K (tiles of x), the wgrad GEMM along M (tiles of x^T), DeepSeek-V3 §3.3.
    """
    _check_input(x, "quant_1x128_with_transpose")
    M, K = x.shape
    mt, kt = triton.cdiv(M, TILE), triton.cdiv(K, TILE)
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
    s = _scales(M, kt, x.device, col_major_scales)
    qt = torch.empty((K, M), dtype=FP8_DTYPE, device=x.device)
    st = _scales(K, mt, x.device, col_major_scales)
    if M and K:
        kf = bool(CFG["k_fastest_t"]) and mt <= 65535      # grid dims past the first hold at most 65535
        _quant_1x128_t_kernel[(kt, mt) if kf else (mt, kt)](
            x, q, s, qt, st, M, K, x.stride(0), x.stride(1), q.stride(0), s.stride(0), s.stride(1), qt.stride(0),
            st.stride(0), st.stride(1), EXACT_CAST=INTERPRETED, K_FASTEST=kf, CH=_chunk(CFG["ch_t"]),
            num_warps=CFG["warps_t"])
    if check_finite:
        _check_scales_finite("quant_1x128_with_transpose", s, st)
    return q, s, qt, st


def quant_128x128(w: torch.Tensor, check_finite: bool = False, with_transpose: bool = False, out=None):
    """128x128 block E4M3 quantisation (weights).

    w: [N, K] (or a batch [E, N, K], e.g. expert weights) float32/bfloat16/float16. Returns (w_fp8 [..., N, K]
    float8_e4m3fn contiguous, scales [..., ceil(N/128), ceil(K/128)] float32); partial edge blocks use the amax
    of their valid part; blocks never straddle two batch entries. ``with_transpose``: a third output, wt_fp8
    [..., K, N] contiguous, the same bytes transposed (the kernel re-reads each tile transposed, from L2). It is
    W^T's 128x128 quantisation, whose scales are ``scales.transpose(-1, -2)``: the operand of the dgrad GEMM
    ``dX = G W``.
    ``out``: the outputs to write instead, ``(w_fp8, scales)`` or with ``with_transpose`` ``(w_fp8, scales,
    wt_fp8)``, of those shapes with unit stride in the last dim (e.g. views into a larger buffer holding several
    weights side by side); returned as given. Raises ValueError for a wrong shape, dtype or last-dim stride.
    """
    _check_input(w, "quant_128x128", (2, 3))
    wb = w if w.dim() == 3 else w.unsqueeze(0)
    E, N, K = wb.shape
    nt, kt = triton.cdiv(N, TILE), triton.cdiv(K, TILE)
    if out is None:
        q = torch.empty((E, N, K), dtype=FP8_DTYPE, device=w.device)
        s = torch.empty((E, nt, kt), dtype=torch.float32, device=w.device)
        qt = torch.empty((E, K, N) if with_transpose else (1, 1, 1), dtype=FP8_DTYPE, device=w.device)
    else:
        want = [((N, K), FP8_DTYPE), ((nt, kt), torch.float32)] + ([((K, N), FP8_DTYPE)] if with_transpose else [])
        if len(out) != len(want) or any(tuple(o.shape[-2:]) != sh or o.dtype != dt or o.dim() != w.dim()
                                        or (o.numel() and o.stride(-1) != 1) for o, (sh, dt) in zip(out, want)):
            raise ValueError(f"quant_128x128: out must be {len(want)} tensors shaped like the outputs "
                             f"{[list(w.shape[:-2]) + list(sh) for sh, _ in want]} with unit last-dim stride")
        q, s, qt = (o if o.dim() == 3 else o.unsqueeze(0) for o in (*out, *(() if with_transpose else (out[0],))))
    if E and N and K:
        _quant_128x128_kernel[(nt, kt, E)](wb, q, s, qt, N, K, wb.stride(0), wb.stride(1), wb.stride(2),
                                           q.stride(0), q.stride(1), s.stride(0), s.stride(1),
                                           qt.stride(0), qt.stride(1),
                                           EXACT_CAST=INTERPRETED, WRITE_T=with_transpose,
                                           num_warps=CFG["warps_128"])
    if check_finite:
        _check_scales_finite("quant_128x128", s)
    if out is not None:
        return tuple(out)
    if w.dim() != 3:
        q, s, qt = q[0], s[0], qt[0]
    return (q, s, qt) if with_transpose else (q, s)


# ----------------------------------------------------------------------------------------------------------
# dequantisation (pure torch; any device)
# ----------------------------------------------------------------------------------------------------------
def _expand(scales: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    return scales.repeat_interleave(TILE, dim=dim).narrow(dim, 0, size)


def dequant_1x128(x_fp8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quant_1x128: x_fp8 [M, K] * scales [M, ceil(K/128)] (per 128 columns) -> [M, K] ``dtype``."""
    M, K = x_fp8.shape
    if tuple(scales.shape) != (M, -(-K // TILE)):
        raise ValueError(f"dequant_1x128: scales {tuple(scales.shape)} do not match x {(M, K)} (want [M, ceil(K/128)])")
    return (x_fp8.float() * _expand(scales.float(), 1, K)).to(dtype)


def dequant_128x128(w_fp8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quant_128x128: w_fp8 [N, K] * scales [ceil(N/128), ceil(K/128)] -> [N, K] ``dtype``."""
    N, K = w_fp8.shape
    if tuple(scales.shape) != (-(-N // TILE), -(-K // TILE)):
        raise ValueError(f"dequant_128x128: scales {tuple(scales.shape)} do not match w {(N, K)}")
    s = _expand(_expand(scales.float(), 0, N), 1, K)
    return (w_fp8.float() * s).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# pure-torch references (same numerics as the kernels)
# ----------------------------------------------------------------------------------------------------------
def scale_from_amax_ref(amax: torch.Tensor, nonfinite: torch.Tensor | None = None,
                        fp8_max: float = FP8_MAX) -> torch.Tensor:
    """amax (fp32) -> dequant scale with the zero / tiny / non-finite guards of the module docstring."""
    amax = amax.float()
    s = torch.where(amax > 0, amax.clamp_min(AMAX_EPS) / fp8_max, torch.ones_like(amax))
    if nonfinite is not None:
        s = torch.where(nonfinite, torch.full_like(s, float("nan")), s)
    return s


def cast_to_fp8_ref(v: torch.Tensor, dtype: torch.dtype = FP8_DTYPE) -> torch.Tensor:
    """Saturating cast of already-scaled fp32 values to fp8 (clamp to +-max finite, RTNE)."""
    m = torch.finfo(dtype).max
    return v.float().clamp(-m, m).to(dtype)


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    M, K = x.shape
    return torch.nn.functional.pad(x, (0, cols - K, 0, rows - M))


def _col_major(s: torch.Tensor, yes: bool) -> torch.Tensor:
    return s.t().contiguous().t() if yes else s


def quant_1x128_ref(x: torch.Tensor, col_major_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch quant_1x128 (the kernels' reference and the CPU emulation path)."""
    M, K = x.shape
    kt = -(-K // TILE)
    xf = _pad_to(x.float(), M, kt * TILE).view(M, kt, TILE)
    amax = xf.abs().amax(dim=2)
    nonfinite = ~torch.isfinite(xf).all(dim=2)
    s = scale_from_amax_ref(amax, nonfinite)
    q = cast_to_fp8_ref(xf / s[:, :, None]).view(M, kt * TILE)[:, :K].contiguous()
    return q, _col_major(s, col_major_scales)


def quant_1x128_with_transpose_ref(x: torch.Tensor, col_major_scales: bool = False):
    """Pure-torch quant_1x128_with_transpose: (quant_1x128_ref(x), quant_1x128_ref(x.t()))."""
    q, s = quant_1x128_ref(x, col_major_scales)
    qt, st = quant_1x128_ref(x.t(), col_major_scales)
    return q, s, qt, st


def quant_128x128_ref(w: torch.Tensor, with_transpose: bool = False):
    """Pure-torch quant_128x128 ([N, K] or [E, N, K]; ``with_transpose`` as there)."""
    if with_transpose:
        q, s = quant_128x128_ref(w)
        return q, s, q.transpose(-1, -2).contiguous()
    if w.dim() == 3:
        outs = [quant_128x128_ref(we) for we in w]
        N, K = w.shape[1:]
        if not outs:
            return (torch.empty((0, N, K), dtype=FP8_DTYPE, device=w.device),
                    torch.empty((0, -(-N // TILE), -(-K // TILE)), device=w.device))
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])
    N, K = w.shape
    nt, kt = -(-N // TILE), -(-K // TILE)
    wf = _pad_to(w.float(), nt * TILE, kt * TILE).view(nt, TILE, kt, TILE)
    amax = wf.abs().amax(dim=(1, 3))
    nonfinite = ~torch.isfinite(wf).all(dim=3).all(dim=1)
    s = scale_from_amax_ref(amax, nonfinite)
    q = cast_to_fp8_ref(wf / s[:, None, :, None]).view(nt * TILE, kt * TILE)[:N, :K].contiguous()
    return q, s


# ----------------------------------------------------------------------------------------------------------
# grouped (MoE experts): row tiles aligned to expert boundaries, no host sync
# ----------------------------------------------------------------------------------------------------------
class GroupedTiles(NamedTuple):
    """Row tiling of x[M, .] whose rows are sorted by group (expert): every tile holds <= 128 rows of ONE group.

    Built on the device from the per-group row counts without a host sync (``grouped_tiles``). ``n_tiles``
    (host int) is the upper bound ceil(M/128) + E; tiles past the real ones are empty (start == end == 0).

    tile_group [n_tiles] int32: group of each tile (E for empty tiles); tile_start / tile_end [n_tiles] int32:
    the tile's rows [start, end); group_tile_start [E + 1] int32: tiles of group e are
    group_tile_start[e] : group_tile_start[e + 1]; n_groups: E.
    """

    tile_group: torch.Tensor
    tile_start: torch.Tensor
    tile_end: torch.Tensor
    group_tile_start: torch.Tensor
    n_tiles: int
    n_groups: int


def grouped_tiles(counts: torch.Tensor, M: int) -> GroupedTiles:
    """Tile table for rows sorted by group, ``counts`` [E] (int, on the device, must sum to ``M``; not checked,
    as that would sync). Pure device ops (cumsum / searchsorted)."""
    E = counts.numel()
    dev = counts.device
    n_tiles = -(-M // TILE) + E
    c = counts.to(torch.int64)
    tiles = (c + TILE - 1) // TILE
    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    gts = torch.cat([zero, torch.cumsum(tiles, 0)])
    row_off = torch.cat([zero, torch.cumsum(c, 0)])
    t = torch.arange(n_tiles, device=dev, dtype=torch.int64)
    tg = torch.searchsorted(gts[1:].contiguous(), t, right=True)
    used = tg < E
    tgc = tg.clamp(max=max(E - 1, 0))
    start = row_off[tgc] + (t - gts[tgc]) * TILE
    end = torch.minimum(start + TILE, row_off[tgc + 1])
    start = torch.where(used, start, torch.zeros_like(start))
    end = torch.where(used, end, torch.zeros_like(end))
    i32 = torch.int32
    return GroupedTiles(tg.to(i32), start.to(i32), end.to(i32), gts.to(i32), n_tiles, E)


@triton.jit
def _quant_1x128_t_grouped_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, ts_ptr, te_ptr, tg_ptr, gts_ptr, K, E, T,
                                  stride_xm, stride_xk, stride_qm, stride_sm, stride_sk, stride_qtk, stride_stk,
                                  stride_stt, EXACT_CAST: tl.constexpr, GROUP_MAJOR: tl.constexpr,
                                  K_FASTEST: tl.constexpr, CH: tl.constexpr):
    # one (row tile of one group) x (128 columns): rows -> 1x128 scales of x; columns -> 1x128 scales of x^T,
    # stored in the tile-padded transposed layout qt[K, n_tiles * 128] (tile t owns columns t*128 .. +128; zeros past
    # the tile's rows); GROUP_MAJOR: q / s in the tile-padded row layout too (tile t owns rows t*128 .. +128, padding
    # zeros / 1), and qt and s are flat, group g's part a row-major [K, n_g * 128] (qt) /
    # [ceil(K/128), n_g * 128] (s) block at element offset g0 * 128 * K (qt) / g0 * 128 * ceil(K/128) (s), where
    # g0 = its first tile and n_g its tiles; the empty tiles past the real ones form one more block at the end.
    # K_FASTEST: grid (k tiles, row tiles) instead of (row tiles, k tiles)
    pid_k, t = _k_and_row_tile(K_FASTEST)
    rs = tl.load(ts_ptr + t)
    re = tl.load(te_ptr + t)
    if GROUP_MAJOR:
        g = tl.load(tg_ptr + t)
        g0 = tl.load(gts_ptr + g)
        g1 = tl.load(gts_ptr + g + 1, mask=g < E, other=T)
        pitch = (g1 - g0) * 128            # the block's row length; its element (i, j) is at i * pitch + j
        # element (i, t*128 + r) of a block lands at g0*128*width + i*pitch + (t - g0)*128 + r
        qrow0 = t * 128
        s_base = s_ptr + g0 * 128 * (tl.cdiv(K, 128) - 1)
        sm, sk = 1, pitch
        qt_base = qt_ptr + g0 * 128 * (K - 1)
        qtk = pitch
    else:
        qrow0 = rs
        s_base = s_ptr
        sm, sk = stride_sm, stride_sk
        qt_base = qt_ptr
        qtk = stride_qtk
    _quant_tile_t(x_ptr, rs, re - rs, pid_k, K, stride_xm, stride_xk, q_ptr, qrow0, stride_qm, s_base, sm, sk,
                  GROUP_MAJOR, qt_base + t * 128, qtk, st_ptr + t * stride_stt, stride_stk, True, CH, EXACT_CAST)


def quant_1x128_with_transpose_grouped(x: torch.Tensor, tiles: GroupedTiles, group_major: bool = False):
    """``quant_1x128_with_transpose`` for rows sorted by group, with x^T's 1x128 tiles never crossing groups.

    x: [M, K]. Returns (x_fp8 [M, K], scales [M, ceil(K/128)]  -- identical to quant_1x128(x) --,
    xt_fp8 [K, n_tiles * 128] e4m3 in the tile-padded layout: column t*128 + r holds row tiles.tile_start[t] + r
    (zeros past the tile's end), xt_scales [K, n_tiles] fp32 (scale 1 for empty tiles)), scales row-major: the
    operands of the grouped Triton GEMMs.
    ``group_major``: the operands of one GEMM per group instead, each read in place. x_fp8 [n_tiles * 128, K] in
    the tile-padded row layout (row t*128 + r holds row tiles.tile_start[t] + r; zeros past the tile's end), so each
    group's rows start at a multiple of 128 (whole 128-row blocks); x's scales (scale 1 for the padding rows) and
    xt_fp8 flat (1-D), each group's part one contiguous block: take them with :func:`group_block` (group g: scales
    [rows_g, ceil(K/128)] stride (1, rows_g), xt_fp8 [K, rows_g] row-major, rows_g = its tiles x 128);
    xt_scales [K, n_tiles] with strides (1, K) (cuBLAS's layout: a group's columns are its scales in place).
    """
    _check_input(x, "quant_1x128_with_transpose_grouped")
    M, K = x.shape
    T = tiles.n_tiles
    kt = triton.cdiv(K, TILE)
    rows = T * TILE if group_major else M
    q = torch.empty((rows, K), dtype=FP8_DTYPE, device=x.device)
    if group_major:
        s = torch.empty(rows * kt, dtype=torch.float32, device=x.device)
        qt = torch.empty(K * T * TILE, dtype=FP8_DTYPE, device=x.device)
    else:
        s = _scales(rows, kt, x.device, False)
        qt = torch.empty((K, T * TILE), dtype=FP8_DTYPE, device=x.device)
    st = _scales(K, T, x.device, group_major)
    if M == 0:  # nothing to read (an empty tensor may have no storage): padding only
        qt.view(torch.uint8).zero_()
        st.fill_(1.0)
        if group_major:
            q.view(torch.uint8).zero_()
            s.fill_(1.0)
    elif T and K:
        stride_s = (1, 1) if group_major else (s.stride(0), s.stride(1))
        kf = bool(CFG["k_fastest_tg"]) and T <= 65535
        _quant_1x128_t_grouped_kernel[(kt, T) if kf else (T, kt)](
            x, q, s, qt, st, tiles.tile_start, tiles.tile_end, tiles.tile_group, tiles.group_tile_start, K,
            tiles.n_groups, T, x.stride(0), x.stride(1), q.stride(0), *stride_s, 1 if group_major else qt.stride(0),
            st.stride(0), st.stride(1), EXACT_CAST=INTERPRETED, GROUP_MAJOR=group_major, K_FASTEST=kf,
            CH=_chunk(CFG["ch_tg"]), num_warps=CFG["warps_tg"])
    return q, s, qt, st


def group_block(flat: torch.Tensor, group_tile_start: list, g: int, width: int) -> torch.Tensor:
    """Group ``g``'s block of a ``group_major`` output of :func:`quant_1x128_with_transpose_grouped`: the
    row-major ``[width, rows_g]`` view of ``flat`` (width = K for xt_fp8, ceil(K/128) for the scales, whose
    [rows_g, ceil(K/128)] matrix is this view's ``.t()``), rows_g = 128 x the group's tiles. ``group_tile_start``:
    the tiles' ``group_tile_start`` on the host (E + 1 ints). No copy."""
    a, b = group_tile_start[g] * TILE, group_tile_start[g + 1] * TILE
    return flat[a * width:b * width].view(width, b - a)


def quant_1x128_with_transpose_grouped_ref(x: torch.Tensor, tiles: GroupedTiles, group_major: bool = False):
    """Pure-torch reference of quant_1x128_with_transpose_grouped (reads the tile table on the host; scales
    row-major, or flat with ``group_major``)."""
    M, K = x.shape
    T = tiles.n_tiles
    q, s = quant_1x128_ref(x)
    qt = torch.zeros((K, T * TILE), dtype=FP8_DTYPE, device=x.device)
    st = torch.ones((K, T), dtype=torch.float32, device=x.device)
    if group_major:
        qp = torch.zeros((T * TILE, K), dtype=FP8_DTYPE, device=x.device)
        sp = torch.ones((T * TILE, s.shape[1]), dtype=torch.float32, device=x.device)
    for t, (a, b) in enumerate(zip(tiles.tile_start.tolist(), tiles.tile_end.tolist())):
        if b > a:
            qq, ss = quant_1x128_ref(x[a:b].t())  # [K, rows], one tile along the rows
            qt[:, t * TILE:t * TILE + (b - a)] = qq
            st[:, t] = ss[:, 0]
            if group_major:
                qp[t * TILE:t * TILE + (b - a)] = q[a:b]
                sp[t * TILE:t * TILE + (b - a)] = s[a:b]
    if group_major:   # the padded rows; each group's (then the empty tiles') block flattened: [kt, rows_g], [K, rows_g]
        q, s = qp, sp
        ends = tiles.group_tile_start.tolist() + [T]
        bounds = [(ends[g] * TILE, ends[g + 1] * TILE) for g in range(len(ends) - 1)]
        s = torch.cat([s[a:b].t().reshape(-1) for a, b in bounds])
        qt = torch.cat([qt[:, a:b].reshape(-1) for a, b in bounds])
    return q, s, qt, st
