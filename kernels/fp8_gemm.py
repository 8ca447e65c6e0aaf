"""Block-scaled FP8 GEMMs (DeepSeek-V3 §3.3.2): FP8 tensor-core products promoted to FP32 every 128 K.

All GEMMs here compute ``C[M, N] = A[M, K] @ B[N, K]^T`` ("NT": both operands K-contiguous rows) with
float8_e4m3fn operands and float32 dequantisation scales (convention of ``kernels.fp8_quant``:
``x ~= x_fp8 * scale``)::

    C[m, n] = sum_kt  a_scale[m, kt] * b_scale[., kt] * sum_{k in tile kt} A[m, k] * B[n, k]

The inner sum over one 128-wide K tile is one ``tl.dot`` on fp8 inputs (on sm90: WGMMA, whose internal
accumulation has limited precision); its fp32 result is multiplied by the tile's scales and added into a
separate fp32 accumulator — the "promotion to CUDA cores every N_C = 128 elements" of DeepSeek-V3 §3.3.2.
BLOCK_K is therefore fixed to 128 (= the quantisation tile).

Kernel structure: every kernel runs the same K loop, ``_fp8_k_loop`` (full, unmasked K tiles) over
``_fp8_k_tile`` (one tile: fp8 dot + scale promotion); when K % 128 != 0 (constexpr EVEN_K False) the last,
partial K tile is peeled out of the loop and is the only masked load. Rows past M / N (the tile's end for the
grouped kernel) are clamped onto valid rows, so loads carry no M/N mask; only the store is masked. Tiles:
BLOCK_M in {16..256} (grouped: dividing the 128-row tile), BLOCK_N in {16..256}; with 128x128 b scales a
BLOCK_N <= 128 tile reads one scalar scale per K tile, a BLOCK_N == 256 tile two (selected per column).
GPU launches autotune over a list of configs pruned per shape (``_prune``); ``config=`` fixes one instead.

Kernel variants (constexpr, default off; config kwargs, so the autotuner / ``config=`` choose them):
  SPLIT_N  the N tile as two BLOCK_N/2 halves with two accumulators sharing one A tile load; half 0 is promoted
           (and pinned there by ``_order_fence``) before half 1's dot, so only a half-width product is live next
           to the accumulators: 128x256 / 256x128 tiles with 8 warps no longer spill heavily (sm90 offline compile,
           triton 3.9: 260 / 236 B -> 24 / 48 B of spill stores). On the H200 (triton 3.6) 128x256 w8 s3 SPLIT_N
           is the fastest dense config swept: 822 TFLOP/s at 4096 x 7168 x 2048 vs 742 for the best plain one, so
           the dense autotune list has it; in the grouped kernel it lost (482 vs 759) and stays out.
  PIPE     software-pipelined promotion: the dot of K tile k+1 is issued before tile k's product is promoted,
           meant to let sm90's async wgmma overlap the promotion FMAs. Triton still waits for each wgmma
           (``wgmma.wait_group 0``) right after issuing it, so it gives no overlap: 3-10% slower than the plain
           path on the H200 at every config swept. Autotuned only with MOETRAIN_FP8_VARIANTS=1.

Variants
  fp8_gemm_blockwise(a, a_s, b, b_s)   a: 1x128 scales [M, ceil(K/128)]; b: 128x128 scales
                                       [ceil(N/128), ceil(K/128)]. Forward y = x W^T and, with
                                       b = W^T (see fp8_gemm_dgrad), the input gradient.
  fp8_gemm_1x128_1x128(a, a_s, b, b_s) both operands 1x128 per-row scales ([M, Kt] and [N, Kt]); the
                                       weight gradient dW = grad^T x, reducing over tokens:
                                       a = grad^T [N_out, T], b = x^T [K_in, T] (both tiles along T).
  fp8_gemm_dgrad(g, g_s, w, w_s)       dX = G W: G [M, N] 1x128 along N, W [N, K] 128x128; uses
                                       W^T's blocks = W's blocks transposed (same fp8 data, scales.t()).
  fp8_gemm_blockwise_ref / fp8_gemm_1x128_1x128_ref: dequantise and matmul in fp32 (pure torch).

Grouped variants for MoE experts (rows sorted by expert, per-expert counts on the device, no host sync; the
row tiling comes from kernels.fp8_quant.grouped_tiles: 128-row tiles that never straddle two experts):
  fp8_gemm_grouped(a, a_s, b[E, N, K], b_s[E, Nt, Kt], tiles)   forward / dgrad, one 128-row tile per program
  fp8_gemm_grouped_wgrad(at, at_s, bt, bt_s, tiles) -> [E, N, K] weight grads over the tile-padded token layout

M, N, K need not be multiples of anything (partial tiles are masked). Operands may have any strides
(performance is best with K-contiguous rows). Output dtype: bfloat16 (default), float32 or float16.

Errors: ValueError for shape/scale mismatches, TypeError for wrong dtypes, RuntimeError for CPU tensors when
the module was not imported under TRITON_INTERPRET=1. Non-finite inputs are not checked here: a NaN scale
(see fp8_quant) yields NaN outputs in the affected rows/columns.

Interpreter notes (TRITON_INTERPRET=1): the interpreter's fp32 -> bf16 conversion rounds wrongly, so the kernel
rounds to bf16 with integer ops first (constexpr EXACT_CAST); ``UPCAST_DOT`` (constexpr) upcasts fp8 tiles
to fp32 before tl.dot for interpreters without fp8 dot support (triton 3.9's interpreter handles fp8 dot, so it
is off by default). On the GPU tl.dot takes the fp8 tiles natively.

This module never imports moetrain.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fp8_quant import FP8_DTYPE, INTERPRETED, TILE, GroupedTiles, dequant_128x128, dequant_1x128

__all__ = [
    "fp8_gemm_blockwise", "fp8_gemm_1x128_1x128", "fp8_gemm_dgrad",
    "fp8_gemm_blockwise_ref", "fp8_gemm_1x128_1x128_ref", "fp8_gemm_dgrad_ref", "INTERPRETED",
    "fp8_gemm_grouped", "fp8_gemm_grouped_wgrad", "fp8_gemm_grouped_ref", "fp8_gemm_grouped_wgrad_ref",
]

# tl.dot on fp8 tiles under the interpreter works in triton 3.9; flip with MOETRAIN_FP8_UPCAST_DOT=1 if not.
_UPCAST_DOT_INTERPRETED = os.environ.get("MOETRAIN_FP8_UPCAST_DOT", "0") == "1"


def _autotune() -> bool:
    """GPU launches autotune their tile config per (M bucket, N, K) unless MOETRAIN_FP8_AUTOTUNE=0 (read per call;
    tests turn it off: each new shape would otherwise compile and time every config)."""
    return os.environ.get("MOETRAIN_FP8_AUTOTUNE", "1") != "0"


@triton.jit
def _round_to_bf16_grid(v):
    # RTNE fp32 -> bf16 grid with integer ops (finite inputs); interpreter only.
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> 16) & 1
    rb = (bits + 0x7FFF + lsb) & -65536
    return rb.to(tl.float32, bitcast=True)


@triton.jit
def _fp8_load_k(ptrs, k_left, BLOCK_K: tl.constexpr, MASK_K: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # one [rows, BLOCK_K] fp8 operand tile; K mask only when MASK_K (the last, partial tile; k_left = K columns left)
    if MASK_K:
        k_mask = tl.arange(0, BLOCK_K) < k_left
        x = tl.load(ptrs, mask=k_mask[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST_DOT:
        x = x.to(tl.float32)
    return x


@triton.jit
def _fp8_scales(sa, sb_ptrs, sb_hi_ptrs, B_BLOCK_SCALES: tl.constexpr, BLOCK_N: tl.constexpr):
    # One K tile's promotion factors (fa [BLOCK_M], fb [BLOCK_N]) for _fp8_promote; sa: the loaded a scales.
    # b scales (sb_ptrs) by case:
    #   per-row (not B_BLOCK_SCALES)      sb_ptrs [BLOCK_N]                    fa = sa,      fb = sb
    #   128x128, BLOCK_N <= 128           sb_ptrs scalar (one 128-row block)   fa = sa * sb, fb unused (ones)
    #   128x128, BLOCK_N == 256           sb_ptrs / sb_hi_ptrs scalars: the blocks of columns 0..127 / 128..255;
    #                                     fa = sa, fb = the per-column select (two scalar loads, no gather)
    if B_BLOCK_SCALES:
        if BLOCK_N <= 128:
            fa = sa * tl.load(sb_ptrs)
            fb = tl.full((BLOCK_N,), 1.0, tl.float32)
        else:
            fa = sa
            fb = tl.where(tl.arange(0, BLOCK_N) < 128, tl.load(sb_ptrs), tl.load(sb_hi_ptrs))
    else:
        fa = sa
        fb = tl.load(sb_ptrs)
    return fa, fb


@triton.jit
def _fp8_promote(acc, part, fa, fb, B_BLOCK_SCALES: tl.constexpr, BLOCK_N: tl.constexpr):
    # acc += part * scales (the fp32 promotion of one K tile's tensor-core product)
    if B_BLOCK_SCALES:
        if BLOCK_N <= 128:
            acc += part * fa[:, None]
        else:
            acc += part * (fa[:, None] * fb[None, :])
    else:
        acc += part * fa[:, None] * fb[None, :]
    return acc


@triton.jit
def _fp8_k_tile(acc, a_ptrs, b_ptrs, sa_ptrs, sb_ptrs, sb_hi_ptrs, k_left,
                B_BLOCK_SCALES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MASK_K: tl.constexpr,
                UPCAST_DOT: tl.constexpr):
    # One 128-wide K tile: acc += (A_tile @ B_tile^T) * a_scale[:, None] * b_scale, promoted in fp32.
    # a_ptrs [BLOCK_M, BLOCK_K] / b_ptrs [BLOCK_N, BLOCK_K] point at valid rows (callers clamp out-of-range rows,
    # so only K needs a mask, and only when MASK_K). sa_ptrs [BLOCK_M]; b scales: see _fp8_scales.
    a = _fp8_load_k(a_ptrs, k_left, BLOCK_K, MASK_K, UPCAST_DOT)
    b = _fp8_load_k(b_ptrs, k_left, BLOCK_K, MASK_K, UPCAST_DOT)
    part = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
    fa, fb = _fp8_scales(tl.load(sa_ptrs), sb_ptrs, sb_hi_ptrs, B_BLOCK_SCALES, BLOCK_N)
    return _fp8_promote(acc, part, fa, fb, B_BLOCK_SCALES, BLOCK_N)


@triton.jit
def _fp8_k_loop(acc, a_ptrs, b_ptrs, sa_ptrs, sb_ptrs, sb_hi_ptrs, kt0, kt1,
                stride_ak, stride_bk, stride_sak, stride_sbk,
                B_BLOCK_SCALES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
                PIPE: tl.constexpr = False):
    # The unmasked K loop shared by every kernel here: full K tiles kt0 .. kt1-1 (pointers at K tile 0).
    # PIPE (software-pipelined promotion): the dot of tile kt is issued before tile kt-1's product is promoted,
    # so an async tensor-core MMA (sm90 wgmma) can overlap the previous tile's FMAs; costs a third
    # [BLOCK_M, BLOCK_N] fp32 tile of registers (part_prev). part_prev / its factors start at zero (0 * 0 adds 0).
    a_ptrs += kt0 * (BLOCK_K * stride_ak)
    b_ptrs += kt0 * (BLOCK_K * stride_bk)
    if PIPE:
        part_prev = tl.zeros(acc.shape, dtype=tl.float32)
        fa_prev = tl.zeros((acc.shape[0],), dtype=tl.float32)
        fb_prev = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for kt in range(kt0, kt1):
            a = _fp8_load_k(a_ptrs, 0, BLOCK_K, False, UPCAST_DOT)
            b = _fp8_load_k(b_ptrs, 0, BLOCK_K, False, UPCAST_DOT)
            part = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
            acc = _fp8_promote(acc, part_prev, fa_prev, fb_prev, B_BLOCK_SCALES, BLOCK_N)
            fa_prev, fb_prev = _fp8_scales(tl.load(sa_ptrs + kt * stride_sak), sb_ptrs + kt * stride_sbk,
                                           sb_hi_ptrs + kt * stride_sbk, B_BLOCK_SCALES, BLOCK_N)
            part_prev = part
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        acc = _fp8_promote(acc, part_prev, fa_prev, fb_prev, B_BLOCK_SCALES, BLOCK_N)
    else:
        for kt in range(kt0, kt1):
            acc = _fp8_k_tile(acc, a_ptrs, b_ptrs, sa_ptrs + kt * stride_sak, sb_ptrs + kt * stride_sbk,
                              sb_hi_ptrs + kt * stride_sbk, 0, B_BLOCK_SCALES, BLOCK_N, BLOCK_K, False, UPCAST_DOT)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    return acc


# Compiled (not interpreted) kernels order SPLIT_N's half-tile promotions with an inline-asm fence (see _order_fence).
_ASM_FENCE = tl.constexpr(not INTERPRETED)


@triton.jit
def _order_fence(x):
    # Identity on fp32 x through a side-effecting inline asm (`mov`): LLVM keeps side-effecting asm in program
    # order, so the FMAs producing x stay before the next tl.dot's wgmma (also side-effecting asm). Without it,
    # LLVM sinks half 0's promotion FMAs past half 1's wgmma and both half products are live at once (seen in the
    # PTX with triton 3.9). The interpreter has no inline asm: identity there.
    if _ASM_FENCE:
        x = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=False, pack=1)
    return x


@triton.jit
def _fp8_k_tile_split(acc0, acc1, a_ptrs, b0_ptrs, b1_ptrs, sa_ptrs, sb0_ptrs, sb1_ptrs, k_left,
                      B_BLOCK_SCALES: tl.constexpr, HALF: tl.constexpr, BLOCK_K: tl.constexpr, MASK_K: tl.constexpr,
                      UPCAST_DOT: tl.constexpr):
    # SPLIT_N form of _fp8_k_tile: the N tile as two HALF-column halves (acc0 / acc1, B rows b0_ptrs / b1_ptrs,
    # b scales sb0_ptrs / sb1_ptrs, each a scalar with 128x128 scales as HALF <= 128) sharing one A tile.
    # Half 0 is promoted before half 1's dot, so only one HALF-wide product is live next to the accumulators.
    a = _fp8_load_k(a_ptrs, k_left, BLOCK_K, MASK_K, UPCAST_DOT)
    b0 = _fp8_load_k(b0_ptrs, k_left, BLOCK_K, MASK_K, UPCAST_DOT)
    b1 = _fp8_load_k(b1_ptrs, k_left, BLOCK_K, MASK_K, UPCAST_DOT)
    sa = tl.load(sa_ptrs)
    part0 = tl.dot(a, tl.trans(b0), out_dtype=tl.float32)
    fa0, fb0 = _fp8_scales(sa, sb0_ptrs, sb0_ptrs, B_BLOCK_SCALES, HALF)
    acc0 = _order_fence(_fp8_promote(acc0, part0, fa0, fb0, B_BLOCK_SCALES, HALF))
    part1 = tl.dot(a, tl.trans(b1), out_dtype=tl.float32)
    fa1, fb1 = _fp8_scales(sa, sb1_ptrs, sb1_ptrs, B_BLOCK_SCALES, HALF)
    acc1 = _fp8_promote(acc1, part1, fa1, fb1, B_BLOCK_SCALES, HALF)
    return acc0, acc1


@triton.jit
def _fp8_k_loop_split(acc0, acc1, a_ptrs, b0_ptrs, b1_ptrs, sa_ptrs, sb0_ptrs, sb1_ptrs, kt0, kt1,
                      stride_ak, stride_bk, stride_sak, stride_sbk,
                      B_BLOCK_SCALES: tl.constexpr, HALF: tl.constexpr, BLOCK_K: tl.constexpr,
                      UPCAST_DOT: tl.constexpr, PIPE: tl.constexpr):
    # SPLIT_N K loop (full tiles kt0 .. kt1-1). With PIPE, a half-tile-shifted pipeline: each iteration issues
    # half 0's dot, promotes the previous tile's half 1 (overlapping that dot), issues half 1's dot, then
    # promotes half 0 (overlapping half 1's dot). Live fp32 registers: 2 tiles (accumulators + two half
    # products), the same as the plain path, instead of PIPE's 3.
    a_ptrs += kt0 * (BLOCK_K * stride_ak)
    b0_ptrs += kt0 * (BLOCK_K * stride_bk)
    b1_ptrs += kt0 * (BLOCK_K * stride_bk)
    if PIPE:
        part1_prev = tl.zeros(acc1.shape, dtype=tl.float32)
        fa1_prev = tl.zeros((acc1.shape[0],), dtype=tl.float32)
        fb1_prev = tl.zeros((HALF,), dtype=tl.float32)
        for kt in range(kt0, kt1):
            a = _fp8_load_k(a_ptrs, 0, BLOCK_K, False, UPCAST_DOT)
            b0 = _fp8_load_k(b0_ptrs, 0, BLOCK_K, False, UPCAST_DOT)
            b1 = _fp8_load_k(b1_ptrs, 0, BLOCK_K, False, UPCAST_DOT)
            sa = tl.load(sa_ptrs + kt * stride_sak)
            part0 = tl.dot(a, tl.trans(b0), out_dtype=tl.float32)
            acc1 = _fp8_promote(acc1, part1_prev, fa1_prev, fb1_prev, B_BLOCK_SCALES, HALF)
            part1 = tl.dot(a, tl.trans(b1), out_dtype=tl.float32)
            fa0, fb0 = _fp8_scales(sa, sb0_ptrs + kt * stride_sbk, sb0_ptrs + kt * stride_sbk, B_BLOCK_SCALES, HALF)
            acc0 = _fp8_promote(acc0, part0, fa0, fb0, B_BLOCK_SCALES, HALF)
            fa1_prev, fb1_prev = _fp8_scales(sa, sb1_ptrs + kt * stride_sbk, sb1_ptrs + kt * stride_sbk,
                                             B_BLOCK_SCALES, HALF)
            part1_prev = part1
            a_ptrs += BLOCK_K * stride_ak
            b0_ptrs += BLOCK_K * stride_bk
            b1_ptrs += BLOCK_K * stride_bk
        acc1 = _fp8_promote(acc1, part1_prev, fa1_prev, fb1_prev, B_BLOCK_SCALES, HALF)
    else:
        for kt in range(kt0, kt1):
            acc0, acc1 = _fp8_k_tile_split(acc0, acc1, a_ptrs, b0_ptrs, b1_ptrs, sa_ptrs + kt * stride_sak,
                                           sb0_ptrs + kt * stride_sbk, sb1_ptrs + kt * stride_sbk, 0,
                                           B_BLOCK_SCALES, HALF, BLOCK_K, False, UPCAST_DOT)
            a_ptrs += BLOCK_K * stride_ak
            b0_ptrs += BLOCK_K * stride_bk
            b1_ptrs += BLOCK_K * stride_bk
    return acc0, acc1


@triton.jit
def _b_half_scale_ptrs(bs_ptr, n0, offs_bn, N, stride_bsn, B_BLOCK_SCALES: tl.constexpr):
    # b scale pointers (K tile 0) of a SPLIT_N half starting at column n0 (width <= 128, so inside one 128-block;
    # a half past N in the partial last tile is clamped onto the last block: its columns are never stored)
    if B_BLOCK_SCALES:
        p = bs_ptr + tl.minimum(n0 // 128, (N - 1) // 128) * stride_bsn
    else:
        p = bs_ptr + offs_bn * stride_bsn
    return p


@triton.jit
def _store_c(c_ptrs, acc, mask, EXACT_CAST: tl.constexpr, OUT_BF16: tl.constexpr):
    if EXACT_CAST and OUT_BF16:
        acc = _round_to_bf16_grid(acc)
    tl.store(c_ptrs, acc.to(c_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _store_c_halves(c_rows, acc0, acc1, offs_n0, offs_n1, row_ok, N, stride_cn,
                    EXACT_CAST: tl.constexpr, OUT_BF16: tl.constexpr):
    # SPLIT_N store: the two halves (columns offs_n0 / offs_n1 of the rows c_rows [BLOCK_M, 1], masked by row_ok
    # and the columns < N)
    _store_c(c_rows + offs_n0[None, :] * stride_cn, acc0, row_ok & (offs_n0 < N)[None, :], EXACT_CAST, OUT_BF16)
    _store_c(c_rows + offs_n1[None, :] * stride_cn, acc1, row_ok & (offs_n1 < N)[None, :], EXACT_CAST, OUT_BF16)


@triton.jit
def _fp8_split_n_tile(a_ptrs, as_ptrs, b_ptr, bs_ptr, pid_n, N, offs_k,
                      stride_ak, stride_bn, stride_bk, stride_ask, stride_bsn, stride_bsk, kt_end, kt_tail, k_left,
                      B_BLOCK_SCALES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr, PIPE: tl.constexpr):
    # The SPLIT_N output tile of the dense / grouped forward kernels: column tile pid_n of B [N, K] (b_ptr, scales
    # bs_ptr at K tile 0) as two BLOCK_N/2 halves over the A rows a_ptrs / as_ptrs (K tile 0). Full K tiles
    # 0 .. kt_end-1 in the loop, then (not EVEN_K) the partial tile kt_tail with k_left columns, masked.
    # Returns (acc0, acc1, offs_n0, offs_n1): the halves' fp32 accumulators and (unclamped) columns.
    tl.static_assert(BLOCK_N >= 32, "SPLIT_N: BLOCK_N must be >= 32")
    HALF: tl.constexpr = BLOCK_N // 2
    offs_n0 = pid_n * BLOCK_N + tl.arange(0, HALF)
    offs_n1 = offs_n0 + HALF
    offs_bn0 = offs_n0 % N
    offs_bn1 = offs_n1 % N
    b0_ptrs = b_ptr + offs_bn0[:, None] * stride_bn + offs_k[None, :] * stride_bk
    b1_ptrs = b_ptr + offs_bn1[:, None] * stride_bn + offs_k[None, :] * stride_bk
    bs0_ptrs = _b_half_scale_ptrs(bs_ptr, pid_n * BLOCK_N, offs_bn0, N, stride_bsn, B_BLOCK_SCALES)
    bs1_ptrs = _b_half_scale_ptrs(bs_ptr, pid_n * BLOCK_N + HALF, offs_bn1, N, stride_bsn, B_BLOCK_SCALES)
    acc0 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
    acc0, acc1 = _fp8_k_loop_split(acc0, acc1, a_ptrs, b0_ptrs, b1_ptrs, as_ptrs, bs0_ptrs, bs1_ptrs, 0, kt_end,
                                   stride_ak, stride_bk, stride_ask, stride_bsk, B_BLOCK_SCALES, HALF, BLOCK_K,
                                   UPCAST_DOT, PIPE)
    if not EVEN_K:  # the partial last K tile, peeled out of the loop
        acc0, acc1 = _fp8_k_tile_split(
            acc0, acc1, a_ptrs + kt_tail * (BLOCK_K * stride_ak), b0_ptrs + kt_tail * (BLOCK_K * stride_bk),
            b1_ptrs + kt_tail * (BLOCK_K * stride_bk), as_ptrs + kt_tail * stride_ask,
            bs0_ptrs + kt_tail * stride_bsk, bs1_ptrs + kt_tail * stride_bsk, k_left,
            B_BLOCK_SCALES, HALF, BLOCK_K, True, UPCAST_DOT)
    return acc0, acc1, offs_n0, offs_n1


@triton.jit
def _b_scale_ptrs(bs_ptr, pid_n, offs_bn, N, stride_bsn,
                  B_BLOCK_SCALES: tl.constexpr, BLOCK_N: tl.constexpr):
    # (sb_ptrs, sb_hi_ptrs) at K tile 0 for _fp8_k_tile; offs_bn: the tile's B rows, clamped into [0, N)
    if B_BLOCK_SCALES:
        tl.static_assert(BLOCK_N <= 256, "128x128 b scales: BLOCK_N must be <= 256")
        if BLOCK_N <= 128:
            sb_ptrs = bs_ptr + ((pid_n * BLOCK_N) // 128) * stride_bsn
            sb_hi_ptrs = sb_ptrs
        else:
            blk = pid_n * 2
            sb_ptrs = bs_ptr + blk * stride_bsn
            # a partial last tile may have no second block: its columns are never stored, reuse the first
            sb_hi_ptrs = bs_ptr + tl.minimum(blk + 1, (N - 1) // 128) * stride_bsn
    else:
        sb_ptrs = bs_ptr + offs_bn * stride_bsn
        sb_hi_ptrs = sb_ptrs
    return sb_ptrs, sb_hi_ptrs


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_asm, stride_ask, stride_bsn, stride_bsk,
    M_BUCKET,  # only an autotune key
    B_BLOCK_SCALES: tl.constexpr,  # True: b scales per 128x128 block [ceil(N/128), Kt]; False: per row [N, Kt]
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K mask anywhere
    UPCAST_DOT: tl.constexpr, EXACT_CAST: tl.constexpr, OUT_BF16: tl.constexpr,
    SPLIT_N: tl.constexpr = False,  # the N tile as two BLOCK_N/2 halves (two accumulators, one shared A tile)
    PIPE: tl.constexpr = False,  # software-pipelined promotion (see _fp8_k_loop / _fp8_k_loop_split)
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped (super-tile) ordering for L2 reuse
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # rows past M / N are wrapped onto valid rows (results discarded by the masked store): unmasked loads
    offs_am = offs_m % M
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    as_ptrs = as_ptr + offs_am * stride_asm
    k_full = K // BLOCK_K
    if SPLIT_N:
        acc0, acc1, offs_n0, offs_n1 = _fp8_split_n_tile(
            a_ptrs, as_ptrs, b_ptr, bs_ptr, pid_n, N, offs_k, stride_ak, stride_bn, stride_bk, stride_ask, stride_bsn,
            stride_bsk, k_full, k_full, K - k_full * BLOCK_K, B_BLOCK_SCALES, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
            UPCAST_DOT, PIPE)
        row_ok = (offs_m < M)[:, None]
        c_rows = c_ptr + offs_m[:, None] * stride_cm
        _store_c_halves(c_rows, acc0, acc1, offs_n0, offs_n1, row_ok, N, stride_cn, EXACT_CAST, OUT_BF16)
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_bn = offs_n % N
        b_ptrs = b_ptr + offs_bn[:, None] * stride_bn + offs_k[None, :] * stride_bk
        bs_ptrs, bs_hi_ptrs = _b_scale_ptrs(bs_ptr, pid_n, offs_bn, N, stride_bsn, B_BLOCK_SCALES, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _fp8_k_loop(acc, a_ptrs, b_ptrs, as_ptrs, bs_ptrs, bs_hi_ptrs, 0, k_full,
                          stride_ak, stride_bk, stride_ask, stride_bsk, B_BLOCK_SCALES, BLOCK_N, BLOCK_K, UPCAST_DOT,
                          PIPE)
        if not EVEN_K:  # the partial last K tile, peeled out of the loop
            acc = _fp8_k_tile(acc, a_ptrs + k_full * (BLOCK_K * stride_ak), b_ptrs + k_full * (BLOCK_K * stride_bk),
                              as_ptrs + k_full * stride_ask, bs_ptrs + k_full * stride_bsk,
                              bs_hi_ptrs + k_full * stride_bsk, K - k_full * BLOCK_K,
                              B_BLOCK_SCALES, BLOCK_N, BLOCK_K, True, UPCAST_DOT)
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        _store_c(c_ptrs, acc, (offs_m < M)[:, None] & (offs_n < N)[None, :], EXACT_CAST, OUT_BF16)


_SMEM_BYTES = 232448  # sm90 opt-in shared memory per block; configs whose fp8 pipeline buffers exceed it are dropped


def _cfg(w, s, **blocks):
    return triton.Config(dict(blocks), num_warps=w, num_stages=s)


def _variant(v):
    """Config kwargs of a kernel variant tag: "" (default path), "S" (SPLIT_N), "P" (PIPE), "SP" (both)."""
    return {**({"SPLIT_N": True} if "S" in v else {}), **({"PIPE": True} if "P" in v else {})}


def _variants_autotuned() -> bool:
    """PIPE (and SPLIT_N in the grouped kernel) join the autotune lists only with MOETRAIN_FP8_VARIANTS=1: on the
    H200 (2026-11-30, triton 3.6) they were slower than the plain path at every config swept (bench_fp8 --sweep
    --sweep-grouped); the dense kernel's SPLIT_N configs won there and are always in its list."""
    return os.environ.get("MOETRAIN_FP8_VARIANTS", "0") == "1"


