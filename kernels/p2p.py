"""Row transfers between GPUs through symmetric memory: every token's K copies stored straight into (push) or
read straight from (pull) the expert-parallel peers' receive buffers, in one kernel each.

A rank addresses a peer's buffer through its own mapping of it (``torch.distributed._symmetric_memory``
maps every peer's buffer into each process): ``peer row j = BUF + DELTA[peer] + j * D`` with
``DELTA[peer] = (peer buffer address - this rank's buffer address) / element size``. The tests run the
kernels in one process with ``DELTA`` pointing into segments of one tensor (a simulated group).

    push: BUF_{r}[row[t, k]] = [w[t, k] *] x[t]                  r = rank[t, k]  (skipped where r < 0 or
                                                                  row >= the buffer's rows)
          routed: r, row computed from the expert ids in the kernel (push_rows_routed) and written out
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

__all__ = ["push_rows", "push_rows_routed", "pull_sum", "push_rows_ref", "pull_sum_ref"]

BLOCK_D = 1024


@triton.jit
def _peer_offset(DELTA, r, DELTA_ALIGNED: tl.constexpr):
    """Rank r's buffer relative to this rank's, in elements; declared a multiple of 16 when it is (DELTA_ALIGNED),
    so the row loads / stores through it are 16-byte vectors instead of 2-byte ones."""
    delta = tl.load(DELTA + r)
    if DELTA_ALIGNED:
        delta = tl.multiple_of(delta, 16)
    return delta


@triton.jit
def _push_kernel(X, W, RANK, ROW, IDS, ROW_OF, BASE, DELTA, BUF, D, stride_x, n_experts, e_local, cap,
                 K: tl.constexpr, BLOCK: tl.constexpr, WEIGHTED: tl.constexpr, ROUTED: tl.constexpr,
                 DELTA_ALIGNED: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(X + t * stride_x + cols, mask=m, other=0.0)
    for k in tl.static_range(K):
        if ROUTED:  # the destination from the expert id: rank g // E_local, row base[g] + row_of (module doc)
            g = tl.load(IDS + t * K + k).to(tl.int64)
            kept = g < n_experts
            r = tl.where(kept, g // e_local, -1)
            row = tl.load(BASE + tl.where(kept, g, 0)) + tl.load(ROW_OF + t * K + k)
            if tl.program_id(1) == 0:
                tl.store(RANK + t * K + k, r)
                tl.store(ROW + t * K + k, row)
        else:
            r = tl.load(RANK + t * K + k)
            row = tl.load(ROW + t * K + k)
        if (r >= 0) & (row < cap):
            delta = _peer_offset(DELTA, r, DELTA_ALIGNED)
            if WEIGHTED:
                v = (tl.load(W + t * K + k).to(tl.float32) * x.to(tl.float32)).to(BUF.dtype.element_ty)
            else:
                v = x.to(BUF.dtype.element_ty)
            tl.store(BUF + delta + row * D + cols, v, mask=m)


@triton.jit
def _pull_kernel(BUF, W, RANK, ROW, DELTA, OUT, ROWS, D, stride_out, K: tl.constexpr, BLOCK: tl.constexpr,
                 WEIGHTED: tl.constexpr, SAVE_ROWS: tl.constexpr, DELTA_ALIGNED: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        r = tl.load(RANK + t * K + k)
        row = tl.load(ROW + t * K + k)
        delta = _peer_offset(DELTA, tl.maximum(r, 0), DELTA_ALIGNED)
        live = m & ((cols * 0 + r) >= 0)  # a vector mask (the interpreter takes no scalar & vector mask)
        v = tl.load(BUF + delta + row * D + cols, mask=live, other=0.0)
        if SAVE_ROWS:
            tl.store(ROWS + (t * K + k) * D + cols, v, mask=m)
        if WEIGHTED:
            acc += tl.load(W + t * K + k).to(tl.float32) * v.to(tl.float32)
        else:
            acc += v.to(tl.float32)
    tl.store(OUT + t * stride_out + cols, acc.to(OUT.dtype.element_ty), mask=m)


def _aligned(delta: torch.Tensor) -> bool:
    """Whether every peer offset is a multiple of 16 elements (symmetric-memory buffers are page-aligned), so the
    kernels may tell Triton so and move rows in 16-byte vectors; read once per ``delta`` tensor and cached on it."""
    flag = getattr(delta, "_moetrain_aligned", None)
    if flag is None:
        flag = bool((delta % 16 == 0).all())
        delta._moetrain_aligned = flag
    return flag


def _launch_shape(D: int):
    block = min(BLOCK_D, triton.next_power_of_2(max(D, 1)))
    return block, triton.cdiv(D, block), num_warps_for(block, hi=8)


def push_rows(x: torch.Tensor, w: Optional[torch.Tensor], rank: torch.Tensor, row: torch.Tensor,
              delta: torch.Tensor, buf: torch.Tensor) -> None:
    """``BUF_{rank[t,k]}[row[t,k]] = [w[t,k] *] x[t]`` (see the module docstring; ``w`` None: unweighted); rows
    ``>= buf.shape[0]`` are not stored."""
    N, K = rank.shape
    D = buf.shape[1]
    if N == 0 or D == 0:
        return
    if x.stride(1) != 1:
        x = x.contiguous()
    block, nb, warps = _launch_shape(D)
    rank, row = rank.contiguous(), row.contiguous()
    _push_kernel[(N, nb)](x, x if w is None else w.contiguous(), rank, row, rank, row, row, delta, buf,
                          D, x.stride(0), 0, 1, buf.shape[0], K=K, BLOCK=block, WEIGHTED=w is not None,
                          ROUTED=False, DELTA_ALIGNED=_aligned(delta), num_warps=warps)


def push_rows_routed(x: torch.Tensor, ids: torch.Tensor, row_of: torch.Tensor, base: torch.Tensor, n_experts: int,
                     e_local: int, delta: torch.Tensor, buf: torch.Tensor):
    """:func:`push_rows` with the destinations computed in the kernel from the expert ids: copy (t, k) of expert
    ``g = ids[t, k]`` goes to rank ``g // e_local``, row ``base[g] + row_of[t*K + k]`` (``g >= n_experts``:
    dropped, rank -1). Returns ``(rank, row)`` ``[N, K]`` int64, as :func:`push_rows` / :func:`pull_sum` take them;
    rows ``>= buf.shape[0]`` are not stored (the caller grows the buffer and pushes again).

    ``ids [N, K]`` any integer dtype, ``row_of [N*K]`` int64 (the copy's position in this rank's stable sort of
    the ids), ``base [n_experts]`` int64 (``moetrain.parallel.symm_exchange.route_table``)."""
    N, K = ids.shape
    D = buf.shape[1]
    rank = torch.empty((N, K), dtype=torch.int64, device=ids.device)
    row = torch.empty((N, K), dtype=torch.int64, device=ids.device)
    if N == 0:
        return rank, row
    if x.stride(1) != 1:
        x = x.contiguous()
    block, nb, warps = _launch_shape(max(D, 1))
    _push_kernel[(N, nb)](x, x, rank, row, ids.contiguous(), row_of.contiguous(), base.contiguous(), delta, buf,
                          D, x.stride(0), int(n_experts), int(e_local), buf.shape[0], K=K, BLOCK=block,
                          WEIGHTED=False, ROUTED=True, DELTA_ALIGNED=_aligned(delta), num_warps=warps)
    return rank, row


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
                          WEIGHTED=w is not None, SAVE_ROWS=rows is not None, DELTA_ALIGNED=_aligned(delta),
                          num_warps=warps)


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
