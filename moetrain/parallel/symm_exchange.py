"""The symmetric-memory token exchange (``parallel.ep_exchange=symmetric``; CUDA GPUs with NCCL, or CPU with gloo).

No NCCL all-to-all and no separate permute / regroup / unpermute passes: every rank computes on the device
where each of its token copies lands (rank, row of that rank's expert-major receive buffer) and one Triton
kernel (:mod:`kernels.p2p`) stores each token's K copies straight into the peers' buffers (dispatch); the
combine pulls each token's K expert outputs from the peers and sums them with the routing weights in the same
kernel. The buffers are ``torch.distributed._symmetric_memory`` allocations mapped into every rank of the
``"ep"`` group; device-side barriers order the writes and reads. Measured on 2 H200s (benchmarks/README.md,
fifth session): plain copies (``copy_``) into the peers' buffers took 0.9x NCCL's all-to-all time; the kernels' peer
loads and stores are 16-byte vectors when every peer offset is a multiple of 16 elements (checked per buffer; until
the fix of 2026-12-01 they were 2-byte accesses, in every run so far). On CPU the buffers are files in /dev/shm
mapped by every rank (:class:`SymmBuffer`) and the transfers the same Triton kernels in Triton's interpreter
(addressing this process's mappings of the peers' files; the tests), or PyTorch indexing without it: the same
protocol, so the gloo equivalence tests cover it.

Per MoE forward (rank ``me``, ``E_local`` experts per rank)::

    routing      stable counting sort of the copies by expert; counts [E] all-gathered -> c [ep, E]; the
                 received / sent row counts start their copy to the host (no wait)
    destination  copy (t, k) of expert g on rank r = g // E_local, local expert e:
                 row = (rows of r's experts before e) + (rows of g from ranks before me) + (its rank among
                 this rank's copies of g): expert-major, then source rank, then token order (as the other
                 exchanges); ``base[g]`` (:func:`route_table`) holds all but the last term, the push kernel
                 adds it and writes (rank, row) out for the combine
    dispatch     barrier; push x rows to (rank, row) of the layer's dispatch buffers; barrier; then the host
                 waits for the counts (the GPU is still pushing); this rank's M rows are returned as a view of
                 its buffer (no copy: they stay there for the experts' backward)
    combine      copy the expert outputs into the group's combine buffer; barrier; pull + weighted sum per token
    backward     combine: barrier; push w * dy rows into the combine buffers; barrier; the gradient rows are a
                 view of this rank's (dw from the pulled rows, kept)
                 dispatch: copy the gradient rows into the layer's buffer; barrier; pull + sum per token

Buffers: one dispatch buffer per MoE layer (its rows are that layer's saved expert input, so a second forward of
the layer before its backward is refused, :meth:`SymmRoute.check_rows_valid`) and one combine buffer per (group,
dtype, D). A push phase starts with a barrier (no peer still reads a buffer it writes) and ends with one; a copy-in
needs one only when a pull may still be reading (:meth:`SymmBuffer.begin_local_write`): three barriers per
dispatch + combine. The push skips rows past the buffer's capacity; when the counts, known on the host after the
push is queued, say it was too small, every rank (all see the same counts) grows it and pushes again, so the one
host sync per dispatch does not stall the GPU.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["SymmRoute", "SymmBuffer", "route_table", "rank_and_row", "destinations", "build_symm_route",
           "symm_dispatch", "symm_wait", "symm_combine"]


def route_table(counts: torch.Tensor, c_all: torch.Tensor, me: int) -> torch.Tensor:
    """``base [E]`` int64 such that copy (t, k) of expert ``g`` lands in row ``base[g] + row_of[t*K + k]`` of rank
    ``g // E_local``'s buffer: (rows of that rank's experts before g) + (rows of g from the ranks before me) - (this
    rank's copies sorted before its first copy of g).

    Args:
        counts: ``[n_bins]`` this rank's copies per bin (bins ``>= E``: dropped). c_all: ``[ep, E]`` every rank's
        ``counts[:E]``. me: this rank's index in the group.
    """
    ep, E = c_all.shape
    total = c_all.sum(0).view(ep, E // ep)
    em_start = (torch.cumsum(total, 1) - total).reshape(-1)          # first row of expert g on its rank
    src_off = c_all[:me].sum(0)                                       # rows of g sent by the ranks before me
    first = torch.cumsum(counts[:E], 0) - counts[:E]                  # this rank's first sorted copy of each g
    return em_start + src_off - first


def rank_and_row(ids: torch.Tensor, row_of: torch.Tensor, base: torch.Tensor, e_local: int):
    """``(rank [N, K], row [N, K])`` int64 from :func:`route_table`'s ``base`` (rank -1 for dropped copies, ids
    ``>= len(base)``); what ``kernels.p2p.push_rows_routed`` computes inside its kernel."""
    E = base.numel()
    flat = ids.reshape(-1).to(torch.int64)
    kept = flat < E
    g = torch.where(kept, flat, torch.zeros_like(flat))
    row = base[g] + row_of
    rank = torch.where(kept, g // e_local, torch.full_like(g, -1))
    return rank.view(ids.shape), row.view(ids.shape)


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
    return rank_and_row(ids, row_of, route_table(counts, c_all, me), E // ep)


class _GroupState:
    """Per group: whether a pull may still be reading any of its buffers (no barrier since). Any barrier of the
    group orders every rank's earlier work, whichever buffer it was called on."""

    _all: dict = {}

    def __init__(self):
        self.readers = False

    @classmethod
    def of(cls, group) -> "_GroupState":
        return cls._all.setdefault(_group_key(group), cls())