def _gpu_configs():
    """Autotune candidates of the dense kernel (GROUP_M 8): (BLOCK_M, BLOCK_N, num_warps, num_stages[, variant])."""
    return [_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8) for bm, bn, w, s in [
        (128, 128, 8, 4), (128, 128, 8, 5), (128, 128, 4, 3),
        (64, 256, 8, 4), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4)]] + [
        # SPLIT_N: a 256-wide tile as two 128-column accumulators. H200, 4096 x 7168 x 2048: 128x256 w8 s3 split
        # 822 TFLOP/s vs 742 for the best plain config; plain 128x256 / 256x128 spill registers (448 / 391)
        _cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, **_variant("S")) for bm, bn, w, s in [
            (128, 256, 8, 3), (128, 256, 8, 4), (256, 128, 8, 3)]] + [
        _cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, **_variant(v)) for bm, bn, w, s, v in [
            (128, 128, 8, 4, "P")]
        if _variants_autotuned()]


def _pow2_at_least(n, lo=16):
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _prune(configs, m, n, m_key="BLOCK_M", n_key="BLOCK_N"):
    """Drop configs invalid or wasteful for an (m, n) output: a tile dimension past the problem's size rounded up
    to a power of two (>= 64), or fp8 pipeline buffers over the shared memory. Never returns an empty list."""
    keep = []
    for c in configs:
        bm, bn = c.kwargs.get(m_key, 128), c.kwargs[n_key]
        if bm > _pow2_at_least(m, 64) or bn > _pow2_at_least(n, 64):
            continue
        if c.kwargs.get("SPLIT_N") and bn < 32:  # SPLIT_N halves must be >= 16 wide (tl.dot)
            continue
        if c.num_stages * (bm + bn) * 128 > _SMEM_BYTES:
            continue
        keep.append(c)
    if keep:
        return keep
    return [min(configs, key=lambda c: (c.kwargs.get(m_key, 128) * c.kwargs[n_key], len(c.kwargs)))]


