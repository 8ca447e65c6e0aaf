"""Row transfers between GPUs through symmetric memory: every token's K copies stored straight into (push) or
read straight from (pull) the expert-parallel peers' receive buffers, in one kernel each.

A rank addresses a peer's buffer through its own mapping of it (``torch.distributed._symmetric_memory``
maps every peer's buffer into each process): ``peer row j = BUF + DELTA[peer] + j * D`` with
``DELTA[peer] = (peer buffer address - this rank's buffer address) / element size``. The tests run the
kernels in one process with ``DELTA`` pointing into segments of one tensor (a simulated group).

    push: BUF_{r}[row[t, k]] = [w[t, k] *] x[t]                  r = rank[t, k]  (skipped where r < 0)
    pull: out[t] = sum_k [w[t, k] *] BUF_{r}[row[t, k]]        (fp32, k in order; r < 0 contributes 0)
          and, if asked, rows[t*K + k] = BUF_{r}[row[t, k]] (0 where r < 0)

Shapes: ``x [N, D]`` (rows contiguous in memory: stride(1) == 1), ``w [N, K]``, ``rank`` / ``row`` ``[N, K]``
int64, ``delta [world]`` int64, ``buf`` a contiguous ``[capacity, D]`` tensor of the group's dtype, ``out
[N, D]`` any float dtype, ``rows [N*K, D]`` in buf's dtype. Reference: :func:`push_rows_ref` /
:func:`pull_sum_ref` (PyTorch, on explicit per-rank buffers).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._utils import num_warps_for

__all__ = ["push_rows", "pull_sum", "push_rows_ref", "pull_sum_ref"]

BLOCK_D = 1024


@triton.jit
def _push_kernel(X, W, RANK, ROW, DELTA, BUF, D, stride_x, K: tl.constexpr, BLOCK: tl.constexpr,
                 WEIGHTED: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(X + t * stride_x + cols, mask=m, other=0.0)
    for k in tl.static_range(K):
        r = tl.load(RANK + t * K + k)
        if r >= 0:
            row = tl.load(ROW + t * K + k)
            delta = tl.load(DELTA + r)
            if WEIGHTED:
                v = (tl.load(W + t * K + k).to(tl.float32) * x.to(tl.float32)).to(BUF.dtype.element_ty)
            else:
                v = x.to(BUF.dtype.element_ty)
            tl.store(BUF + delta + row * D + cols, v, mask=m)


@triton.jit
def _pull_kernel(BUF, W, RANK, ROW, DELTA, OUT, ROWS, D, stride_out, K: tl.constexpr, BLOCK: tl.constexpr,
                 WEIGHTED: tl.constexpr, SAVE_ROWS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        r = tl.load(RANK + t * K + k)
        row = tl.load(ROW + t * K + k)
        delta = tl.load(DELTA + tl.maximum(r, 0))
        live = m & ((cols * 0 + r) >= 0)  # a vector mask (the interpreter takes no scalar & vector mask)
        v = tl.load(BUF + delta + row * D + cols, mask=live, other=0.0)
        if SAVE_ROWS:
            tl.store(ROWS + (t * K + k) * D + cols, v, mask=m)
        if WEIGHTED:
            acc += tl.load(W + t * K + k).to(tl.float32) * v.to(tl.float32)
        else:
            acc += v.to(tl.float32)
    tl.store(OUT + t * stride_out + cols, acc.to(OUT.dtype.element_ty), mask=m)


def _launch_shape(D: int):
    block = min(BLOCK_D, triton.next_power_of_2(max(D, 1)))
    return block, triton.cdiv(D, block), num_warps_for(block, hi=8)


def push_rows(x: torch.Tensor, w: Optional[torch.Tensor], rank: torch.Tensor, row: torch.Tensor,
              delta: torch.Tensor, buf: torch.Tensor) -> None:
    """``BUF_{rank[t,k]}[row[t,k]] = [w[t,k] *] x[t]`` (see the module docstring; ``w`` None: unweighted)."""
    N, K = rank.shape
    D = buf.shape[1]
    if N == 0 or D == 0:
        return
    if x.stride(1) != 1:
        x = x.contiguous()
    block, nb, warps = _launch_shape(D)
    _push_kernel[(N, nb)](x, x if w is None else w.contiguous(), rank.contiguous(), row.contiguous(), delta, buf,
                          D, x.stride(0), K=K, BLOCK=block, WEIGHTED=w is not None, num_warps=warps)


def pull_sum(buf: torch.Tensor, w: Optional[torch.Tensor], rank: torch.Tensor, row: torch.Tensor,
             delta: torch.Tensor, out: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
    """``out[t] = sum_k [w[t,k] *] BUF_{rank[t,k]}[row[t,k]]``; with ``rows`` ``[N*K, D]`` also the pulled rows
    (see the module docstring). ``out`` must have row-contiguous memory (stride(1) == 1)."""
    N, K = rank.shape
    D = buf.shape[1]
    if N == 0 or D == 0:
        return
    if out.stride(1) != 1:
        raise ValueError(f"pull_sum: out must be row-major (stride(1) == 1), got strides {out.stride()}")
    block, nb, warps = _launch_shape(D)
    _pull_kernel[(N, nb)](buf, buf if w is None else w.contiguous(), rank.contiguous(), row.contiguous(), delta,
                          out, buf if rows is None else rows, D, out.stride(0), K=K, BLOCK=block,
                          WEIGHTED=w is not None, SAVE_ROWS=rows is not None, num_warps=warps)


def push_rows_ref(x: torch.Tensor, w: Optional[torch.Tensor], rank: torch.Tensor, row: torch.Tensor,
                  bufs: Sequence[torch.Tensor]) -> None:
    """:func:`push_rows` on explicit per-rank buffers ``bufs[r] [capacity, D]`` (fp32 product, cast on store)."""
    N, K = rank.shape
    for t in range(N):
        for k in range(K):
            r = int(rank[t, k])
            if r >= 0:
                v = x[t].float() * (w[t, k].float() if w is not None else 1.0)
                bufs[r][int(row[t, k])] = v.to(bufs[r].dtype)


def pull_sum_ref(bufs: Sequence[torch.Tensor], w: Optional[torch.Tensor], rank: torch.Tensor, row: torch.Tensor,
                 out_dtype: torch.dtype):
    """:func:`pull_sum` on explicit per-rank buffers: returns ``(out [N, D] out_dtype, rows [N*K, D])``."""
    N, K = rank.shape
    D = bufs[0].shape[1]
    out = torch.zeros(N, D, dtype=torch.float32)
    rows = torch.zeros(N * K, D, dtype=bufs[0].dtype)
    for t in range(N):
        for k in range(K):
            r = int(rank[t, k])
            if r >= 0:
                v = bufs[r][int(row[t, k])]
                rows[t * K + k] = v
                out[t] += v.float() * (w[t, k].float() if w is not None else 1.0)
    return out.to(out_dtype), rows
