"""The symmetric-memory token exchange (``parallel.ep_exchange=symmetric``; CUDA GPUs with NCCL, or CPU with gloo).

No NCCL all-to-all and no separate permute / regroup / unpermute passes: every rank computes on the device
where each of its token copies lands (rank, row of that rank's expert-major receive buffer) and one Triton
kernel (:mod:`kernels.p2p`) stores each token's K copies straight into the peers' buffers (dispatch); the
combine pulls each token's K expert outputs from the peers and sums them with the routing weights in the same
kernel. The buffers are ``torch.distributed._symmetric_memory`` allocations mapped into every rank of the
``"ep"`` group; device-side barriers order the writes and reads. Measured on 2 H200s (benchmarks/README.md,
fifth session): the peer stores move rows at 0.9x NCCL's all-to-all time. On CPU the buffers are files in /dev/shm
mapped by every rank and the transfers PyTorch indexing (:class:`SymmBuffer`): the same protocol, so the gloo
equivalence tests cover it.

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

import os
import tempfile
import uuid
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
    """A buffer ``[capacity, D]`` of every rank of one group that each rank can read and write, shared by every MoE
    layer on that group.

    On CUDA: a ``torch.distributed._symmetric_memory`` allocation; :mod:`kernels.p2p` addresses the peers'
    buffers through this rank's mappings of them (``delta``), barriers run on the device. On CPU (gloo): every rank's
    buffer is a file in ``/dev/shm`` that all ranks map (``peers[r]`` is rank r's buffer; the files are unlinked as
    soon as all ranks hold their mappings), the transfers are PyTorch indexing on those mappings and the barriers are
    ``dist.barrier`` -- the same protocol, for tests and CPU runs."""

    _cache: dict = {}

    def __init__(self, group, dtype: torch.dtype, D: int, device: torch.device):
        self.group, self.dtype, self.D, self.device = group, dtype, D, device
        self.capacity = 0
        self.tensor = self.handle = self.delta = None
        self.peers = None  # CPU: every rank's buffer, in group rank order

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
        capacity = max(rows, int(self.capacity * 1.25), 1)
        self.tensor = self.handle = self.peers = None
        if self.device.type == "cuda":
            import torch.distributed._symmetric_memory as symm_mem
            torch.cuda.synchronize(self.device)
            self.tensor = symm_mem.empty((capacity, self.D), dtype=self.dtype, device=self.device)
            self.handle = symm_mem.rendezvous(self.tensor, self.group.group_name)
            base = self.tensor.data_ptr()
            self.delta = torch.tensor([(p - base) // self.tensor.element_size() for p in self.handle.buffer_ptrs],
                                      dtype=torch.int64, device=self.device)
        else:
            self.peers = _map_shared(self.group, capacity, self.D, self.dtype)
            self.tensor = self.peers[dist.get_rank(self.group)]
        self.capacity = capacity

    def barrier(self) -> None:
        if self.peers is None:
            self.handle.barrier(channel=0)
        else:
            dist.barrier(group=self.group)

    def push(self, x: torch.Tensor, w, rank: torch.Tensor, row: torch.Tensor) -> None:
        """``BUF_{rank[t,k]}[row[t,k]] = [w[t,k] *] x[t]`` (copies with rank < 0 skipped; fp32 product)."""
        if self.peers is None:
            from kernels.p2p import push_rows
            push_rows(x, w, rank, row, self.delta, self.tensor)
            return
        for r, buf in enumerate(self.peers):
            t, k = (rank == r).nonzero(as_tuple=True)
            v = x[t] if w is None else x[t].float() * w[t, k].float().unsqueeze(1)
            buf[row[t, k]] = v.to(buf.dtype)

    def pull_sum(self, w, rank: torch.Tensor, row: torch.Tensor, out: torch.Tensor, rows=None) -> None:
        """``out[t] = sum_k [w[t,k] *] BUF_{rank[t,k]}[row[t,k]]`` (fp32, k in order; rank < 0 adds 0); with
        ``rows [N*K, D]`` also the pulled rows (0 for rank < 0)."""
        if self.peers is None:
            from kernels.p2p import pull_sum
            pull_sum(self.tensor, w, rank, row, self.delta, out, rows)
            return
        N, K = rank.shape
        vals = torch.zeros(N, K, self.D, dtype=self.dtype, device=out.device)
        for r, buf in enumerate(self.peers):
            m = rank == r
            vals[m] = buf[row[m]]
        if rows is not None:
            rows.copy_(vals.view(N * K, self.D))
        acc = torch.zeros(N, self.D, dtype=torch.float32, device=out.device)
        for k in range(K):
            acc += vals[:, k].float() if w is None else w[:, k].float().unsqueeze(1) * vals[:, k].float()
        out.copy_(acc)


def _map_shared(group, capacity: int, D: int, dtype: torch.dtype) -> list:
    """Every rank's ``[capacity, D]`` buffer as files in /dev/shm mapped by all ranks (collective)."""
    me, ws = dist.get_rank(group), dist.get_world_size(group)
    tag = [uuid.uuid4().hex if me == 0 else None]
    dist.broadcast_object_list(tag, group_src=0, group=group)
    root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    paths = [os.path.join(root, f"moetrain-symm-{tag[0]}-{r}") for r in range(ws)]
    n = capacity * D
    torch.from_file(paths[me], shared=True, size=n, dtype=dtype)  # creates this rank's file
    dist.barrier(group=group)
    peers = [torch.from_file(p, shared=True, size=n, dtype=dtype).view(capacity, D) for p in paths]
    dist.barrier(group=group)
    os.unlink(paths[me])  # the mappings stay valid; nothing is left behind in /dev/shm
    return peers


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


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """``out [ep * n]`` = every rank's ``inp [n]`` (torch >= 2.12 names it ``all_gather_single``)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def build_symm_route(ids: torch.Tensor, n_bins: int, n_experts: int, group, me: int, row_ops, dtype: torch.dtype,
                     D: int, meter) -> SymmRoute:
    """Routing, the counts all-gather and the destinations; one host sync (every rank's received rows, to size
    the shared buffer and this rank's copy-out). ``meter``: an ``A2AMeter`` for the all-gather and every
    transfer phase of the dispatch and combine, forward and backward (time on the stream, bytes pushed/pulled)."""
    ep = dist.get_world_size(group)
    counts, _, row_of = row_ops.routing(ids, n_bins)
    c_all = torch.empty(ep, n_experts, dtype=torch.int64, device=ids.device)
    with meter.measure(ids.device, c_all.numel() * c_all.element_size()):
        _all_gather(c_all.view(-1), counts[:n_experts].contiguous(), group)
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
        ctx.route, ctx.N = route, x.shape[0]
        b = route.buffer
        with route.measure(route.sent * x.shape[1] * x.element_size()):
            b.barrier()
            b.push(x, None, route.rank, route.row)
            b.barrier()
        return b.tensor[:route.M].clone()

    @staticmethod
    def backward(ctx, g):
        route = ctx.route
        b = route.buffer
        dx = g.new_empty((ctx.N, g.shape[1]))
        with route.measure(route.sent * g.shape[1] * b.tensor.element_size()):
            b.barrier()
            b.tensor[:route.M].copy_(g)
            b.barrier()
            b.pull_sum(None, route.rank, route.row, dx)
        return dx, None


class _SymmCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_y, topk_weights, route, out_dtype):
        b = route.buffer
        N, K = route.rank.shape
        w = topk_weights.contiguous()
        y = expert_y.new_empty((N, expert_y.shape[1]), dtype=out_dtype)
        ys = expert_y.new_empty((N * K, expert_y.shape[1]), dtype=b.dtype)
        with route.measure(route.sent * expert_y.shape[1] * b.tensor.element_size()):
            b.barrier()
            b.tensor[:route.M].copy_(expert_y)
            b.barrier()
            b.pull_sum(w, route.rank, route.row, y, ys)
        ctx.route = route
        ctx.save_for_backward(ys, w)
        return y

    @staticmethod
    def backward(ctx, g):
        route = ctx.route
        ys, w = ctx.saved_tensors
        N, K = w.shape
        b = route.buffer
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (ys.view(N, K, ys.shape[1]).float() * g.float().unsqueeze(1)).sum(-1).to(w.dtype)
        with route.measure(route.sent * g.shape[1] * b.tensor.element_size()):
            b.barrier()
            b.push(g, w, route.rank, route.row)
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