def _prune_dense(configs, named_args, **kwargs):
    return _prune(configs, named_args["M"], named_args["N"])


def _autotune_kwargs() -> dict:
    """``cache_results=True`` where this triton's autotuner has it: the config chosen per key is kept in Triton's
    cache directory, so a later process with the same shapes skips timing every candidate (on an H200 a cold start
    of the 3.3B MoE's blockwise FP8 run spent 75 s autotuning, a restart with the cache 18 s: fourth GPU session).
    ``MOETRAIN_FP8_AUTOTUNE_CACHE=0`` turns it off (read when this module is imported)."""
    if os.environ.get("MOETRAIN_FP8_AUTOTUNE_CACHE", "1") == "0":
        return {}
    import inspect
    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


_fp8_gemm_kernel_tuned = _fp8_gemm_kernel if INTERPRETED else triton.autotune(
    configs=_gpu_configs(), key=["M_BUCKET", "N", "K", "B_BLOCK_SCALES"],
    prune_configs_by={"early_config_prune": _prune_dense}, **_autotune_kwargs())(_fp8_gemm_kernel)

_OUT_DTYPES = (torch.bfloat16, torch.float32, torch.float16)
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "GROUP_M", "num_warps", "num_stages", "SPLIT_N", "PIPE")


def _check_config(name, cfg, keys=_CONFIG_KEYS, max_m=256):
    bad = set(cfg) - set(keys)
    if bad:
        raise ValueError(f"{name}: unknown config keys {sorted(bad)} (allowed: {list(keys)})")
    for k, hi in (("BLOCK_M", max_m), ("BLOCK_N", 256)):
        v = cfg.get(k)
        if v is not None and (not isinstance(v, int) or v < 16 or v > hi or v & (v - 1)):
            raise ValueError(f"{name}: {k} must be a power of two in [16, {hi}], got {v}")
    for k in ("SPLIT_N", "PIPE"):
        if not isinstance(cfg.get(k, False), bool):
            raise ValueError(f"{name}: {k} must be a bool, got {cfg[k]!r}")
    if cfg.get("SPLIT_N") and cfg.get("BLOCK_N", 128) < 32:
        raise ValueError(f"{name}: SPLIT_N needs BLOCK_N >= 32, got {cfg['BLOCK_N']}")


