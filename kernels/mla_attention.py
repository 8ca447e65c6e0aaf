"""Flash-attention-style causal attention for Multi-Head Latent Attention (MLA), in Triton.

MLA (DeepSeek-V2, Liu et al. 2024, section 2.1) gives every head a query/key of
``Dqk = qk_nope_head_dim + qk_rope_head_dim`` (e.g. 128 + 64 = 192) and a value of a *different* head dim
``Dv`` (e.g. 128). FlashAttention's fused kernels in PyTorch refuse ``Dqk != Dv``; this module implements
FlashAttention-2 (Dao, 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning") for that case:

* forward: one program per (query block, batch*head); online softmax over key blocks; stores the output
  and the row log-sum-exp ``LSE`` [B, H, T] (fp32, base 2 of the log2(e)-scaled scores, so the backward
  recomputes ``P = exp2(q.k * scale * log2(e) - LSE)`` with one FMA per score) -- never a T x T matrix;
* backward: a preprocess kernel ``delta = rowsum(dO * O)``, a dK/dV kernel (one program per key block,
  looping over query blocks) and a dQ kernel (one program per query block, looping over key blocks).
  No atomics: the result is deterministic. Opt-in (``AttentionConfig.bwd_fused``, or the environment variable
  ``MOETRAIN_MLA_BWD_FUSED=1``): FlashAttention-2's fused backward -- the dK/dV kernel also adds each key
  block's dQ share into an fp32 buffer with atomic adds (5 matmuls per tile instead of 7); dQ's summation
  order, hence its last bits, is then nondeterministic.

The q.k product is split into a "nope" part and a "rope" part, ``q.k = q_nope.k_nope + q_pe.k_pe``, computed
as two ``tl.dot`` calls on power-of-two-or-masked head-dim blocks (192 = 128 + 64 needs no padding at all).
Masks cost only where needed: under causal, only the blocks that straddle the diagonal apply the causal mask
(forward and dQ: key blocks; dK/dV: query blocks), all others run unmasked; bounds masks on loads/stores and
the tail loops exist only when T is not a multiple of the block (``EVEN_M`` / ``EVEN_N`` constexprs). The
score product and the mask are jit helpers shared by the three kernels (``_scores_t``, ``_mask_scores``).

Because the two parts are read through separate pointers, the kernel also accepts them as separate tensors,
and the rope key ``k_pe`` may be shared by all heads (shape [B, 1, T, Dr], read with a head stride of 0, never
materialised per head): see :func:`mla_attention_split`. Its gradient is then summed over heads.

Public API
----------
``mla_attention(q, k, v, causal=True, softmax_scale=None) -> o``      (also usable as the model's ``attn_core``)
``mla_attention_split(q_nope, q_pe, k_nope, k_pe, v, causal=True, softmax_scale=None) -> o``
``mla_attention_ref(q, k, v, causal=True, softmax_scale=None) -> o``  (pure torch, fp32 math)
``MLAAttentionFunction`` / ``MLAAttentionSplitFunction`` (torch.autograd.Function)
``get_config(dqk, dv, device, ...) -> AttentionConfig``               (block sizes / warps / stages)

Numerics: every accumulator (scores, softmax statistics, output, dQ/dK/dV) is fp32. On the GPU the matmul
operands are the input dtype (bf16 tensor cores; ``P`` and ``dS`` are rounded to bf16 before their matmuls,
as in FlashAttention-2); fp32 inputs use IEEE fp32 dots. Under ``TRITON_INTERPRET=1`` (CPU tests) every
loaded tile is upcast to fp32 first, because the interpreter computes bf16 arithmetic wrongly.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import new_empty, poisoned

__all__ = [
    "AttentionConfig",
    "MLAAttentionFunction",
    "MLAAttentionSplitFunction",
    "get_config",
    "mla_attention",
    "mla_attention_ref",
    "mla_attention_split",
    "split_head_dim",
]

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Set by benchmarks to try other launch configurations; None = use get_config().
CONFIG_OVERRIDE: "AttentionConfig | None" = None


# ----------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionConfig:
    """Block sizes and launch parameters of the three kernels (forward, dK/dV, dQ).

    Block sizes must be powers of two >= 16 (``tl.dot`` minimum). Any combination is correct; they only
    change speed (and shared-memory / register use on the GPU).
    """

    fwd_block_m: int = 128
    fwd_block_n: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 4
    kv_block_m: int = 64   # dK/dV kernel: query rows per inner step
    kv_block_n: int = 128  # dK/dV kernel: keys per program
    kv_warps: int = 8
    kv_stages: int = 2
    q_block_m: int = 128   # dQ kernel: query rows per program
    q_block_n: int = 64    # dQ kernel: keys per inner step
    q_warps: int = 8
    q_stages: int = 3
    pre_block_m: int = 64  # delta = rowsum(dO * O) preprocess
    # Fused backward (opt-in): one kernel per key block computes dK, dV and dQ (dQ by fp32 atomic adds,
    # so dQ's summation order -- and its last bits -- are nondeterministic); 5 instead of 7 matmuls per tile.
    bwd_fused: bool = False
    fused_block_m: int = 0   # fused kernel: query rows per inner step (0: kv_block_m)
    fused_block_n: int = 0   # fused kernel: keys per program (0: kv_block_n)
    fused_warps: int = 0     # 0: kv_warps
    fused_stages: int = 0    # 0: kv_stages

    def fused_launch(self) -> tuple[int, int, int, int]:
        """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the fused backward kernel."""
        return (self.fused_block_m or self.kv_block_m, self.fused_block_n or self.kv_block_n,
                self.fused_warps or self.kv_warps, self.fused_stages or self.kv_stages)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def get_config(dqk: int, dv: int, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.bfloat16, interpret: bool | None = None,
               split: tuple[int, int] | None = None) -> AttentionConfig:
    """Pick block sizes for head dims ``dqk`` (q/k; nope + rope ``split``, default split_head_dim(dqk)) and
    ``dv`` (v) for inputs of ``dtype`` on ``device``.

    * Triton interpreter (CPU tests): 16 x 16 blocks, so tests at T ~ 50 exercise several blocks,
      partial blocks and the causal diagonal.
    * GPU: tiers by the bytes of one row of the padded q/k/v head-dim blocks (a proxy for shared memory and
      registers). bf16 DeepSeek dims (128 + 64, 128) on Hopper: forward BLOCK_M 128 x BLOCK_N 64, 8 warps,
      3 stages; dK/dV 64 (q rows per step) x 128 (keys per program), 8 warps, 3 stages; dQ 128 (q rows per
      program) x 64 (keys per step), 8 warps, 3 stages -- the best of a sweep on an H200 (torch 2.11,
      triton 3.6, B=1, H=128, T=4096 causal; benchmarks/bench_attention.py --sweep, 2026-11-30: fwd+bwd
      6.36 ms vs 6.59 ms with the previous 4 / 2 stages). Pre-Hopper GPUs get a
      smaller, untuned config that fits 99 KB of shared memory. fp32 inputs and the absorbed-MLA dims
      (512 + 64, 512) get smaller blocks and fewer stages so they fit in shared memory.

    Backward mode: the two-kernel backward (dK/dV, then dQ; deterministic) unless ``bwd_fused`` -- set by
    the environment variable ``MOETRAIN_MLA_BWD_FUSED=1`` (read at each call) or by ``CONFIG_OVERRIDE`` --
    selects the fused one-kernel backward (dQ by fp32 atomic adds: nondeterministic summation order). Its
    blocks (``fused_*``: query rows per step x keys per program) default to the dK/dV kernel's; the Hopper
    tier sets 64 x 64, 8 warps, 3 stages (chosen from an offline compile, not yet timed).

    ``CONFIG_OVERRIDE`` (module attribute), when set, wins.
    """
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE
    cfg = _default_config(dqk, dv, device, dtype, interpret, split)
    if os.environ.get("MOETRAIN_MLA_BWD_FUSED", "0") not in ("", "0", "false", "False"):
        cfg = dataclasses.replace(cfg, bwd_fused=True)
    return cfg


def _default_config(dqk: int, dv: int, device, dtype: torch.dtype, interpret: bool | None,
                    split: tuple[int, int] | None) -> AttentionConfig:
    if interpret is None:
        interpret = _interpreting()
    if interpret:
        return AttentionConfig(16, 16, 4, 1, 16, 16, 4, 1, 16, 16, 4, 1, 16)
    major = 9
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        major = torch.cuda.get_device_capability(device)[0]
    dn, dr = split if split is not None else split_head_dim(dqk)
    width = (_block(dn) + (_block(dr) if dr else 0) + _block(dv)) * dtype.itemsize // 2
    if width <= 384 and major >= 9:   # bf16 / fp16 (128 + 64, 128) on Hopper (227 KB shared memory)
        # fused backward (untimed): 64 x 64, 8 warps, 3 stages. The dK/dV kernel's 64 x 128 x 3 stages would
        # need ~249 KB of shared memory once fused. Offline sm_90a compile (ptxas, Triton 3.9): 64 x 64 x 3
        # uses 201 KB, spills ~180 B/thread (the dK/dV default spills ~240) and runs every dot on wgmma;
        # BLOCK_M 32 or 16 (no / little spilling) puts the dQ dot (M = BLOCK_M < 64) on mma.sync.
        return AttentionConfig(128, 64, 8, 3, 64, 128, 8, 3, 128, 64, 8, 3, 64,
                               fused_block_m=64, fused_block_n=64, fused_warps=8, fused_stages=3)
    if width <= 384:   # pre-Hopper (99-163 KB shared memory): conservative, not tuned
        return AttentionConfig(64, 32, 4, 2, 32, 64, 4, 2, 64, 32, 4, 2, 64)
    if width <= 768:   # fp32 (128 + 64, 128)
        return AttentionConfig(64, 32, 4, 2, 32, 32, 4, 1, 32, 32, 4, 1, 64)
    if width <= 1280:  # bf16 absorbed MLA (512 + 64, 512)
        return AttentionConfig(64, 32, 8, 1, 16, 32, 8, 1, 32, 16, 8, 1, 32)
    return AttentionConfig(32, 16, 4, 1, 16, 16, 4, 1, 16, 16, 4, 1, 16)


def split_head_dim(dqk: int) -> tuple[int, int]:
    """Split a q/k head dim into (nope, rope) parts for two dot products: the largest power of two
    <= dqk, and the rest (192 -> 128 + 64, 24 -> 16 + 8, 40 -> 32 + 8, 576 -> 512 + 64, 128 -> 128 + 0).
    The split is a memory-layout choice only; the math is the same for any split."""
    if dqk <= 0:
        raise ValueError(f"head dim must be positive, got {dqk}")
    dn = 1 << (dqk.bit_length() - 1)
    return dn, dqk - dn


def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(max(d, 1)))


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _load2d(ptrs, rmask, cmask, USE_R: tl.constexpr, USE_C: tl.constexpr, UPCAST: tl.constexpr):
    """Load a 2-D tile; masks only where needed (constexpr); optionally upcast to fp32."""
    if USE_R:
        if USE_C:
            x = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rmask[:, None], other=0.0)
    else:
        if USE_C:
            x = tl.load(ptrs, mask=cmask[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store2d(ptrs, x, rmask, cmask, USE_R: tl.constexpr, USE_C: tl.constexpr):
    """Store a 2-D tile in the pointers' dtype; masks only where needed (constexpr)."""
    x = x.to(ptrs.dtype.element_ty)
    if USE_R:
        if USE_C:
            tl.store(ptrs, x, mask=rmask[:, None] & cmask[None, :])
        else:
            tl.store(ptrs, x, mask=rmask[:, None])
    else:
        if USE_C:
            tl.store(ptrs, x, mask=cmask[None, :])
        else:
            tl.store(ptrs, x)


