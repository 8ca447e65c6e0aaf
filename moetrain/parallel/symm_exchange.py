"""The symmetric-memory token exchange (``parallel.ep_exchange=symmetric``; CUDA GPUs with NCCL only).

No NCCL all-to-all and no separate permute / regroup / unpermute passes: every rank computes on the device
where each of its token copies lands (rank, row of that rank's expert-major receive buffer) and one Triton
kernel (:mod:`kernels.p2p`) stores each token's K copies straight into the peers' buffers (dispatch); the
combine pulls each token's K expert outputs from the peers and sums them with the routing weights in the same
kernel. The buffers are ``torch.distributed._symmetric_memory`` allocations mapped into every rank of the
``"ep"`` group; device-side barriers order the writes and reads. Measured on 2 H200s (benchmarks/README.md,
fifth session): the peer stores move rows at 0.9x NCCL's all-to-all time.

Per MoE forward (rank ``me``, ``E_local`` experts per rank)::

    routing      stable counting sort of the copies by expert; counts [E] all-gathered -> c [ep, E]
    destination  copy (t, k) of expert g on rank r = g // E_local, local expert e:
                 row = (rows of r's experts before e) + (rows of g from ranks before me) + (its rank among
                 this rank's copies of g): expert-major, then source rank, then token order (as the other
                 exchanges)
    dispatch     barrier; push x rows to (rank, row); barrier; copy this rank's M rows out of its buffer
    combine      barrier; copy the expert outputs into the buffer; barrier; pull + weighted sum per token
    backward     combine: barrier; push w * dy rows; barrier; copy out (dw from the pulled rows, kept)
                 dispatch: barrier; copy the gradient rows in; barrier; pull + sum per token

One buffer per (group, dtype, D) is shared by all layers and grows (collectively: every rank sees the same
counts) when a step needs more rows; each phase starts with a barrier, so no rank writes into a buffer a
peer still reads. One host sync per dispatch (the received row count, for the copy-out).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["SymmRoute", "SymmBuffer", "destinations", "build_symm_route", "symm_dispatch", "symm_combine"]


def destinations(ids: torch.Tensor, row_of: torch.Tensor, counts: torch.Tensor, c_all: torch.Tensor, me: int,
                 n_experts: int):
    """Where every token copy goes: ``(rank [N, K], row [N, K])`` int64 (rank -1 for dropped copies, whose
    ids are ``>= n_experts``).

    Args:
        ids: ``[N, K]`` expert ids (bins ``>= n_experts`` = dropped). row_of: ``[N*K]`` the copy's position in
        this rank's stable sort of the ids. counts: ``[n_bins]`` this rank's copies per bin. c_all: ``[ep, E]``
        every rank's ``counts[:E]``. me: this rank's index in the group.
    """
    ep, E = c_all.shape
    El = E // ep
    flat = ids.reshape(-1)
    kept = flat < E
    g = torch.where(kept, flat, torch.zeros_like(flat))
    total = c_all.sum(0).view(ep, El)
    em_start = (torch.cumsum(total, 1) - total).reshape(-1)          # first row of expert g on its rank
    src_off = c_all[:me].sum(0)                                       # rows of g sent by the ranks before me
    first = torch.cumsum(counts, 0) - counts                          # this rank's first sorted copy of each bin
    row = em_start[g] + src_off[g] + row_of - first[g]
    rank = torch.where(kept, g // El, torch.full_like(g, -1))
    return rank.view_as(ids), row.view_as(ids)


class SymmBuffer:
    """A symmetric-memory buffer ``[capacity, D]`` shared by every MoE layer on one group, with its handle and
    the per-peer offsets :mod:`kernels.p2p` addresses the peers' mappings by."""

    _cache: dict = {}

    def __init__(self, group, dtype: torch.dtype, D: int, device: torch.device):
        self.group, self.dtype, self.D, self.device = group, dtype, D, device
        self.capacity = 0
        self.tensor = self.handle = self.delta = None

    @classmethod
    def get(cls, group, dtype, D, device) -> "SymmBuffer":
        key = (id(group), dtype, D, str(device))
        if key not in cls._cache:
            cls._cache[key] = cls(group, dtype, D, device)
        return cls._cache[key]

    def ensure(self, rows: int) -> None:
        """Grows to at least ``rows`` rows (collective: every rank of the group calls it with the same value)."""
        if rows <= self.capacity:
            return
        import torch.distributed._symmetric_memory as symm_mem
        capacity = max(rows, int(self.capacity * 1.25), 1)
        self.tensor = self.handle = None
        torch.cuda.synchronize(self.device)
        self.tensor = symm_mem.empty((capacity, self.D), dtype=self.dtype, device=self.device)
        self.handle = symm_mem.rendezvous(self.tensor, self.group.group_name)
        base = self.tensor.data_ptr()
        self.delta = torch.tensor([(p - base) // self.tensor.element_size() for p in self.handle.buffer_ptrs],
                                  dtype=torch.int64, device=self.device)
        self.capacity = capacity

    def barrier(self) -> None:
        self.handle.barrier(channel=0)


@dataclass
class SymmRoute:
    """One MoE forward's destinations (:func:`destinations`), this rank's received and sent row counts (host
    ints), its tokens per local expert and the group's buffer."""

    rank: torch.Tensor
    row: torch.Tensor
    M: int
    sent: int
    tokens_per_expert: torch.Tensor
    buffer: SymmBuffer
    meter: object = None

    def measure(self, nbytes: int):
        """The meter's context for one transfer phase (barriers, copies and the push / pull kernel)."""
        return self.meter.measure(self.row.device, nbytes)


def build_symm_route(ids: torch.Tensor, n_bins: int, n_experts: int, group, me: int, row_ops, dtype: torch.dtype,
                     D: int, meter) -> SymmRoute:
    """Routing, the counts all-gather and the destinations; one host sync (every rank's received rows, to size
    the shared buffer and this rank's copy-out). ``meter``: an ``A2AMeter`` for the all-gather and every
    transfer phase of the dispatch and combine, forward and backward (time on the stream, bytes pushed/pulled)."""
    ep = dist.get_world_size(group)
    counts, _, row_of = row_ops.routing(ids, n_bins)
    c_all = torch.empty(ep, n_experts, dtype=torch.int64, device=ids.device)
    with meter.measure(ids.device, c_all.numel() * c_all.element_size()):
        dist.all_gather_into_tensor(c_all, counts[:n_experts].contiguous(), group=group)
        per_rank = c_all.sum(0).view(ep, -1)
        host = torch.cat([per_rank.sum(1), c_all[me].sum().view(1)]).tolist()  # the one host sync
    received, sent = host[:ep], int(host[ep])
    rank, row = destinations(ids, row_of, counts, c_all, me, n_experts)
    buf = SymmBuffer.get(group, dtype, D, ids.device)
    buf.ensure(max(received))
    return SymmRoute(rank, row, int(received[me]), sent, per_rank[me], buf, meter)


class _SymmDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, route):
        from kernels.p2p import push_rows
        ctx.route, ctx.N = route, x.shape[0]
        b = route.buffer
        with route.measure(route.sent * x.shape[1] * x.element_size()):
            b.barrier()
            push_rows(x, None, route.rank, route.row, b.delta, b.tensor)
            b.barrier()
        return b.tensor[:route.M].clone()

    @staticmethod
    def backward(ctx, g):
        from kernels.p2p import pull_sum
        route = ctx.route
        b = route.buffer
        dx = g.new_empty((ctx.N, g.shape[1]))
        with route.measure(route.sent * g.shape[1] * b.tensor.element_size()):
            b.barrier()
            b.tensor[:route.M].copy_(g)
            b.barrier()
            pull_sum(b.tensor, None, route.rank, route.row, b.delta, dx)
        return dx, None