def _launch(a, a_s, b, b_s, out_dtype, b_block_scales: bool, name: str, config: dict | None = None):
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{name}: a and b must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise TypeError(f"{name}: a and b must be float8_e4m3fn, got {a.dtype} and {b.dtype}")
    if a_s.dtype != torch.float32 or b_s.dtype != torch.float32:
        raise TypeError(f"{name}: scales must be float32, got {a_s.dtype} and {b_s.dtype}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"{name}: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    M, K = a.shape
    N, Kb = b.shape
    if K != Kb:
        raise ValueError(f"{name}: reduction dims differ: a {tuple(a.shape)} vs b {tuple(b.shape)} (C = A @ B^T)")
    kt = triton.cdiv(K, TILE)
    want_bs = (triton.cdiv(N, TILE), kt) if b_block_scales else (N, kt)
    if tuple(a_s.shape) != (M, kt):
        raise ValueError(f"{name}: a_scales {tuple(a_s.shape)} != [M, ceil(K/128)] = {(M, kt)}")
    if tuple(b_s.shape) != want_bs:
        raise ValueError(f"{name}: b_scales {tuple(b_s.shape)} != {want_bs}")
    if not (a.is_cuda and b.is_cuda) and not INTERPRETED:
        raise RuntimeError(f"{name}: Triton kernels need CUDA tensors (got {a.device}); set TRITON_INTERPRET=1 "
                           "before importing kernels.fp8_gemm to run on CPU, or use the *_ref functions")
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    m_bucket = min(triton.next_power_of_2(M), 4096)
    common = dict(B_BLOCK_SCALES=b_block_scales, BLOCK_K=TILE, EVEN_K=K % TILE == 0,
                  UPCAST_DOT=INTERPRETED and _UPCAST_DOT_INTERPRETED,
                  EXACT_CAST=INTERPRETED, OUT_BF16=out_dtype == torch.bfloat16)
    args = (a, b, c, a_s, b_s, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
            c.stride(1), a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1), m_bucket)
    if INTERPRETED or config is not None or not _autotune():
        # interpreter: large tiles = fewer (slow, Python-level) programs; GPU: a fixed sane default
        cfg = dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3)
        if config is not None:
            _check_config(name, config)
            cfg.update(config)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _fp8_gemm_kernel[grid](*args, **common, **cfg)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _fp8_gemm_kernel_tuned[grid](*args, **common)
    return c