@triton.jit
def _load1d(ptrs, mask, USE: tl.constexpr):
    if USE:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _load_split(Xn, Xr, offs, s_n_t, s_r_t, ok, offs_dn, offs_dr, CHECK_ROWS: tl.constexpr, HAS_PE: tl.constexpr,
                DN: tl.constexpr, DR: tl.constexpr, BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr,
                UPCAST: tl.constexpr):
    """Rows ``offs`` of a q or k head split in its nope part [., DN] and rope part [., DR] (the nope block stands
    in for the rope one when there is none, and is never used as such)."""
    x_n = _load2d(Xn + offs[:, None] * s_n_t + offs_dn[None, :], ok, offs_dn < DN, CHECK_ROWS, BLOCK_DN != DN, UPCAST)
    if HAS_PE:
        x_r = _load2d(Xr + offs[:, None] * s_r_t + offs_dr[None, :], ok, offs_dr < DR, CHECK_ROWS, BLOCK_DR != DR,
                      UPCAST)
    else:
        x_r = x_n
    return x_n, x_r


@triton.jit
def _store_split(Xn, Xr, offs, s_n_t, s_r_t, x_n, x_r, scale, ok, offs_dn, offs_dr, CHECK_ROWS: tl.constexpr,
                 HAS_PE: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, BLOCK_DN: tl.constexpr,
                 BLOCK_DR: tl.constexpr):
    """Store ``scale`` times a (nope, rope) gradient pair at rows ``offs`` (the rope part only with HAS_PE)."""
    _store2d(Xn + offs[:, None] * s_n_t + offs_dn[None, :], x_n * scale, ok, offs_dn < DN, CHECK_ROWS, BLOCK_DN != DN)
    if HAS_PE:
        _store2d(Xr + offs[:, None] * s_r_t + offs_dr[None, :], x_r * scale, ok, offs_dr < DR, CHECK_ROWS,
                 BLOCK_DR != DR)