def _group_key(group):
    """A key naming ``group`` for the process's lifetime (its unique name; an id could be reused)."""
    return getattr(group, "group_name", None) or id(group)


class SymmBuffer:
    """A buffer ``[capacity, D]`` of every rank of one group that each rank can read and write: one per MoE layer for
    its dispatch (the received rows stay there for the experts' backward), one shared by all layers for the combine
    (:func:`build_symm_route`).

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
        self.state = _GroupState.of(group)
        self.generation = 0  # push phases so far (a dispatch's rows are valid while it has not moved on)

    @classmethod
    def get(cls, group, dtype, D, device) -> "SymmBuffer":
        """The group's shared buffer for (dtype, D, device)."""
        key = (_group_key(group), dtype, D, str(device))
        if key not in cls._cache:
            cls._cache[key] = cls(group, dtype, D, device)
        return cls._cache[key]

    def ensure(self, rows: int) -> None:
        """Grows to at least ``rows`` rows (collective: every rank of the group calls it with the same value)."""
        if rows <= self.capacity:
            return
        capacity = max(rows, int(self.capacity * 1.25), 1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # nothing queued still reads or writes the old buffers
        self.tensor = self.handle = self.peers = None
        if self.device.type == "cuda":
            import torch.distributed._symmetric_memory as symm_mem
            self.tensor = symm_mem.empty((capacity, self.D), dtype=self.dtype, device=self.device)
            self.handle = symm_mem.rendezvous(self.tensor, self.group.group_name)
            base = self.tensor.data_ptr()
            if self.handle.buffer_ptrs[dist.get_rank(self.group)] != base:  # the kernels address peers from it
                raise RuntimeError("symmetric memory: this rank's buffer pointer in the rendezvous handle is not the "
                                   "tensor's (an offset inside a memory pool?); use parallel.ep_exchange=pipelined")
            self.delta = torch.tensor([(p - base) // self.tensor.element_size() for p in self.handle.buffer_ptrs],
                                      dtype=torch.int64, device=self.device)
        else:
            self.peers = _map_shared(self.group, capacity, self.D, self.dtype)
            self.tensor = self.peers[dist.get_rank(self.group)]
            base = self.tensor.data_ptr()  # this process's mappings of the peers' files, as the kernels address them
            self.delta = torch.tensor([(p.data_ptr() - base) // self.tensor.element_size() for p in self.peers],
                                      dtype=torch.int64)
        self.capacity = capacity

    @property
    def kernels(self) -> bool:
        """Whether the transfers run the :mod:`kernels.p2p` kernels: always on CUDA; on CPU when Triton's interpreter
        is on (the tests: the same kernels as on GPUs, addressing the peers' mappings) and :attr:`cpu_kernels`."""
        if self.peers is None:
            return True
        if not SymmBuffer.cpu_kernels:
            return False
        try:
            from kernels._utils import interpreting
        except ImportError:  # no Triton
            return False
        return interpreting()

    cpu_kernels: bool = True  # class switch: False keeps the CPU transfers on PyTorch indexing (tests of both)

    def barrier(self) -> None:
        if self.peers is None:
            self.handle.barrier(channel=0)
        else:
            dist.barrier(group=self.group)
        self.state.readers = False

    # The phases. A push phase writes into the peers' buffers: it starts with a barrier (a peer may still read its
    # buffer: a pull, or its copy-out) and ends with one (the rows are complete). A pull phase first writes this
    # rank's own buffer (copy-in), which needs a barrier only if a pull may still be reading it (a push phase
    # ended with a barrier, after which nobody touches a peer's buffer), then publishes it with a barrier.
    def begin_push(self) -> None:
        self.barrier()
        self.generation += 1

    def end_push(self) -> None:
        self.barrier()

    def begin_local_write(self) -> None:
        if self.state.readers:
            self.barrier()

    def publish(self) -> None:
        """After the copy-in, before the pull; the pull that follows reads the buffers (``readers``)."""
        self.barrier()
        self.state.readers = True

    def push(self, x: torch.Tensor, w, rank: torch.Tensor, row: torch.Tensor) -> None:
        """``BUF_{rank[t,k]}[row[t,k]] = [w[t,k] *] x[t]`` (copies with rank < 0 skipped; fp32 product)."""
        if self.kernels:
            from kernels.p2p import push_rows
            push_rows(x, w, rank, row, self.delta, self.tensor)
            torch.autograd.graph.increment_version(self.tensor)  # written in place, as on CPU (autograd's checks)
            return
        for r, buf in enumerate(self.peers):
            t, k = ((rank == r) & (row < self.capacity)).nonzero(as_tuple=True)
            v = x[t] if w is None else x[t].float() * w[t, k].float().unsqueeze(1)
            buf[row[t, k]] = v.to(buf.dtype)

    def push_routed(self, x: torch.Tensor, ids: torch.Tensor, row_of: torch.Tensor, base: torch.Tensor,
                    e_local: int):
        """:meth:`push` with the destinations from the expert ids (:func:`rank_and_row`, computed inside the
        kernel on CUDA); returns them ``(rank, row)``. Rows past the capacity are not stored."""
        if self.kernels:
            from kernels.p2p import push_rows_routed
            dest = push_rows_routed(x, ids, row_of, base, base.numel(), e_local, self.delta, self.tensor)
            torch.autograd.graph.increment_version(self.tensor)
            return dest
        rank, row = rank_and_row(ids, row_of, base, e_local)
        self.push(x, None, rank, row)
        return rank, row

    def pull_sum(self, w, rank: torch.Tensor, row: torch.Tensor, out: torch.Tensor, rows=None) -> None:
        """``out[t] = sum_k [w[t,k] *] BUF_{rank[t,k]}[row[t,k]]`` (fp32, k in order; rank < 0 adds 0); with
        ``rows [N*K, D]`` also the pulled rows (0 for rank < 0)."""
        if self.kernels:
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
    root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    n = capacity * D
    need = ws * n * torch.empty((), dtype=dtype).element_size()  # every rank's file (one host: gloo on CPU)
    st = os.statvfs(root)
    free = st.f_bavail * st.f_frsize
    ok = torch.tensor([1 if free >= need else 0])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)  # the same decision on every rank
    if not ok.item():
        from moetrain.parallel.parallelize import UnavailableFeature
        raise UnavailableFeature(
            f"parallel.ep_exchange=symmetric on CPU: {root} has {free / 2**20:.0f} MiB free on some rank, its "
            f"buffers need {need / 2**20:.0f} MiB more; enlarge {root} (docker run --shm-size) or use "
            "parallel.ep_exchange=pipelined")
    tag = [uuid.uuid4().hex if me == 0 else None]
    dist.broadcast_object_list(tag, group_src=0, group=group)
    paths = [os.path.join(root, f"moetrain-symm-{tag[0]}-{r}") for r in range(ws)]
    torch.from_file(paths[me], shared=True, size=n, dtype=dtype)  # creates this rank's file
    dist.barrier(group=group)
    peers = [torch.from_file(p, shared=True, size=n, dtype=dtype).view(capacity, D) for p in paths]
    dist.barrier(group=group)
    os.unlink(paths[me])  # the mappings stay valid; nothing is left behind in /dev/shm
    return peers


class _HostInts:
    """A small int64 device tensor copied to the host without waiting: ``get()`` waits only for that copy."""

    def __init__(self, t: torch.Tensor):
        self.event = None
        if t.is_cuda:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = t

    def get(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


@dataclass
class SymmRoute:
    """One MoE forward's routing: the copies' expert ids and sorted positions, :func:`route_table`'s ``base``, the
    received / sent row counts (on their way to the host), this rank's tokens per local expert and the group's
    buffer. The dispatch fills in the destinations (``rank``, ``row``) and, after its push is queued, the host
    counts (``M`` rows received here, ``sent``, ``received`` per rank)."""

    ids: torch.Tensor
    row_of: torch.Tensor
    base: torch.Tensor
    e_local: int
    me: int
    counts_host: _HostInts
    tokens_per_expert: torch.Tensor
    buffer: SymmBuffer          # this layer's dispatch buffer
    combine_buffer: SymmBuffer  # the group's shared combine buffer
    meter: object = None
    rank: torch.Tensor = None
    row: torch.Tensor = None
    M: int = -1
    sent: int = -1
    received: list = None
    generation: int = -1  # the dispatch buffer's generation that holds this route's rows
    async_push: bool = False  # CUDA: the dispatch push on a side stream (symm_wait before the rows are read)
    pushed: object = None     # its completion event until symm_wait

    def check_rows_valid(self) -> None:
        """Raises if the dispatch buffer was pushed into again since this route's dispatch (its rows, which the
        experts' backward reads, are gone)."""
        if self.buffer.generation != self.generation:
            raise RuntimeError("parallel.ep_exchange=symmetric: this MoE layer's received rows were replaced by "
                               "another forward of the layer (or a backward) before this backward; run each "
                               "forward's backward once before the next forward, or use parallel.ep_exchange=pipelined")

    def resolve(self) -> None:
        """The one host sync of the dispatch: every rank's received rows and this rank's sent rows."""
        if self.M < 0:
            host = self.counts_host.get()
            self.received, self.sent = host[:-1], int(host[-1])
            self.M = int(self.received[self.me])

    def measure(self, nbytes: int = 0):
        """The meter's context for one transfer phase (barriers, copies and the push / pull kernel)."""
        return self.meter.measure(self.ids.device, nbytes)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """``out [ep * n]`` = every rank's ``inp [n]`` (torch >= 2.12 names it ``all_gather_single``)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def build_symm_route(ids: torch.Tensor, n_bins: int, n_experts: int, group, me: int, row_ops, dtype: torch.dtype,
                     D: int, meter, owner: dict) -> SymmRoute:
    """Routing (a stable counting sort of the copies by expert), the counts all-gather and :func:`route_table`,
    all on the device; the received / sent counts start their copy to the host, which the dispatch waits for only
    after its push is queued. ``meter``: an ``A2AMeter`` for the all-gather and every transfer phase of the dispatch
    and combine, forward and backward (time on the stream, bytes pushed / pulled). ``owner``: a dict kept by the
    layer (its dispatcher) that holds the layer's dispatch buffer, freed with it."""
    ep = dist.get_world_size(group)
    counts, _, row_of = row_ops.routing(ids, n_bins)
    c_all = torch.empty(ep, n_experts, dtype=torch.int64, device=ids.device)
    with meter.measure(ids.device, c_all.numel() * c_all.element_size()):
        _all_gather(c_all.view(-1), counts[:n_experts].contiguous(), group)
    per_rank = c_all.sum(0).view(ep, -1)
    host = _HostInts(torch.cat([per_rank.sum(1), c_all[me].sum().view(1)]))
    base = route_table(counts, c_all, me)
    key = (dtype, D, str(ids.device))
    if key not in owner:
        owner[key] = SymmBuffer(group, dtype, D, ids.device)
    return SymmRoute(ids, row_of, base, n_experts // ep, me, host, per_rank[me], owner[key],
                     SymmBuffer.get(group, dtype, D, ids.device), meter)


_COMM_STREAMS: dict = {}


def _comm_stream(device: torch.device):
    """The side stream of the asynchronous dispatch push on ``device`` (one per device)."""
    key = str(device)
    if key not in _COMM_STREAMS:
        _COMM_STREAMS[key] = torch.cuda.Stream(device)
    return _COMM_STREAMS[key]


class _SymmDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, route):
        ctx.route, ctx.N = route, x.shape[0]
        b = route.buffer
        if b.capacity == 0:  # first use: learn the sizes before pushing
            route.resolve()
            b.ensure(max(route.received))
        side = _comm_stream(x.device) if route.async_push and x.is_cuda else None
        if side is not None:  # the push on a side stream: the caller's next work (shared experts) runs meanwhile
            side.wait_stream(torch.cuda.current_stream(x.device))
        # the meter times the compute stream: the push here, or (side stream) the exposed wait in symm_wait
        with _on(side), _measured(route, side is None):
            b.begin_push()
            route.rank, route.row = b.push_routed(x, route.ids, route.row_of, route.base, route.e_local)
            b.end_push()
        route.resolve()  # the host sync, while the push runs
        need = max(route.received)
        if need > b.capacity:  # rows past the capacity were not stored: grow (every rank sees the same counts)
            b.ensure(need)
            if side is not None:
                side.wait_stream(torch.cuda.current_stream(x.device))
            with _on(side), _measured(route, side is None):
                b.begin_push()
                b.push(x, None, route.rank, route.row)
                b.end_push()
        if side is not None:
            main = torch.cuda.current_stream(x.device)
            for t in (x, route.ids, route.row_of, route.base):  # read on the side stream, freed by the caller
                t.record_stream(side)
            for t in (route.rank, route.row):  # made on the side stream, read later on the caller's
                t.record_stream(main)
            route.pushed = torch.cuda.Event()
            route.pushed.record(side)
        route.generation = b.generation
        route.meter.add_bytes(route.sent * x.shape[1] * b.tensor.element_size())
        return b.tensor[:route.M]  # a view: valid until this layer's next dispatch or its dispatch backward

    @staticmethod
    def backward(ctx, g):
        route = ctx.route
        b = route.buffer
        dx = g.new_empty((ctx.N, g.shape[1]))
        route.check_rows_valid()
        b.generation += 1  # the gradient rows replace the received ones (a second backward would find them gone)
        with route.measure(route.sent * g.shape[1] * b.tensor.element_size()):
            b.begin_local_write()
            b.tensor[:route.M].copy_(g)
            b.publish()
            b.pull_sum(None, route.rank, route.row, dx)
        return dx, None


class _SymmCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_y, topk_weights, route, out_dtype):
        b = route.combine_buffer
        b.ensure(max(route.received))  # collective: every rank has the same counts
        N, K = route.rank.shape
        w = topk_weights.contiguous()
        y = expert_y.new_empty((N, expert_y.shape[1]), dtype=out_dtype)
        # the pulled rows, kept for the routing weights' gradient (not needed without one)
        ys = expert_y.new_empty((N * K, expert_y.shape[1]), dtype=b.dtype) if ctx.needs_input_grad[1] else None
        with route.measure(route.sent * expert_y.shape[1] * b.tensor.element_size()):
            b.begin_local_write()
            b.tensor[:route.M].copy_(expert_y)
            b.publish()
            b.pull_sum(w, route.rank, route.row, y, ys)
        ctx.route = route
        ctx.save_for_backward(ys, w)
        return y

    @staticmethod
    def backward(ctx, g):
        route = ctx.route
        ys, w = ctx.saved_tensors
        N, K = w.shape
        b = route.combine_buffer
        dw = None
        if ctx.needs_input_grad[1] and ys is not None:
            dw = (ys.view(N, K, ys.shape[1]).float() * g.float().unsqueeze(1)).sum(-1).to(w.dtype)
        with route.measure(route.sent * g.shape[1] * b.tensor.element_size()):
            b.begin_push()
            b.push(g, w, route.rank, route.row)
            b.end_push()
        g_y = b.tensor[:route.M]  # a view, read by the experts' backward before this buffer's next push phase
        return (g_y if ctx.needs_input_grad[0] else None), dw, None, None


def _on(stream):
    """``torch.cuda.stream(stream)``, or nothing for None."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _measured(route: SymmRoute, on: bool):
    return route.measure() if on else contextlib.nullcontext()


def symm_dispatch(x: torch.Tensor, route: SymmRoute) -> torch.Tensor:
    """``x [N, D]`` -> ``[route.M, D]`` this rank's received rows, expert-major (differentiable; collective). With
    ``route.async_push`` (CUDA) the push runs on a side stream: call :func:`symm_wait` before reading the rows."""
    return _SymmDispatch.apply(x.to(route.buffer.dtype), route)


def symm_wait(route: SymmRoute) -> None:
    """Makes the current stream wait for an asynchronous dispatch push (no-op otherwise)."""
    if route.pushed is not None:
        with route.measure():  # the part of the push the compute stream still waits for
            torch.cuda.current_stream(route.ids.device).wait_event(route.pushed)
        route.pushed = None


def symm_combine(expert_y: torch.Tensor, topk_weights: torch.Tensor, route: SymmRoute,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """``expert_y [route.M, D]`` -> ``[N, D]`` in ``out_dtype``, weighted by ``topk_weights`` (fp32 sum over k;
    dropped copies contribute 0); differentiable in both inputs; collective."""
    symm_wait(route)  # (already done by the dispatcher's wait; the push must be complete before the copy-in)
    return _SymmCombine.apply(expert_y.to(route.buffer.dtype), topk_weights, route, out_dtype)