def fp8_gemm_blockwise(a_fp8: torch.Tensor, a_scales: torch.Tensor, b_fp8: torch.Tensor, b_scales: torch.Tensor,
                       out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None) -> torch.Tensor:
    """C[M, N] = A @ B^T with A 1x128-scaled and B 128x128-scaled (DeepSeek-V3 forward GEMM).

    a_fp8: [M, K] float8_e4m3fn, a_scales: [M, ceil(K/128)] fp32 (from quant_1x128);
    b_fp8: [N, K] float8_e4m3fn, b_scales: [ceil(N/128), ceil(K/128)] fp32 (from quant_128x128).
    FP32 accumulation with promotion (scale multiply + add) every 128 K. Returns [M, N] ``out_dtype``.
    ``config`` (optional, GPU benchmarking): fixed {BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages, SPLIT_N,
    PIPE} instead of autotuning (BLOCK_M, BLOCK_N: powers of two in [16, 256]; SPLIT_N / PIPE: bools, SPLIT_N
    needs BLOCK_N >= 32; ValueError otherwise).
    """
    return _launch(a_fp8, a_scales, b_fp8, b_scales, out_dtype, True, "fp8_gemm_blockwise", config)


def fp8_gemm_1x128_1x128(a_fp8: torch.Tensor, a_scales: torch.Tensor, b_fp8: torch.Tensor, b_scales: torch.Tensor,
                         out_dtype: torch.dtype = torch.float32, config: dict | None = None) -> torch.Tensor:
    """C[M, N] = A @ B^T with both operands 1x128-scaled per row (the weight-gradient GEMM).

    a_fp8: [M, K] e4m3, a_scales: [M, ceil(K/128)]; b_fp8: [N, K] e4m3, b_scales: [N, ceil(K/128)] fp32.
    For dW[N_out, K_in] = grad[T, N_out]^T @ x[T, K_in]: a = grad^T, b = x^T, both quantised 1x128 along T
    (the transposed outputs of quant_1x128_with_transpose). Default out_dtype float32 (weight grads).
    """
    return _launch(a_fp8, a_scales, b_fp8, b_scales, out_dtype, False, "fp8_gemm_1x128_1x128", config)