@triton.jit
def _scores_t(a_n, a_r, Bn, Br, s_bn, s_br, offs_c, offs_dn, offs_dr, c_ok,
              CHECK_C: tl.constexpr, HAS_PE: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr,
              BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Unscaled scores ``a_n @ Bn[offs_c]^T + a_r @ Br[offs_c]^T`` [rows of a, BLOCK_C] (q.k split into its nope
    and rope parts). The B tiles are loaded transposed ([BLOCK_D, BLOCK_C]; rows ``offs_c`` masked by ``c_ok``
    only if CHECK_C) and returned for reuse by the caller (``b_r`` is ``b_n`` without a rope part).
    Shared by the forward (q vs K), dQ (q vs K) and dK/dV (k vs Q) loops."""
    b_n = _load2d(Bn + offs_c[None, :] * s_bn + offs_dn[:, None], offs_dn < DN, c_ok,
                  BLOCK_DN != DN, CHECK_C, UPCAST)
    s = tl.dot(a_n, b_n, input_precision=PREC)
    if HAS_PE:
        b_r = _load2d(Br + offs_c[None, :] * s_br + offs_dr[:, None], offs_dr < DR, c_ok,
                      BLOCK_DR != DR, CHECK_C, UPCAST)
        s = tl.dot(a_r, b_r, s, input_precision=PREC)
    else:
        b_r = b_n
    return s, b_n, b_r


@triton.jit
def _mask_scores(s, offs_q, offs_k, T, Q_ROWS: tl.constexpr, CHECK_Q: tl.constexpr, CHECK_K: tl.constexpr,
                 CAUSAL: tl.constexpr):
    """``s`` with -inf where key > query (CAUSAL), query >= T (CHECK_Q) or key >= T (CHECK_K; implied by the
    causal mask for every query < T, so only applied without it). Q_ROWS: ``s`` is [queries, keys], else
    [keys, queries] (the dK/dV kernel's transposed scores). Call only with at least one mask on."""
    if Q_ROWS:
        q = offs_q[:, None]
        k = offs_k[None, :]
    else:
        q = offs_q[None, :]
        k = offs_k[:, None]
    if CAUSAL:
        valid = q >= k
        if CHECK_Q:
            valid = valid & (q < T)
    elif CHECK_K:
        valid = k < T
        if CHECK_Q:
            valid = valid & (q < T)
    else:
        valid = q < T
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _fwd_inner(acc, l_i, m_i, q_n, q_r, Kn, Kr, V, s_kn_t, s_kr_t, s_v_t,
               offs_m, offs_dn, offs_dr, offs_dv, lo, hi, T, qk_scale,
               MASK: tl.constexpr, CHECK_N: tl.constexpr, CAUSAL: tl.constexpr, SCALE_POS: tl.constexpr,
               HAS_PE: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
               BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Online softmax over key blocks [lo, hi). MASK: apply the causal / key-range mask (diagonal and tail
    blocks only); CHECK_N: keys may reach past T (bounds-masked loads)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    dv_ok = offs_dv < DV
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < T
        s, kt_n, kt_r = _scores_t(q_n, q_r, Kn, Kr, s_kn_t, s_kr_t, offs_n, offs_dn, offs_dr, n_ok,
                                  CHECK_N, HAS_PE, DN, DR, BLOCK_DN, BLOCK_DR, UPCAST, PREC)
        if MASK:
            s = _mask_scores(s * qk_scale, offs_m, offs_n, T, True, False, CHECK_N, CAUSAL)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
        else:
            # scale folded into one FMA per score: max_j(c * s_j) = c * max_j s_j for c >= 0 (c * min for c < 0)
            if SCALE_POS:
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            else:
                m_new = tl.maximum(m_i, tl.min(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load2d(V + offs_n[:, None] * s_v_t + offs_dv[None, :], n_ok, dv_ok,
                    CHECK_N, BLOCK_DV != DV, UPCAST)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _mla_attn_fwd_kernel(
    Qn, Qr, Kn, Kr, V, O, LSE,
    s_qn_b, s_qn_h, s_qn_t, s_qr_b, s_qr_h, s_qr_t,
    s_kn_b, s_kn_h, s_kn_t, s_kr_b, s_kr_h, s_kr_t,
    s_v_b, s_v_h, s_v_t, s_o_b, s_o_h, s_o_t,
    H, T, sm_scale,
    CAUSAL: tl.constexpr, HAS_PE: tl.constexpr, SCALE_POS: tl.constexpr,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    # heaviest (last, under causal) query blocks first: better tail balance
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Qn += b * s_qn_b + h * s_qn_h
    Qr += b * s_qr_b + h * s_qr_h
    Kn += b * s_kn_b + h * s_kn_h
    Kr += b * s_kr_b + h * s_kr_h
    V += b * s_v_b + h * s_v_h
    O += b * s_o_b + h * s_o_h
    LSE += pid_bh.to(tl.int64) * T

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dn = tl.arange(0, BLOCK_DN)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < T

    q_n, q_r = _load_split(Qn, Qr, offs_m, s_qn_t, s_qr_t, m_ok, offs_dn, offs_dr, not EVEN_M, HAS_PE, DN, DR,
                           BLOCK_DN, BLOCK_DR, UPCAST)

    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    if CAUSAL:
        # key blocks [0, full_end) lie entirely at/below the diagonal: no mask; [full_end, hi) straddle it
        full_end = ((start_m + 1) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M, T)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_n, q_r, Kn, Kr, V, s_kn_t, s_kr_t, s_v_t,
                                   offs_m, offs_dn, offs_dr, offs_dv, 0, full_end, T, qk_scale,
                                   False, False, True, SCALE_POS, HAS_PE, DN, DR, DV,
                                   BLOCK_DN, BLOCK_DR, BLOCK_DV, BLOCK_N, UPCAST, PREC)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_n, q_r, Kn, Kr, V, s_kn_t, s_kr_t, s_v_t,
                                   offs_m, offs_dn, offs_dr, offs_dv, full_end, hi, T, qk_scale,
                                   True, not EVEN_N, True, SCALE_POS, HAS_PE, DN, DR, DV,
                                   BLOCK_DN, BLOCK_DR, BLOCK_DV, BLOCK_N, UPCAST, PREC)
    else:
        full_end = (T // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_n, q_r, Kn, Kr, V, s_kn_t, s_kr_t, s_v_t,
                                   offs_m, offs_dn, offs_dr, offs_dv, 0, full_end, T, qk_scale,
                                   False, False, False, SCALE_POS, HAS_PE, DN, DR, DV,
                                   BLOCK_DN, BLOCK_DR, BLOCK_DV, BLOCK_N, UPCAST, PREC)
        if not EVEN_N:  # the partial last key block
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_n, q_r, Kn, Kr, V, s_kn_t, s_kr_t, s_v_t,
                                       offs_m, offs_dn, offs_dr, offs_dv, full_end, T, T, qk_scale,
                                       True, True, False, SCALE_POS, HAS_PE, DN, DR, DV,
                                       BLOCK_DN, BLOCK_DR, BLOCK_DV, BLOCK_N, UPCAST, PREC)
    # every row saw key 0 unmasked, so l_i >= 1 and m_i is finite
    acc = acc / l_i[:, None]
    lse2 = m_i + tl.math.log2(l_i)  # base-2 LSE of the log2(e)-scaled scores: P = exp2(s * qk_scale - lse2)
    if EVEN_M:
        tl.store(LSE + offs_m, lse2)
    else:
        tl.store(LSE + offs_m, lse2, mask=m_ok)
    _store2d(O + offs_m[:, None] * s_o_t + offs_dv[None, :], acc, m_ok, offs_dv < DV,
             not EVEN_M, BLOCK_DV != DV)


@triton.jit
def _mla_attn_bwd_preprocess(O, DO, Delta, s_o_b, s_o_h, s_o_t, s_do_b, s_do_h, s_do_t, H, T,
                             DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < T
    mask = m_ok[:, None] & (offs_dv < DV)[None, :]
    o = tl.load(O + b * s_o_b + h * s_o_h + offs_m[:, None] * s_o_t + offs_dv[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * s_do_b + h * s_do_h + offs_m[:, None] * s_do_t + offs_dv[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def _atomic_add2d(ptrs, x, rmask, cmask, USE_R: tl.constexpr, USE_C: tl.constexpr):
    """fp32 ``*ptrs += x`` (relaxed atomics); masks only where needed (constexpr)."""
    if USE_R:
        if USE_C:
            tl.atomic_add(ptrs, x, mask=rmask[:, None] & cmask[None, :], sem="relaxed")
        else:
            tl.atomic_add(ptrs, x, mask=rmask[:, None], sem="relaxed")
    else:
        if USE_C:
            tl.atomic_add(ptrs, x, mask=cmask[None, :], sem="relaxed")
        else:
            tl.atomic_add(ptrs, x, sem="relaxed")


@triton.jit
def _bwd_dkdv_inner(dk_n, dk_r, dv, k_n, k_r, v, Qn, Qr, DO, LSE, Delta, DQ,
                    s_qn_t, s_qr_t, s_do_t, s_dq_t, offs_n, offs_dn, offs_dr, offs_dv, lo, hi, T, qk_scale,
                    sm_scale,
                    MASK: tl.constexpr, CHECK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_PE: tl.constexpr,
                    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
                    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, FUSE_DQ: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi). MASK: apply the causal / query-range
    mask; CHECK_M: queries may reach past T (bounds-masked loads). Keys >= T need no mask: their dK/dV rows
    are never stored and nothing else reads them (and, for FUSE_DQ, their K rows load as 0, so their dS K
    adds exactly 0 to dQ).

    FUSE_DQ (fused backward): also ``DQ[queries] += sm_scale * dS K`` (nope columns [0, DN), rope columns
    [DN, DN + DR) of the fp32 buffer DQ, row stride ``s_dq_t``) with fp32 atomic adds."""
    offs_m0 = tl.arange(0, BLOCK_M)
    dv_ok = offs_dv < DV
    dn_ok = offs_dn < DN
    dr_ok = offs_dr < DR
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < T
        # S^T = K Q^T [BLOCK_N, BLOCK_M]; Q^T tiles [BLOCK_D, BLOCK_M]
        s_t, qn_t, qr_t = _scores_t(k_n, k_r, Qn, Qr, s_qn_t, s_qr_t, offs_m, offs_dn, offs_dr, m_ok,
                                    CHECK_M, HAS_PE, DN, DR, BLOCK_DN, BLOCK_DR, UPCAST, PREC)
        lse2 = _load1d(LSE + offs_m, m_ok, CHECK_M)
        delta = _load1d(Delta + offs_m, m_ok, CHECK_M)
        s_t = s_t * qk_scale - lse2[None, :]
        if MASK:
            s_t = _mask_scores(s_t, offs_m, offs_n, T, False, CHECK_M, False, CAUSAL)
        p_t = tl.math.exp2(s_t)                                   # P^T [BLOCK_N, BLOCK_M]
        do = _load2d(DO + offs_m[:, None] * s_do_t + offs_dv[None, :], m_ok, dv_ok,
                     CHECK_M, BLOCK_DV != DV, UPCAST)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)          # dV += P^T dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)                 # (dO V^T)^T
        ds_t = p_t * (dp_t - delta[None, :])                                # dS^T
        ds_t = ds_t.to(qn_t.dtype)
        dk_n = tl.dot(ds_t, tl.trans(qn_t), dk_n, input_precision=PREC)
        if HAS_PE:
            dk_r = tl.dot(ds_t, tl.trans(qr_t), dk_r, input_precision=PREC)
        if FUSE_DQ:  # dQ += dS K, this key block's share [BLOCK_M, D]
            ds = tl.trans(ds_t)
            dq_n = tl.dot(ds, k_n, input_precision=PREC) * sm_scale
            _atomic_add2d(DQ + offs_m[:, None] * s_dq_t + offs_dn[None, :], dq_n, m_ok, dn_ok,
                          CHECK_M, BLOCK_DN != DN)
            if HAS_PE:
                dq_r = tl.dot(ds, k_r, input_precision=PREC) * sm_scale
                _atomic_add2d(DQ + DN + offs_m[:, None] * s_dq_t + offs_dr[None, :], dq_r, m_ok, dr_ok,
                              CHECK_M, BLOCK_DR != DR)
    return dk_n, dk_r, dv


@triton.jit
def _mla_attn_bwd_dkdv_kernel(
    Qn, Qr, Kn, Kr, V, DO, LSE, Delta, DKn, DKr, DV_, DQ,
    s_qn_b, s_qn_h, s_qn_t, s_qr_b, s_qr_h, s_qr_t,
    s_kn_b, s_kn_h, s_kn_t, s_kr_b, s_kr_h, s_kr_t,
    s_v_b, s_v_h, s_v_t, s_do_b, s_do_h, s_do_t,
    s_dkn_b, s_dkn_h, s_dkn_t, s_dkr_b, s_dkr_h, s_dkr_t, s_dv_b, s_dv_h, s_dv_t,
    s_dq_b, s_dq_h, s_dq_t,
    H, T, sm_scale,
    CAUSAL: tl.constexpr, HAS_PE: tl.constexpr,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, FUSE_DQ: tl.constexpr,
):
    """dK, dV of one key block (program axis 0) of one (batch, head) (axis 1). FUSE_DQ: the fused backward,
    which also adds this key block's dQ share into the fp32 buffer DQ [B, H, T, DN + DR] (atomics; see
    _mla_attn_backward); otherwise DQ is never read."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Qn += b * s_qn_b + h * s_qn_h
    Qr += b * s_qr_b + h * s_qr_h
    Kn += b * s_kn_b + h * s_kn_h
    Kr += b * s_kr_b + h * s_kr_h
    V += b * s_v_b + h * s_v_h
    DO += b * s_do_b + h * s_do_h
    DKn += b * s_dkn_b + h * s_dkn_h
    DKr += b * s_dkr_b + h * s_dkr_h
    DV_ += b * s_dv_b + h * s_dv_h
    if FUSE_DQ:
        DQ += b * s_dq_b + h * s_dq_h
    LSE += pid_bh.to(tl.int64) * T
    Delta += pid_bh.to(tl.int64) * T

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_dn = tl.arange(0, BLOCK_DN)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < T
    k_n, k_r = _load_split(Kn, Kr, offs_n, s_kn_t, s_kr_t, n_ok, offs_dn, offs_dr, not EVEN_N, HAS_PE, DN, DR,
                           BLOCK_DN, BLOCK_DR, UPCAST)
    v = _load2d(V + offs_n[:, None] * s_v_t + offs_dv[None, :], n_ok, offs_dv < DV,
                not EVEN_N, BLOCK_DV != DV, UPCAST)
    dk_n = tl.zeros([BLOCK_N, BLOCK_DN], dtype=tl.float32)
    dk_r = tl.zeros([BLOCK_N, BLOCK_DR], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    # query blocks: [lo, a) straddle the diagonal (causal mask only: all rows < t_full <= T), [a, t_full)
    # lie entirely below it (no mask), [t_full, T) is the partial last query block (absent when EVEN_M)
    t_full = (T // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        full_start = ((start_n + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        a = tl.minimum(full_start, t_full)
        dk_n, dk_r, dv = _bwd_dkdv_inner(dk_n, dk_r, dv, k_n, k_r, v, Qn, Qr, DO, LSE, Delta, DQ,
                                         s_qn_t, s_qr_t, s_do_t, s_dq_t, offs_n, offs_dn, offs_dr, offs_dv,
                                         lo, a, T, qk_scale, sm_scale, True, False, True, HAS_PE, DN, DR, DV,
                                         BLOCK_DN, BLOCK_DR, BLOCK_DV, BLOCK_M, UPCAST, PREC, FUSE_DQ)
    else:
        a = 0
    dk_n, dk_r, dv = _bwd_dkdv_inner(dk_n, dk_r, dv, k_n, k_r, v, Qn, Qr, DO, LSE, Delta, DQ,
                                     s_qn_t, s_qr_t, s_do_t, s_dq_t, offs_n, offs_dn, offs_dr, offs_dv,
                                     a, t_full, T, qk_scale, sm_scale, False, False, CAUSAL, HAS_PE, DN, DR, DV,
                                     BLOCK_DN, BLOCK_DR, BLOCK_DV, BLOCK_M, UPCAST, PREC, FUSE_DQ)
    if not EVEN_M:
        dk_n, dk_r, dv = _bwd_dkdv_inner(dk_n, dk_r, dv, k_n, k_r, v, Qn, Qr, DO, LSE, Delta, DQ,
                                         s_qn_t, s_qr_t, s_do_t, s_dq_t, offs_n, offs_dn, offs_dr, offs_dv,
                                         t_full, T, T, qk_scale, sm_scale, True, True, CAUSAL, HAS_PE, DN, DR, DV,
                                         BLOCK_DN, BLOCK_DR, BLOCK_DV, BLOCK_M, UPCAST, PREC, FUSE_DQ)

    _store2d(DV_ + offs_n[:, None] * s_dv_t + offs_dv[None, :], dv, n_ok, offs_dv < DV,
             not EVEN_N, BLOCK_DV != DV)
    _store_split(DKn, DKr, offs_n, s_dkn_t, s_dkr_t, dk_n, dk_r, sm_scale, n_ok, offs_dn, offs_dr, not EVEN_N,
                 HAS_PE, DN, DR, BLOCK_DN, BLOCK_DR)


@triton.jit
def _bwd_dq_inner(dq_n, dq_r, q_n, q_r, do, lse2, delta, Kn, Kr, V, s_kn_t, s_kr_t, s_v_t,
                  offs_m, offs_dn, offs_dr, offs_dv, lo, hi, T, qk_scale,
                  MASK: tl.constexpr, CHECK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_PE: tl.constexpr,
                  DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
                  BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi) (MASK / CHECK_N as in _fwd_inner)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    dv_ok = offs_dv < DV
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < T
        s, kn_t, kr_t = _scores_t(q_n, q_r, Kn, Kr, s_kn_t, s_kr_t, offs_n, offs_dn, offs_dr, n_ok,
                                  CHECK_N, HAS_PE, DN, DR, BLOCK_DN, BLOCK_DR, UPCAST, PREC)
        s = s * qk_scale - lse2[:, None]
        if MASK:
            s = _mask_scores(s, offs_m, offs_n, T, True, False, CHECK_N, CAUSAL)
        p = tl.math.exp2(s)
        v_t = _load2d(V + offs_n[None, :] * s_v_t + offs_dv[:, None], dv_ok, n_ok,
                      BLOCK_DV != DV, CHECK_N, UPCAST)
        dp = tl.dot(do, v_t, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq_n = tl.dot(ds.to(kn_t.dtype), tl.trans(kn_t), dq_n, input_precision=PREC)
        if HAS_PE:
            dq_r = tl.dot(ds.to(kr_t.dtype), tl.trans(kr_t), dq_r, input_precision=PREC)
    return dq_n, dq_r


@triton.jit
def _mla_attn_bwd_dq_kernel(
    Qn, Qr, Kn, Kr, V, DO, LSE, Delta, DQn, DQr,
    s_qn_b, s_qn_h, s_qn_t, s_qr_b, s_qr_h, s_qr_t,
    s_kn_b, s_kn_h, s_kn_t, s_kr_b, s_kr_h, s_kr_t,
    s_v_b, s_v_h, s_v_t, s_do_b, s_do_h, s_do_t,
    s_dqn_b, s_dqn_h, s_dqn_t, s_dqr_b, s_dqr_h, s_dqr_t,
    H, T, sm_scale,
    CAUSAL: tl.constexpr, HAS_PE: tl.constexpr,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Qn += b * s_qn_b + h * s_qn_h
    Qr += b * s_qr_b + h * s_qr_h
    Kn += b * s_kn_b + h * s_kn_h
    Kr += b * s_kr_b + h * s_kr_h
    V += b * s_v_b + h * s_v_h
    DO += b * s_do_b + h * s_do_h
    DQn += b * s_dqn_b + h * s_dqn_h
    DQr += b * s_dqr_b + h * s_dqr_h
    LSE += pid_bh.to(tl.int64) * T
    Delta += pid_bh.to(tl.int64) * T

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dn = tl.arange(0, BLOCK_DN)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < T
    # padded rows (>= T) load q = dO = 0 and lse = delta = 0, so their dS is exactly 0 (and never stored)
    q_n, q_r = _load_split(Qn, Qr, offs_m, s_qn_t, s_qr_t, m_ok, offs_dn, offs_dr, not EVEN_M, HAS_PE, DN, DR,
                           BLOCK_DN, BLOCK_DR, UPCAST)
    do = _load2d(DO + offs_m[:, None] * s_do_t + offs_dv[None, :], m_ok, offs_dv < DV,
                 not EVEN_M, BLOCK_DV != DV, UPCAST)
    lse2 = _load1d(LSE + offs_m, m_ok, not EVEN_M)
    delta = _load1d(Delta + offs_m, m_ok, not EVEN_M)
    dq_n = tl.zeros([BLOCK_M, BLOCK_DN], dtype=tl.float32)
    dq_r = tl.zeros([BLOCK_M, BLOCK_DR], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    if CAUSAL:
        full_end = ((start_m + 1) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M, T)
        dq_n, dq_r = _bwd_dq_inner(dq_n, dq_r, q_n, q_r, do, lse2, delta, Kn, Kr, V, s_kn_t, s_kr_t, s_v_t,
                                   offs_m, offs_dn, offs_dr, offs_dv, 0, full_end, T, qk_scale,
                                   False, False, True, HAS_PE, DN, DR, DV, BLOCK_DN, BLOCK_DR, BLOCK_DV,
                                   BLOCK_N, UPCAST, PREC)
        dq_n, dq_r = _bwd_dq_inner(dq_n, dq_r, q_n, q_r, do, lse2, delta, Kn, Kr, V, s_kn_t, s_kr_t, s_v_t,
                                   offs_m, offs_dn, offs_dr, offs_dv, full_end, hi, T, qk_scale,
                                   True, not EVEN_N, True, HAS_PE, DN, DR, DV, BLOCK_DN, BLOCK_DR, BLOCK_DV,
                                   BLOCK_N, UPCAST, PREC)
    else:
        full_end = (T // BLOCK_N) * BLOCK_N
        dq_n, dq_r = _bwd_dq_inner(dq_n, dq_r, q_n, q_r, do, lse2, delta, Kn, Kr, V, s_kn_t, s_kr_t, s_v_t,
                                   offs_m, offs_dn, offs_dr, offs_dv, 0, full_end, T, qk_scale,
                                   False, False, False, HAS_PE, DN, DR, DV, BLOCK_DN, BLOCK_DR, BLOCK_DV,
                                   BLOCK_N, UPCAST, PREC)
        if not EVEN_N:
            dq_n, dq_r = _bwd_dq_inner(dq_n, dq_r, q_n, q_r, do, lse2, delta, Kn, Kr, V, s_kn_t, s_kr_t,
                                       s_v_t, offs_m, offs_dn, offs_dr, offs_dv, full_end, T, T, qk_scale,
                                       True, True, False, HAS_PE, DN, DR, DV, BLOCK_DN, BLOCK_DR, BLOCK_DV,
                                       BLOCK_N, UPCAST, PREC)
    _store_split(DQn, DQr, offs_m, s_dqn_t, s_dqr_t, dq_n, dq_r, sm_scale, m_ok, offs_dn, offs_dr, not EVEN_M,
                 HAS_PE, DN, DR, BLOCK_DN, BLOCK_DR)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def _bht_strides(x: torch.Tensor, shared_head: bool = False) -> tuple[int, int, int]:
    return x.stride(0), 0 if shared_head else x.stride(1), x.stride(2)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _common_meta(dtype: torch.dtype, dn: int, dr: int, dv: int) -> dict:
    return dict(
        HAS_PE=dr > 0, DN=dn, DR=max(dr, 1), DV=dv,
        BLOCK_DN=_block(dn), BLOCK_DR=_block(dr), BLOCK_DV=_block(dv),
        UPCAST=_interpreting() or dtype == torch.float32,
        PREC="ieee" if dtype == torch.float32 else "tf32",
    )


def _alloc_like_q(q: torch.Tensor, B: int, H: int, T: int, D: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, T, D] tensor; stored [B, T, H, D] when q is (so the caller's transpose back is free).
    Plain torch.empty: also used by the fake (meta) implementation; launchers wrap it in ``poisoned``."""
    if q.stride(1) < q.stride(2):
        return torch.empty(B, T, H, D, device=q.device, dtype=dtype).transpose(1, 2)
    return torch.empty(B, H, T, D, device=q.device, dtype=dtype)


def _even(T: int, block: int) -> bool:
    """T is a whole number of blocks: the kernels drop the bounds masks of that axis."""
    return T % block == 0


def _mla_attn_forward(qn, qr, kn, kr, v, causal: bool, sm_scale: float, kr_shared: bool):
    """Launch the forward kernel. Returns (o [B,H,T,Dv] in the input dtype, lse [B,H,T] fp32)."""
    B, H, T, dn = qn.shape
    dr = qr.shape[-1] if qr is not None else 0
    dv = v.shape[-1]
    o = poisoned(_alloc_like_q(qn, B, H, T, dv, v.dtype))
    lse = new_empty((B, H, T), torch.float32, qn.device)  # base-2 LSE of the log2(e)-scaled scores
    if qr is None:  # no rope part: pass the nope tensors again (never read)
        qr, kr = qn, kn
    cfg = get_config(dn + dr, dv, qn.device, qn.dtype, split=(dn, dr))
    grid = (triton.cdiv(T, cfg.fwd_block_m), B * H)
    _mla_attn_fwd_kernel[grid](
        qn, qr, kn, kr, v, o, lse,
        *_bht_strides(qn), *_bht_strides(qr), *_bht_strides(kn), *_bht_strides(kr, kr_shared),
        *_bht_strides(v), *_bht_strides(o),
        H, T, float(sm_scale),
        CAUSAL=bool(causal), SCALE_POS=sm_scale >= 0, BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.fwd_block_n,
        EVEN_M=_even(T, cfg.fwd_block_m), EVEN_N=_even(T, cfg.fwd_block_n),
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
        **_common_meta(qn.dtype, dn, dr, dv),
    )
    return o, lse


def _mla_attn_backward(do, qn, qr, kn, kr, v, o, lse, causal, sm_scale, kr_shared,
                       dqn, dqr, dkn, dkr, dv_out):
    """Launch the backward, writing into the given gradient tensors (views allowed).

    Default (``cfg.bwd_fused`` False): preprocess, dK/dV kernel, dQ kernel -- deterministic.
    Fused (``cfg.bwd_fused``, FlashAttention-2's scheme): preprocess, then one kernel per key block that
    computes dK, dV and adds its share of dQ (nope and rope parts, already scaled) into a zero-initialised fp32
    buffer [B, H, T, Dn + Dr] with fp32 atomic adds; the buffer is then cast into dqn / dqr. S = QK^T and
    dP = dO V^T are computed once instead of twice (5 matmuls per tile instead of 7), at the cost of the
    atomics and the buffer (4 bytes x B*H*T*Dqk, zeroed, plus the cast pass). The order in which the key
    blocks' shares reach dQ varies from run to run, so dQ is NOT bitwise deterministic (fp32 rounding-level
    differences); dK, dV (and a shared k_pe's per-head partials) stay deterministic."""
    B, H, T, dn = qn.shape
    dr = qr.shape[-1] if qr is not None else 0
    dv = v.shape[-1]
    if qr is None:
        qr, kr, dqr, dkr = qn, kn, dqn, dkn
    cfg = get_config(dn + dr, dv, qn.device, qn.dtype, split=(dn, dr))
    meta = _common_meta(qn.dtype, dn, dr, dv)
    delta = new_empty((B, H, T), torch.float32, qn.device)
    _mla_attn_bwd_preprocess[(triton.cdiv(T, cfg.pre_block_m), B * H)](
        o, do, delta, *_bht_strides(o), *_bht_strides(do), H, T,
        DV=dv, BLOCK_DV=meta["BLOCK_DV"], BLOCK_M=cfg.pre_block_m,
    )
    if cfg.bwd_fused:
        bm, bn, warps, stages = cfg.fused_launch()
        dq_acc = torch.zeros((B, H, T, dn + dr), dtype=torch.float32, device=qn.device)
    else:
        bm, bn, warps, stages = cfg.kv_block_m, cfg.kv_block_n, cfg.kv_warps, cfg.kv_stages
        dq_acc = delta  # never read (FUSE_DQ False)
    _mla_attn_bwd_dkdv_kernel[(triton.cdiv(T, bn), B * H)](
        qn, qr, kn, kr, v, do, lse, delta, dkn, dkr, dv_out, dq_acc,
        *_bht_strides(qn), *_bht_strides(qr), *_bht_strides(kn), *_bht_strides(kr, kr_shared),
        *_bht_strides(v), *_bht_strides(do),
        *_bht_strides(dkn), *_bht_strides(dkr), *_bht_strides(dv_out),
        *((dq_acc.stride(0), dq_acc.stride(1), dq_acc.stride(2)) if cfg.bwd_fused else (0, 0, 0)),
        H, T, float(sm_scale),
        CAUSAL=bool(causal), BLOCK_M=bm, BLOCK_N=bn, EVEN_M=_even(T, bm), EVEN_N=_even(T, bn),
        FUSE_DQ=bool(cfg.bwd_fused), num_warps=warps, num_stages=stages, **meta,
    )
    if cfg.bwd_fused:
        if dr:
            dqn.copy_(dq_acc[..., :dn])
            dqr.copy_(dq_acc[..., dn:])
        else:
            dqn.copy_(dq_acc)
        return
    _mla_attn_bwd_dq_kernel[(triton.cdiv(T, cfg.q_block_m), B * H)](
        qn, qr, kn, kr, v, do, lse, delta, dqn, dqr,
        *_bht_strides(qn), *_bht_strides(qr), *_bht_strides(kn), *_bht_strides(kr, kr_shared),
        *_bht_strides(v), *_bht_strides(do), *_bht_strides(dqn), *_bht_strides(dqr),
        H, T, float(sm_scale),
        CAUSAL=bool(causal), BLOCK_M=cfg.q_block_m, BLOCK_N=cfg.q_block_n,
        EVEN_M=_even(T, cfg.q_block_m), EVEN_N=_even(T, cfg.q_block_n),
        num_warps=cfg.q_warps, num_stages=cfg.q_stages, **meta,
    )


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------
def _check_tensor(name: str, x, rank: int = 4) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"mla_attention: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"mla_attention: {name} must have rank {rank} [B, H, T, D], got shape {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"mla_attention: {name} has dtype {x.dtype}; supported: float32, bfloat16, float16")


def _check_common(tensors: dict, causal, softmax_scale) -> None:
    dtypes = {x.dtype for x in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError("mla_attention: all inputs must share one dtype, got "
                         + ", ".join(f"{n}={x.dtype}" for n, x in tensors.items()))
    devices = {x.device for x in tensors.values()}
    if len(devices) != 1:
        raise ValueError("mla_attention: all inputs must be on one device, got "
                         + ", ".join(f"{n}={x.device}" for n, x in tensors.items()))
    dev = next(iter(devices))
    if dev.type != "cuda" and not _interpreting():
        raise ValueError(f"mla_attention: the Triton kernel needs CUDA tensors (got {dev}); on CPU set "
                         "TRITON_INTERPRET=1 before importing triton, or use mla_attention_ref")
    if not isinstance(causal, bool):
        raise ValueError(f"mla_attention: causal must be a bool, got {causal!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
        raise ValueError(f"mla_attention: softmax_scale must be a finite float or None, got {softmax_scale!r}")


def _check_qkv(q, k, v, causal, softmax_scale) -> None:
    for n, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(n, x)
    if q.shape != k.shape:
        raise ValueError(f"mla_attention: q and k must have the same shape [B, H, T, Dqk], got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"mla_attention: v must be [B, H, T, Dv] with B, H, T of q {tuple(q.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"mla_attention: head dims must be positive, got Dqk={q.shape[-1]}, Dv={v.shape[-1]}")
    _check_common({"q": q, "k": k, "v": v}, causal, softmax_scale)


# ----------------------------------------------------------------------------------------------------------
# Autograd functions and public API
# ----------------------------------------------------------------------------------------------------------
# The launches are wrapped in torch.library custom ops so that torch.compile treats them as opaque calls
# (no graph break, and Inductor never re-compiles the Triton kernels itself).
@torch.library.custom_op("moetrain::mla_attention_fwd", mutates_args=())
def _fwd_op(qn: torch.Tensor, qr: Optional[torch.Tensor], kn: torch.Tensor, kr: Optional[torch.Tensor],
            v: torch.Tensor, causal: bool, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, _ = qn.shape
    if qn.numel() == 0 or v.numel() == 0:
        return (_alloc_like_q(qn, B, H, T, v.shape[-1], v.dtype).zero_(),
                torch.zeros(B, H, T, device=qn.device, dtype=torch.float32))
    shared = kr is not None and kr.shape[1] == 1 and H != 1
    return _mla_attn_forward(qn, qr, kn, kr, v, causal, softmax_scale, shared)


@_fwd_op.register_fake
def _(qn, qr, kn, kr, v, causal, softmax_scale):
    B, H, T, _ = qn.shape
    return (_alloc_like_q(qn, B, H, T, v.shape[-1], v.dtype),
            qn.new_empty(B, H, T, dtype=torch.float32))


@torch.library.custom_op("moetrain::mla_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, causal: bool, softmax_scale: float, dn: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.numel() == 0 or v.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq, dk, dv = poisoned(torch.empty_like(q)), poisoned(torch.empty_like(k)), poisoned(torch.empty_like(v))
    dr = q.shape[-1] - dn

    def sl(x):
        return (x[..., :dn], x[..., dn:]) if dr else (x, None)

    (qn, qr), (kn, kr), (dqn, dqr), (dkn, dkr) = sl(q), sl(k), sl(dq), sl(dk)
    _mla_attn_backward(_last_dim_contiguous(do), qn, qr, kn, kr, v, o, lse, causal, softmax_scale, False,
                       dqn, dqr, dkn, dkr, dv)
    return dq, dk, dv


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, softmax_scale, dn):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("moetrain::mla_attention_split_bwd", mutates_args=())
def _split_bwd_op(do: torch.Tensor, qn: torch.Tensor, qr: torch.Tensor, kn: torch.Tensor, kr: torch.Tensor,
                  v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, T, _ = qn.shape
    if qn.numel() == 0 or v.numel() == 0:
        return tuple(torch.zeros_like(x) for x in (qn, qr, kn, kr, v))
    dqn, dqr, dkn, dv = (poisoned(torch.empty_like(x)) for x in (qn, qr, kn, v))
    shared = kr.shape[1] == 1 and H != 1
    if shared:  # per-head partial gradients, reduced once (deterministic, no atomics)
        dkr_heads = new_empty((B, H, T, kr.shape[-1]), torch.float32, kr.device)
    else:
        dkr_heads = poisoned(torch.empty_like(kr))
    _mla_attn_backward(_last_dim_contiguous(do), qn, qr, kn, kr, v, o, lse, causal, softmax_scale, shared,
                       dqn, dqr, dkn, dkr_heads, dv)
    dkr = dkr_heads.sum(1, keepdim=True).to(kr.dtype) if shared else dkr_heads
    return dqn, dqr, dkn, dkr, dv


@_split_bwd_op.register_fake
def _(do, qn, qr, kn, kr, v, o, lse, causal, softmax_scale):
    return tuple(torch.empty_like(x) for x in (qn, qr, kn, kr, v))


class MLAAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(q, k, v, causal, softmax_scale) -> o``.

    q, k: [B, H, T, Dqk]; v: [B, H, T, Dv]; o: [B, H, T, Dv] in the input dtype. Saves q, k, v, o and the
    fp32 LSE [B, H, T] for backward (O(T) extra memory per head). Inputs must be validated by the caller
    (:func:`mla_attention` does). Any strides are accepted as long as the last dim is contiguous.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale):
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        dn, dr = split_head_dim(q.shape[-1])
        if dr:
            o, lse = _fwd_op(q[..., :dn], q[..., dn:], k[..., :dn], k[..., dn:], v, causal, softmax_scale)
        else:
            o, lse = _fwd_op(q, None, k, None, v, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.softmax_scale, ctx.dn = causal, softmax_scale, dn
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.softmax_scale, ctx.dn)
        return dq, dk, dv, None, None


class MLAAttentionSplitFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(q_nope, q_pe, k_nope, k_pe, v, causal, softmax_scale) -> o``.

    q_nope, k_nope: [B, H, T, Dn]; q_pe: [B, H, T, Dr]; k_pe: [B, H, T, Dr] or [B, 1, T, Dr] (shared by all
    heads: read with head stride 0; its gradient is summed over heads, via a per-head fp32 buffer
    [B, H, T, Dr] that is reduced once); v: [B, H, T, Dv].
    """

    @staticmethod
    def forward(ctx, qn, qr, kn, kr, v, causal, softmax_scale):
        qn, qr, kn, kr, v = (_last_dim_contiguous(x) for x in (qn, qr, kn, kr, v))
        o, lse = _fwd_op(qn, qr, kn, kr, v, causal, softmax_scale)
        ctx.save_for_backward(qn, qr, kn, kr, v, o, lse)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        return o

    @staticmethod
    def backward(ctx, do):
        qn, qr, kn, kr, v, o, lse = ctx.saved_tensors
        grads = _split_bwd_op(do, qn, qr, kn, kr, v, o, lse, ctx.causal, ctx.softmax_scale)
        return (*grads, None, None)


def mla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                  softmax_scale: float | None = None) -> torch.Tensor:
    """Fused (FlashAttention-2-style) attention with different q/k and v head dims.

    Args:
        q: [B, H, T, Dqk] query (Dqk = qk_nope_head_dim + qk_rope_head_dim, e.g. 192).
        k: [B, H, T, Dqk] key.
        v: [B, H, T, Dv] value (e.g. Dv = 128).
        causal: mask key j > query i.
        softmax_scale: multiplies q.k; default 1 / sqrt(Dqk).
    Returns:
        o: [B, H, T, Dv] in the input dtype (float32, bfloat16 or float16); differentiable in q, k, v.
    Raises:
        ValueError: wrong ranks, mismatched shapes/dtypes/devices, unsupported dtype, CPU tensors without
        TRITON_INTERPRET=1.
    Same signature as the model's ``attn_core(q, k, v, causal=True, softmax_scale=s)``.
    """
    _check_qkv(q, k, v, causal, softmax_scale)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    return MLAAttentionFunction.apply(q, k, v, causal, float(softmax_scale))


def mla_attention_split(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                        v: torch.Tensor, causal: bool = True, softmax_scale: float | None = None) -> torch.Tensor:
    """MLA attention with the nope/rope parts as separate tensors and the rope key shared across heads.

    Equal to ``mla_attention(cat([q_nope, q_pe], -1), cat([k_nope, k_pe.expand(-1, H, -1, -1)], -1), v)``
    without materialising the concatenations or the per-head k_pe (DeepSeek-V2 section 2.1.3: the decoupled
    RoPE key is shared by all heads).

    Args:
        q_nope: [B, H, T, Dn]; q_pe: [B, H, T, Dr]; k_nope: [B, H, T, Dn];
        k_pe: [B, 1, T, Dr] (shared; gradient summed over heads) or [B, H, T, Dr]; v: [B, H, T, Dv].
        softmax_scale: default 1 / sqrt(Dn + Dr).
    Returns:
        o: [B, H, T, Dv] in the input dtype.
    Raises:
        ValueError: as :func:`mla_attention`.
    """
    for n, x in (("q_nope", q_nope), ("q_pe", q_pe), ("k_nope", k_nope), ("k_pe", k_pe), ("v", v)):
        _check_tensor(n, x)
    B, H, T, dn = q_nope.shape
    if k_nope.shape != q_nope.shape:
        raise ValueError(f"mla_attention_split: k_nope must have q_nope's shape {tuple(q_nope.shape)}, "
                         f"got {tuple(k_nope.shape)}")
    if tuple(q_pe.shape[:3]) != (B, H, T):
        raise ValueError(f"mla_attention_split: q_pe must be [B, H, T, Dr] = [{B}, {H}, {T}, Dr], "
                         f"got {tuple(q_pe.shape)}")
    dr = q_pe.shape[-1]
    if k_pe.shape[0] != B or k_pe.shape[1] not in (1, H) or k_pe.shape[2] != T or k_pe.shape[3] != dr:
        raise ValueError(f"mla_attention_split: k_pe must be [{B}, 1, {T}, {dr}] (shared) or [{B}, {H}, {T}, {dr}], "
                         f"got {tuple(k_pe.shape)}")
    if tuple(v.shape[:3]) != (B, H, T):
        raise ValueError(f"mla_attention_split: v must be [B, H, T, Dv] = [{B}, {H}, {T}, Dv], got {tuple(v.shape)}")
    if dn == 0 or dr == 0 or v.shape[-1] == 0:
        raise ValueError(f"mla_attention_split: head dims must be positive, got Dn={dn}, Dr={dr}, Dv={v.shape[-1]}")
    _check_common({"q_nope": q_nope, "q_pe": q_pe, "k_nope": k_nope, "k_pe": k_pe, "v": v}, causal, softmax_scale)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(dn + dr)
    return MLAAttentionSplitFunction.apply(q_nope, q_pe, k_nope, k_pe, v, causal, float(softmax_scale))


def mla_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                      softmax_scale: float | None = None) -> torch.Tensor:
    """Reference attention in pure torch: fp32 math, materialised [B, H, T, T] scores.

    q, k: [B, H, T, Dqk] (k may also be [B, 1, T, Dqk], broadcast); v: [B, H, T, Dv].
    Returns [B, H, T, Dv] in q's dtype. Raises ValueError on rank mismatch.
    """
    for n, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"mla_attention_ref: {n} must be a rank-4 tensor [B, H, T, D]")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    qf, kf, vf = q.float(), k.float(), v.float()
    s = torch.matmul(qf, kf.transpose(-1, -2)) * softmax_scale
    if causal:
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, vf).to(q.dtype)