class _SymmCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_y, topk_weights, route, out_dtype):
        from kernels.p2p import pull_sum
        b = route.buffer
        N, K = route.rank.shape
        w = topk_weights.contiguous()
        y = expert_y.new_empty((N, expert_y.shape[1]), dtype=out_dtype)
        ys = expert_y.new_empty((N * K, expert_y.shape[1]), dtype=b.dtype)
        with route.measure(route.sent * expert_y.shape[1] * b.tensor.element_size()):
            b.barrier()
            b.tensor[:route.M].copy_(expert_y)
            b.barrier()
            pull_sum(b.tensor, w, route.rank, route.row, b.delta, y, ys)
        ctx.route = route
        ctx.save_for_backward(ys, w)
        return y

    @staticmethod
    def backward(ctx, g):
        from kernels.p2p import push_rows
        route = ctx.route
        ys, w = ctx.saved_tensors
        N, K = w.shape
        b = route.buffer
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (ys.view(N, K, ys.shape[1]).float() * g.float().unsqueeze(1)).sum(-1).to(w.dtype)
        with route.measure(route.sent * g.shape[1] * b.tensor.element_size()):
            b.barrier()
            push_rows(g, w, route.rank, route.row, b.delta, b.tensor)
            b.barrier()
        g_y = b.tensor[:route.M].clone()
        return (g_y if ctx.needs_input_grad[0] else None), dw, None, None


def symm_dispatch(x: torch.Tensor, route: SymmRoute) -> torch.Tensor:
    """``x [N, D]`` -> ``[route.M, D]`` this rank's received rows, expert-major (differentiable; collective)."""
    return _SymmDispatch.apply(x.to(route.buffer.dtype), route)


def symm_combine(expert_y: torch.Tensor, topk_weights: torch.Tensor, route: SymmRoute,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """``expert_y [route.M, D]`` -> ``[N, D]`` in ``out_dtype``, weighted by ``topk_weights`` (fp32 sum over k;
    dropped copies contribute 0); differentiable in both inputs; collective."""
    return _SymmCombine.apply(expert_y.to(route.buffer.dtype), topk_weights, route, out_dtype)