def fp8_gemm_dgrad(g_fp8: torch.Tensor, g_scales: torch.Tensor, w_fp8: torch.Tensor, w_scales: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None) -> torch.Tensor:
    """dX[M, K] = G[M, N] @ W[N, K] for y = x W^T.

    g_fp8: [M, N] e4m3 with g_scales [M, ceil(N/128)] (1x128 along N); w_fp8: [N, K] e4m3 with
    w_scales [ceil(N/128), ceil(K/128)] (the forward's 128x128 quantisation of W, reused: the 128x128
    quantisation of W^T is exactly (w_fp8.t(), w_scales.t())). W^T is made K-contiguous for the kernel.
    """
    return fp8_gemm_blockwise(g_fp8, g_scales, w_fp8.t().contiguous(), w_scales.t().contiguous(), out_dtype, config)


# ----------------------------------------------------------------------------------------------------------
# references: dequantise, matmul in fp32
# ----------------------------------------------------------------------------------------------------------
def fp8_gemm_blockwise_ref(a_fp8, a_scales, b_fp8, b_scales, out_dtype=torch.bfloat16):
    """Reference for fp8_gemm_blockwise: dequant_1x128(a) @ dequant_128x128(b)^T in fp32, cast to out_dtype."""
    return (dequant_1x128(a_fp8, a_scales) @ dequant_128x128(b_fp8, b_scales).t()).to(out_dtype)


def fp8_gemm_1x128_1x128_ref(a_fp8, a_scales, b_fp8, b_scales, out_dtype=torch.float32):
    """Reference for fp8_gemm_1x128_1x128 (fp32 dequantise + matmul)."""
    return (dequant_1x128(a_fp8, a_scales) @ dequant_1x128(b_fp8, b_scales).t()).to(out_dtype)


def fp8_gemm_dgrad_ref(g_fp8, g_scales, w_fp8, w_scales, out_dtype=torch.bfloat16):
    """Reference for fp8_gemm_dgrad: dequant(G) @ dequant(W) in fp32."""
    return (dequant_1x128(g_fp8, g_scales) @ dequant_128x128(w_fp8, w_scales)).to(out_dtype)


