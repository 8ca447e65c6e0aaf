"""How the expert-parallel dispatcher moves token rows between the ranks of the ``"ep"`` group.

Two exchange plans with one interface (``out_rows``, ``launch``, ``reversed``), used by the autograd
all-to-all functions of :mod:`moetrain.parallel.expert_parallel` (``parallel.ep_exchange``):

* :class:`SplitPlan` (``all_to_all``, the default): one ``all_to_all_single`` with uneven split sizes.
  The rows sent to a rank are sorted by (destination rank, local expert), so the receiver gets them
  grouped by (source rank, local expert) and must regroup them by local expert before the grouped GEMM
  (and undo that before the combine): a gather of every received row, both ways.
* :class:`ChunkPlan` (``per_expert``): one batched point-to-point exchange
  (``torch.distributed.batch_isend_irecv``; NCCL runs it as one group) with one send / receive per
  (peer rank, local expert) chunk. Each chunk is received straight into its place in an expert-major
  buffer (rows of local expert 0 from every source rank, then expert 1, ...), so no regroup pass is
  needed. The rows a rank keeps for itself are moved with one ``index_copy_`` on device.

Measured on 2 H200s (NCCL, benchmarks/README.md, fourth session): NCCL runs the chunks to one peer one after
another at ~17 us each, which costs more than the regroup saves except with 1-2 local experts; hence the default.

Both sides of every pair derive the same chunk list from the exchanged counts, so zero-row chunks are
skipped consistently and no rank waits for a message that is never sent. Chunks to one peer are posted
in local-expert order on both sides (NCCL matches point-to-point operations per peer in posting order;
gloo by tag, which is the local expert index).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["ChunkPlan", "SplitPlan", "EXCHANGES"]

#: ``parallel.ep_exchange`` values (``pipelined``: :mod:`moetrain.parallel.pipelined_exchange`; ``symmetric``:
#: :mod:`moetrain.parallel.symm_exchange`, CUDA + NCCL only).
EXCHANGES = ("all_to_all", "per_expert", "pipelined", "symmetric")


class SplitPlan:
    """One ``all_to_all_single``: ``in_splits[j]`` rows of the input go to group rank ``j``,
    ``out_splits[j]`` rows arrive from it (host ints, one per rank of the group)."""

    def __init__(self, out_splits: list[int], in_splits: list[int]):
        self.out_splits, self.in_splits = list(out_splits), list(in_splits)
        self.out_rows = sum(self.out_splits)

    def reversed(self) -> "SplitPlan":
        return SplitPlan(self.in_splits, self.out_splits)

    def launch(self, out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
        """Fills ``out [out_rows, ...]`` from contiguous ``x``; returns the work handle (async) or None."""
        return dist.all_to_all_single(out, x, output_split_sizes=self.out_splits,
                                      input_split_sizes=self.in_splits, group=group, async_op=async_op)


class _Works:
    """Wait handle over the works ``batch_isend_irecv`` returns."""

    def __init__(self, works):
        self.works = list(works or [])

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works = []


class ChunkPlan:
    """A batched send / receive of row chunks, with the rows a rank keeps for itself moved on device.

    Args:
        sends: ``(peer group rank, first row in x, rows, tag)`` per chunk sent.
        recvs: ``(peer group rank, first row in out, rows, tag)`` per chunk received.
        out_rows / in_rows: rows of the output / of the input.
        self_lo / self_rows: the rows kept locally are ``x[self_lo:self_lo + self_rows]`` (forward) ...
        self_index: ``[self_rows]`` int64 on x's device: ... and go to ``out[self_index]``.
        forward: ``False`` for the reverse plan: then ``out[self_lo:self_lo + self_rows] = x[self_index]``.
    """

    def __init__(self, sends, recvs, out_rows: int, in_rows: int, self_lo: int, self_rows: int,
                 self_index: Optional[torch.Tensor], forward: bool = True):
        self.sends, self.recvs = list(sends), list(recvs)
        self.out_rows, self.in_rows = int(out_rows), int(in_rows)
        self.self_lo, self.self_rows, self.self_index = int(self_lo), int(self_rows), self_index
        self.forward = forward

    def reversed(self) -> "ChunkPlan":
        return ChunkPlan(self.recvs, self.sends, self.in_rows, self.out_rows, self.self_lo, self.self_rows,
                         self.self_index, not self.forward)

    @classmethod
    def for_dispatch(cls, send_counts: list[int], recv_counts: list[list[int]], recv_counts_dev: torch.Tensor,
                     rank: int) -> "ChunkPlan":
        """The dispatch plan of group rank ``rank``.

        Args:
            send_counts: ``[E]`` host ints: rows this rank sends to each GLOBAL expert; its send buffer
                holds them sorted by global expert (expert ``g`` lives on rank ``g // E_local``).
            recv_counts: ``[ep][E_local]`` host ints: rows arriving from each source rank for each local
                expert (the same numbers as ``recv_counts_dev``).
            recv_counts_dev: ``[ep, E_local]`` int64 on the device of the rows (for the local index,
                computed there without a host sync).
        Returns:
            a plan whose output is expert-major: local expert 0's rows from source ranks 0..ep-1, then
            local expert 1's, ...
        """
        ep, El = len(recv_counts), len(recv_counts[0])
        send_off, acc = [], 0
        for c in send_counts:
            send_off.append(acc)
            acc += c
        recv_off, acc = [[0] * ep for _ in range(El)], 0
        for e in range(El):
            for s in range(ep):
                recv_off[e][s] = acc
                acc += recv_counts[s][e]
        out_rows = acc
        sends = [(d, send_off[d * El + e], send_counts[d * El + e], e)
                 for d in range(ep) if d != rank for e in range(El) if send_counts[d * El + e]]
        recvs = [(s, recv_off[e][s], recv_counts[s][e], e)
                 for s in range(ep) if s != rank for e in range(El) if recv_counts[s][e]]
        self_lo, self_rows = send_off[rank * El], sum(send_counts[rank * El:(rank + 1) * El])
        index = None
        if self_rows:
            rc = recv_counts_dev.to(torch.int64)
            flat = rc.t().reshape(-1)                                # expert-major [El * ep]
            dst_lo = (torch.cumsum(flat, 0) - flat).view(El, ep)[:, rank]
            mine = rc[rank]
            src_lo = torch.cumsum(mine, 0) - mine
            index = torch.repeat_interleave(dst_lo - src_lo, mine, output_size=self_rows)
            index += torch.arange(self_rows, device=index.device)
        return cls(sends, recvs, out_rows, sum(send_counts), self_lo, self_rows, index)

    def launch(self, out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
        """Fills ``out [out_rows, ...]`` from contiguous ``x``; returns a wait handle (async) or None."""
        if self.self_rows:
            if self.forward:
                out.index_copy_(0, self.self_index, x[self.self_lo:self.self_lo + self.self_rows])
            else:
                torch.index_select(x, 0, self.self_index, out=out[self.self_lo:self.self_lo + self.self_rows])
        ranks = dist.get_process_group_ranks(group) if group is not None else None

        def peer(p):
            return ranks[p] if ranks is not None else p

        ops = [dist.P2POp(dist.isend, x[lo:lo + n], peer(p), group, tag) for p, lo, n, tag in self.sends]
        ops += [dist.P2POp(dist.irecv, out[lo:lo + n], peer(p), group, tag) for p, lo, n, tag in self.recvs]
        handle = _Works(dist.batch_isend_irecv(ops) if ops else [])
        if async_op:
            return handle
        handle.wait()
        return None