# ----------------------------------------------------------------------------------------------------------
# grouped GEMMs (MoE experts, rows sorted by expert; no host sync)
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _fp8_gemm_grouped_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, tg_ptr, ts_ptr, te_ptr,
    N, K, E,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K mask anywhere
    UPCAST_DOT: tl.constexpr, EXACT_CAST: tl.constexpr, OUT_BF16: tl.constexpr,
    SPLIT_N: tl.constexpr = False, PIPE: tl.constexpr = False,  # as in _fp8_gemm_kernel
):
    # C[rows of tile t] = A[rows of tile t] @ B[group(t)]^T; one BLOCK_M-row part (BLOCK_M divides 128) of one
    # 128-row tile (of one group) per program
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    t = pid_t // (128 // BLOCK_M)
    # empty (sub-)tiles run no K loop; their group index may be E (no such expert): clamped for addressing only
    g = tl.minimum(tl.load(tg_ptr + t), E - 1).to(tl.int64)
    rs = tl.load(ts_ptr + t) + (pid_t % (128 // BLOCK_M)) * BLOCK_M
    re = tl.load(te_ptr + t)
    nonempty = re > rs
    offs_m = rs + tl.arange(0, BLOCK_M)
    # rows past the tile's end / N are clamped onto valid rows (results discarded by the masked store)
    offs_am = tl.maximum(tl.minimum(offs_m, re - 1), 0)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    as_ptrs = as_ptr + offs_am * stride_asm
    b_ptr += g * stride_be
    bs_ptr += g * stride_bse
    k_full = tl.where(nonempty, K // BLOCK_K, 0)
    k_last = K // BLOCK_K
    k_left = tl.where(nonempty, K - k_last * BLOCK_K, 0)  # empty tiles: the tail's K mask is all off (no loads)
    row_ok = (offs_m < re)[:, None]
    c_rows = c_ptr + offs_m[:, None] * stride_cm
    if SPLIT_N:
        acc0, acc1, offs_n0, offs_n1 = _fp8_split_n_tile(
            a_ptrs, as_ptrs, b_ptr, bs_ptr, pid_n, N, offs_k, stride_ak, stride_bn, stride_bk, stride_ask, stride_bsn,
            stride_bsk, k_full, k_last, k_left, True, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST_DOT, PIPE)
        _store_c_halves(c_rows, acc0, acc1, offs_n0, offs_n1, row_ok, N, stride_cn, EXACT_CAST, OUT_BF16)
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_bn = offs_n % N
        b_ptrs = b_ptr + offs_bn[:, None] * stride_bn + offs_k[None, :] * stride_bk
        bs_ptrs, bs_hi_ptrs = _b_scale_ptrs(bs_ptr, pid_n, offs_bn, N, stride_bsn, True, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _fp8_k_loop(acc, a_ptrs, b_ptrs, as_ptrs, bs_ptrs, bs_hi_ptrs, 0, k_full,
                          stride_ak, stride_bk, stride_ask, stride_bsk, True, BLOCK_N, BLOCK_K, UPCAST_DOT, PIPE)
        if not EVEN_K:  # the partial last K tile
            acc = _fp8_k_tile(acc, a_ptrs + k_last * (BLOCK_K * stride_ak), b_ptrs + k_last * (BLOCK_K * stride_bk),
                              as_ptrs + k_last * stride_ask, bs_ptrs + k_last * stride_bsk,
                              bs_hi_ptrs + k_last * stride_bsk, k_left, True, BLOCK_N, BLOCK_K, True, UPCAST_DOT)
        _store_c(c_rows + offs_n[None, :] * stride_cn, acc, row_ok & (offs_n < N)[None, :], EXACT_CAST, OUT_BF16)


@triton.jit
def _fp8_wgrad_grouped_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, gts_ptr,
    N, K,
    stride_an, stride_bk, stride_ce, stride_cn, stride_ck, stride_asn, stride_bsk, stride_ast, stride_bst,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr, EXACT_CAST: tl.constexpr, OUT_BF16: tl.constexpr,
    SPLIT_N: tl.constexpr = False, PIPE: tl.constexpr = False,  # as in _fp8_gemm_kernel
):
    # C[g] = A[:, tiles of g] @ B[:, tiles of g]^T over the tile-padded token layout (128 columns per tile):
    # the shared K loop with K = tokens, the 1x128 scales per row of A and B, no K mask (tiles are full).
    # Scales: element (row, tile) at row * stride_?sn + tile * stride_?st (the launcher passes them row-contiguous,
    # stride_?sn == 1, so each tile's [BLOCK_M] / [BLOCK_N] scale loads are contiguous vectors, not gathers)
    pid = tl.program_id(0)
    g = tl.program_id(1)
    num_pid_m = tl.cdiv(N, BLOCK_M)
    num_pid_n = tl.cdiv(K, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # rows of A (output features N)
    offs_am = offs_m % N
    offs_t = tl.arange(0, 128)
    t0 = tl.load(gts_ptr + g).to(tl.int64)
    t1 = tl.load(gts_ptr + g + 1).to(tl.int64)
    a_ptrs = a_ptr + offs_am[:, None] * stride_an + offs_t[None, :]
    as_ptrs = as_ptr + offs_am * stride_asn
    row_ok = (offs_m < N)[:, None]
    c_rows = c_ptr + g.to(tl.int64) * stride_ce + offs_m[:, None] * stride_cn
    if SPLIT_N:
        tl.static_assert(BLOCK_N >= 32, "SPLIT_N: BLOCK_N must be >= 32")
        HALF: tl.constexpr = BLOCK_N // 2
        offs_n0 = pid_n * BLOCK_N + tl.arange(0, HALF)   # rows of B (input features K)
        offs_n1 = offs_n0 + HALF
        offs_bn0 = offs_n0 % K
        offs_bn1 = offs_n1 % K
        acc0 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        acc0, acc1 = _fp8_k_loop_split(acc0, acc1, a_ptrs, b_ptr + offs_bn0[:, None] * stride_bk + offs_t[None, :],
                                       b_ptr + offs_bn1[:, None] * stride_bk + offs_t[None, :], as_ptrs,
                                       bs_ptr + offs_bn0 * stride_bsk, bs_ptr + offs_bn1 * stride_bsk, t0, t1,
                                       1, 1, stride_ast, stride_bst, False, HALF, 128, UPCAST_DOT, PIPE)
        _store_c_halves(c_rows, acc0, acc1, offs_n0, offs_n1, row_ok, K, stride_ck, EXACT_CAST, OUT_BF16)
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # rows of B (input features K)
        offs_bn = offs_n % K
        b_ptrs = b_ptr + offs_bn[:, None] * stride_bk + offs_t[None, :]
        bs_ptrs = bs_ptr + offs_bn * stride_bsk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _fp8_k_loop(acc, a_ptrs, b_ptrs, as_ptrs, bs_ptrs, bs_ptrs, t0, t1, 1, 1, stride_ast, stride_bst,
                          False, BLOCK_N, 128, UPCAST_DOT, PIPE)
        _store_c(c_rows + offs_n[None, :] * stride_ck, acc, row_ok & (offs_n < K)[None, :], EXACT_CAST, OUT_BF16)


def _grouped_gpu_configs():
    """Autotune candidates of the grouped kernel: (BLOCK_M (divides the 128-row tile), BLOCK_N, warps, stages)."""
    return [_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn) for bm, bn, w, s in [
        # H200 sweep at 8 experts x 2048 x 7168: 128x128 w8 s5 759 TFLOP/s, 128x256 (plain or SPLIT_N) <= 482
        (128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 8, 5), (64, 256, 8, 4), (64, 128, 4, 4), (128, 64, 4, 4)]] + [
        _cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, **_variant(v)) for bm, bn, w, s, v in [
            (128, 256, 8, 3, "S"), (128, 256, 8, 4, "S"), (128, 128, 8, 4, "P")]
        if _variants_autotuned()]


def _wgrad_gpu_configs():
    """Autotune candidates of the grouped wgrad kernel (GROUP_M 8)."""
    return [_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8) for bm, bn, w, s in [
        (128, 256, 8, 3), (128, 256, 8, 4), (256, 128, 8, 3), (128, 128, 8, 3), (128, 128, 8, 4),
        (128, 128, 8, 5), (64, 256, 4, 4), (64, 128, 4, 4)]]


def _prune_grouped(configs, named_args, **kwargs):
    return _prune(configs, 128, named_args["N"])


def _prune_wgrad(configs, named_args, **kwargs):
    return _prune(configs, named_args["N"], named_args["K"])


_fp8_gemm_grouped_tuned = _fp8_gemm_grouped_kernel if INTERPRETED else triton.autotune(
    configs=_grouped_gpu_configs(), key=["N", "K"],
    prune_configs_by={"early_config_prune": _prune_grouped}, **_autotune_kwargs())(_fp8_gemm_grouped_kernel)
_fp8_wgrad_grouped_tuned = _fp8_wgrad_grouped_kernel if INTERPRETED else triton.autotune(
    configs=_wgrad_gpu_configs(), key=["N", "K"],
    prune_configs_by={"early_config_prune": _prune_wgrad}, **_autotune_kwargs())(_fp8_wgrad_grouped_kernel)


def _check_common(name, a, b, a_s, b_s, out_dtype):
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise TypeError(f"{name}: a and b must be float8_e4m3fn, got {a.dtype} and {b.dtype}")
    if a_s.dtype != torch.float32 or b_s.dtype != torch.float32:
        raise TypeError(f"{name}: scales must be float32, got {a_s.dtype} and {b_s.dtype}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"{name}: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    if not (a.is_cuda and b.is_cuda) and not INTERPRETED:
        raise RuntimeError(f"{name}: Triton kernels need CUDA tensors (got {a.device}); set TRITON_INTERPRET=1 "
                           "before importing kernels.fp8_gemm to run on CPU, or use the *_ref functions")


def fp8_gemm_grouped(a_fp8: torch.Tensor, a_scales: torch.Tensor, b_fp8: torch.Tensor, b_scales: torch.Tensor,
                     tiles: GroupedTiles, out_dtype: torch.dtype = torch.bfloat16,
                     config: dict | None = None) -> torch.Tensor:
    """Grouped block-scaled GEMM: C[rows of group e] = A[rows of e] @ B[e]^T, rows of A sorted by group.

    a_fp8 [M, K] e4m3 with 1x128 a_scales [M, ceil(K/128)] (quant_1x128 or the grouped quantiser);
    b_fp8 [E, N, K] e4m3 with 128x128 b_scales [E, ceil(N/128), ceil(K/128)] (quant_128x128 of [E, N, K]);
    tiles: grouped_tiles(counts, M). No host sync. Used for the experts' forward (B = W) and dgrad
    (B = W^T per expert: ``b_fp8.transpose(1, 2).contiguous()``, ``b_scales.transpose(1, 2).contiguous()``).
    ``config`` (optional): fixed {BLOCK_M (dividing 128), BLOCK_N (<= 256), num_warps, num_stages, SPLIT_N, PIPE}
    instead of autotuning.
    """
    name = "fp8_gemm_grouped"
    _check_common(name, a_fp8, b_fp8, a_scales, b_scales, out_dtype)
    M, K = a_fp8.shape
    if b_fp8.dim() != 3 or b_fp8.shape[2] != K or b_fp8.shape[0] != tiles.n_groups:
        raise ValueError(f"{name}: b must be [E={tiles.n_groups}, N, K={K}], got {tuple(b_fp8.shape)}")
    E, N, _ = b_fp8.shape
    kt = triton.cdiv(K, TILE)
    if tuple(a_scales.shape) != (M, kt):
        raise ValueError(f"{name}: a_scales {tuple(a_scales.shape)} != {(M, kt)}")
    if tuple(b_scales.shape) != (E, triton.cdiv(N, TILE), kt):
        raise ValueError(f"{name}: b_scales {tuple(b_scales.shape)} != {(E, triton.cdiv(N, TILE), kt)}")
    c = torch.empty((M, N), dtype=out_dtype, device=a_fp8.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    args = (a_fp8, b_fp8, c, a_scales, b_scales, tiles.tile_group, tiles.tile_start, tiles.tile_end, N, K, E,
            a_fp8.stride(0), a_fp8.stride(1), b_fp8.stride(0), b_fp8.stride(1), b_fp8.stride(2), c.stride(0),
            c.stride(1), a_scales.stride(0), a_scales.stride(1), b_scales.stride(0), b_scales.stride(1),
            b_scales.stride(2))
    common = dict(BLOCK_K=TILE, EVEN_K=K % TILE == 0, UPCAST_DOT=INTERPRETED and _UPCAST_DOT_INTERPRETED,
                  EXACT_CAST=INTERPRETED, OUT_BF16=out_dtype == torch.bfloat16)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), tiles.n_tiles * (TILE // meta["BLOCK_M"]))
    if INTERPRETED or config is not None or not _autotune():
        cfg = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
        if config is not None:
            _check_config(name, config, ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "SPLIT_N", "PIPE"),
                          max_m=TILE)
            cfg.update(config)
        _fp8_gemm_grouped_kernel[grid(cfg)](*args, **common, **cfg)
    else:
        _fp8_gemm_grouped_tuned[grid](*args, **common)
    return c


def fp8_gemm_grouped_wgrad(a_fp8: torch.Tensor, a_scales: torch.Tensor, b_fp8: torch.Tensor, b_scales: torch.Tensor,
                           tiles: GroupedTiles, out_dtype: torch.dtype = torch.float32,
                           config: dict | None = None) -> torch.Tensor:
    """Grouped weight gradient: C[e] = A[:, tokens of e] @ B[:, tokens of e]^T -> [E, N, K].

    a_fp8 [N, T*128], a_scales [N, T]; b_fp8 [K, T*128], b_scales [K, T]: the tile-padded transposed outputs
    of quant_1x128_with_transpose_grouped (grad_out^T and x^T; T = tiles.n_tiles), 1x128 tiles along tokens
    that never cross experts. Experts without tokens get zeros. No host sync.
    ``config`` (optional): fixed {BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages, SPLIT_N, PIPE} instead of
    autotuning.
    """
    name = "fp8_gemm_grouped_wgrad"
    _check_common(name, a_fp8, b_fp8, a_scales, b_scales, out_dtype)
    T = tiles.n_tiles
    N, K = a_fp8.shape[0], b_fp8.shape[0]
    if a_fp8.shape[1] != T * TILE or b_fp8.shape[1] != T * TILE:
        raise ValueError(f"{name}: a and b must be [*, n_tiles*128={T * TILE}], got {tuple(a_fp8.shape)} and "
                         f"{tuple(b_fp8.shape)}")
    if tuple(a_scales.shape) != (N, T) or tuple(b_scales.shape) != (K, T):
        raise ValueError(f"{name}: scales must be [N, T]={(N, T)} and [K, T]={(K, T)}, got "
                         f"{tuple(a_scales.shape)} and {tuple(b_scales.shape)}")
    if a_fp8.stride(1) != 1 or b_fp8.stride(1) != 1:
        raise ValueError(f"{name}: a and b must be contiguous along tokens")
    E = tiles.n_groups
    c = torch.empty((E, N, K), dtype=out_dtype, device=a_fp8.device)
    if E == 0 or N == 0 or K == 0:
        return c
    # the scales row-contiguous ([N, T] with strides (1, N)): per token tile the kernel loads a contiguous vector
    a_s, b_s = a_scales.t().contiguous().t(), b_scales.t().contiguous().t()
    args = (a_fp8, b_fp8, c, a_s, b_s, tiles.group_tile_start, N, K, a_fp8.stride(0), b_fp8.stride(0),
            c.stride(0), c.stride(1), c.stride(2), a_s.stride(0), b_s.stride(0), a_s.stride(1), b_s.stride(1))
    common = dict(UPCAST_DOT=INTERPRETED and _UPCAST_DOT_INTERPRETED, EXACT_CAST=INTERPRETED,
                  OUT_BF16=out_dtype == torch.bfloat16)
    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]), E)
    if INTERPRETED or config is not None or not _autotune():
        cfg = dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3)
        if config is not None:
            _check_config(name, config)
            cfg.update(config)
        _fp8_wgrad_grouped_kernel[grid(cfg)](*args, **common, **cfg)
    else:
        _fp8_wgrad_grouped_tuned[grid](*args, **common)
    return c


def fp8_gemm_grouped_ref(a_fp8, a_scales, b_fp8, b_scales, tiles: GroupedTiles, out_dtype=torch.bfloat16):
    """Reference of fp8_gemm_grouped: per group, dequantise and matmul in fp32 (reads the tiles on the host)."""
    M = a_fp8.shape[0]
    a = dequant_1x128(a_fp8, a_scales)
    out = torch.zeros((M, b_fp8.shape[1]), dtype=torch.float32, device=a_fp8.device)
    gts = tiles.group_tile_start.tolist()
    starts, ends = tiles.tile_start.tolist(), tiles.tile_end.tolist()
    for e in range(tiles.n_groups):
        if gts[e + 1] > gts[e]:
            r0, r1 = starts[gts[e]], ends[gts[e + 1] - 1]
            out[r0:r1] = a[r0:r1] @ dequant_128x128(b_fp8[e], b_scales[e]).t()
    return out.to(out_dtype)


def fp8_gemm_grouped_wgrad_ref(a_fp8, a_scales, b_fp8, b_scales, tiles: GroupedTiles, out_dtype=torch.float32):
    """Reference of fp8_gemm_grouped_wgrad (fp32 dequantise + matmul per group over its padded tiles)."""
    def deq(q, s):
        return q.float().view(q.shape[0], -1, TILE) * s[:, :, None]
    a, b = deq(a_fp8, a_scales), deq(b_fp8, b_scales)
    gts = tiles.group_tile_start.tolist()
    out = [a[:, gts[e]:gts[e + 1]].reshape(a.shape[0], -1) @ b[:, gts[e]:gts[e + 1]].reshape(b.shape[0], -1).t()
           for e in range(tiles.n_groups)]
    if not out:
        return torch.empty((0, a_fp8.shape[0], b_fp8.shape[0]), dtype=out_dtype, device=a_fp8.device)
    return torch.stack(out).to(out_dtype)
