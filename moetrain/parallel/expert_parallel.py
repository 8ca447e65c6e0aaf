"""Expert parallelism: the all-to-all token dispatcher, expert sharding and its bookkeeping.

Layout (``moetrain.parallel.mesh``): ``world = dp x ep`` ranks on a ``("dp", "ep")`` DeviceMesh
(row-major: ``rank = d * ep + e``). The rank with ``"ep"`` coordinate ``e`` owns the routed experts
``[e * E_local, (e + 1) * E_local)`` (``E_local = E / ep``) of every MoE layer; ranks with the same ``e``
(one ``"dp"`` group, the expert-data-parallel group) hold the same experts. Dense parameters (attention,
norms, gates, shared experts, embedding, head) are replicated on every rank. Every rank reads different
data.

One MoE forward on rank ``r`` with :class:`AllToAllDispatcher` (the model's dispatcher seam,
``moetrain/model/dispatch.py``; Megatron-LM's ``MoEAlltoAllTokenDispatcher`` and DeepSpeed-MoE follow
the same scheme)::

    dispatch:  [capacity: keep <= C copies per expert, the rest go to a drop bin]
               permute(x, ids) -> rows grouped by GLOBAL expert, counts [E]
               all_to_all_single(counts [E] -> recv_counts [ep, E_local])     (equal splits, blocking)
               one host sync: split sizes = per-destination-rank sums
               all_to_all_single(rows, uneven splits, async_op=True)          <- in flight
    (MoE.forward runs the shared experts here: they overlap the token all-to-all)
    wait:      work.wait(); reorder rows (source rank, local expert) -> (local expert, source rank)
    experts:   GroupedExperts with w1/w2/w3 sliced to [E_local, ...]: one grouped GEMM
    combine:   undo the reorder; all_to_all_single back (reverse splits); zero rows for dropped copies;
               unpermute + weighted sum with the routing weights (fp32), cast to x.dtype

With ``exchange="per_expert"`` (``parallel.ep_exchange``) the token exchange is one batched send/receive
per (rank, local expert) chunk that lands the rows in local-expert order, so the reorder and its undo
disappear (:mod:`moetrain.parallel.token_exchange`). With ``exchange="pipelined"`` the tokens go in
``chunks`` chunks whose permute / placement / weighted sum run while a neighbouring chunk's all-to-all is in
flight (:mod:`moetrain.parallel.pipelined_exchange`); the shared experts then run after the dispatch. With
``exchange="symmetric"`` (CUDA + NCCL; on CPU + gloo through /dev/shm) no all-to-all runs: one kernel stores every
token copy straight into the peers' symmetric-memory buffers and the combine pulls them back
(:mod:`moetrain.parallel.symm_exchange`).

Both all-to-alls are autograd Functions whose backward is the reverse all-to-all of the gradient, so the
expert weights' local gradients sum the contributions of every rank of the ``"ep"`` group. With overlap on,
the token all-to-all's backward is split the same way (launched by ``wait``'s backward, waited by
``dispatch``'s), so the shared experts' backward runs while the gradient rows are in flight. Gradient
synchronisation, clipping and the checkpoint conversion live in :mod:`moetrain.parallel.grad_sync` and
:class:`ExpertShardCheckpointHook`.

Capacity (``capacity_factor > 0``; 0 = dropless, the default): on every rank and for every expert at
most ``C = ceil(capacity_factor * N * K / E)`` of the rank's ``N * K`` token copies are sent (GShard /
Switch Transformer "expert capacity", applied per source rank as in Megatron-LM's ``drop_and_pad=False``
path). The overflow is dropped by ``capacity_policy``:

* ``"probs"`` (default): an expert keeps its ``C`` copies with the largest routing weight (ties: earlier
  position first);
* ``"position"``: an expert keeps the first ``C`` copies in token order (row-major over ``[N, K]``).

A dropped copy contributes zero to its token's output (the remaining weights are NOT renormalised; the
token still gets its shared-expert and residual paths), and gets no gradient. The dropped fraction is
reported by :func:`moe_telemetry`.

Edge cases that work without a hang or a shape error: a rank that receives zero rows (all splits 0),
a rank that sends none, an expert with no tokens, all tokens to one expert.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from moetrain.model.dispatch import inverse_permutation, permute, unpermute
from moetrain.model.moe import MoE
from moetrain.model.transformer import load_stats
from moetrain.parallel.pipelined_exchange import (ChunkRoute, SendBuffer, build_route, pipelined_combine,
                                                  pipelined_dispatch)
from moetrain.parallel.row_ops import TorchRowOps
from moetrain.parallel.token_exchange import EXCHANGES, ChunkPlan, SplitPlan

__all__ = [
    "A2AMeter",
    "A2A_METER",
    "A2AState",
    "AllToAllDispatcher",
    "ExpertShardCheckpointHook",
    "all_to_all",
    "apply_capacity",
    "apply_ep",
    "capacity_keep_mask",
    "expert_capacity",
    "expert_parameter_names",
    "expert_parameters",
    "moe_telemetry",
]

CAPACITY_POLICIES = ("probs", "position")


# --------------------------------------------------------------------------------------------
# Telemetry: all-to-all time and bytes
# --------------------------------------------------------------------------------------------

class A2AMeter:
    """Accumulates the time and bytes of the expert-parallel all-to-alls of this rank.

    Time is what the compute stream spends in communication: the counts exchange (including its host
    sync), the launch of the token all-to-all, the exposed part of its wait (after the shared experts
    ran), the combine all-to-all and both backward all-to-alls. On CUDA it is measured with CUDA events on
    the current stream (no extra synchronisation; read at :meth:`report`), on CPU with ``perf_counter``.
    Bytes are those handed to ``all_to_all_single`` (tokens and counts, including the rows a rank sends
    to itself), forward and backward; with the symmetric exchange, the rows pushed or pulled per phase (whose
    time is the phase's barriers, copies and kernel). Forwards without grad (evaluation) are not counted.

    ``steps`` is advanced by :class:`moetrain.parallel.grad_sync.GradSync` (once per optimizer step), so
    :meth:`report` gives per-step averages since the previous report.
    """

    def __init__(self):
        self.enabled = True
        self.reset()

    def reset(self) -> None:
        self._events: list = []
        self._cpu_s = 0.0
        self.bytes = 0
        self.calls = 0
        self.steps = 0

    @contextlib.contextmanager
    def measure(self, device: torch.device, nbytes: int = 0):
        """Times the enclosed communication and adds ``nbytes``."""
        if not self.enabled:
            yield
            return
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu_s += time.perf_counter() - t0
        self.bytes += int(nbytes)
        self.calls += 1

    def add_bytes(self, nbytes: int) -> None:
        if self.enabled:
            self.bytes += int(nbytes)

    def step(self) -> None:
        """One optimizer step done (called by the gradient sync)."""
        self.steps += 1

    def report(self) -> dict:
        """``{"perf/a2a_ms", "perf/a2a_bytes"}`` per optimizer step since the last report (then reset);
        ``{}`` if no all-to-all ran (``ep = 1``)."""
        if not self.calls:
            self.reset()
            return {}
        ms = self._cpu_s * 1e3
        for start, end in self._events:
            end.synchronize()
            ms += start.elapsed_time(end)
        steps = max(self.steps, 1)
        out = {"perf/a2a_ms": ms / steps, "perf/a2a_bytes": self.bytes / steps}
        self.reset()
        return out


A2A_METER = A2AMeter()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------------------------
# Autograd-aware all-to-all
# --------------------------------------------------------------------------------------------

def _exchange(x: torch.Tensor, plan, group, meter, async_op: bool = False):
    """Sends the rows of contiguous ``x`` by ``plan`` (:mod:`moetrain.parallel.token_exchange`), receives
    ``plan.out_rows`` rows (metered); returns ``(received, wait handle or None)``."""
    out = x.new_empty((plan.out_rows,) + tuple(x.shape[1:]))
    with meter.measure(x.device, _nbytes(x)):
        work = plan.launch(out, x, group, async_op=async_op)
    return out, work


def _reverse_exchange(ctx, g: torch.Tensor) -> torch.Tensor:
    """Backward of an exchange: the gradient rows go back the way the tokens came (blocking)."""
    return _exchange(g.contiguous(), ctx.plan.reversed(), ctx.group, ctx.meter)[0]


class _AllToAll(torch.autograd.Function):
    """A blocking exchange of rows by ``plan`` along dim 0; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, plan, group, meter):
        ctx.plan, ctx.group, ctx.meter = plan, group, meter
        return _exchange(x.contiguous(), plan, group, meter)[0]

    @staticmethod
    def backward(ctx, g):
        return _reverse_exchange(ctx, g), None, None, None


@dataclass
class _Pending:
    """An in-flight exchange: its wait handle and the send buffer it must keep alive.

    With ``overlap_backward`` the pair is mirrored in the backward pass: :class:`_AllToAllWait`'s backward
    launches the reverse exchange of the gradient asynchronously (``bwd_*``) and :class:`_AllToAllStart`'s
    backward waits for it. Autograd runs ready nodes latest-created first, so the backward of what the forward
    ran between the two (the shared experts) runs while the gradient rows are in flight."""
    work: object = None
    send: Optional[torch.Tensor] = None
    overlap_backward: bool = False
    exchange: Optional[tuple] = None      # (plan, group, meter) of the forward exchange
    bwd_work: object = None
    bwd_send: Optional[torch.Tensor] = None
    bwd_recv: Optional[torch.Tensor] = None

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        self.work, self.send = None, None

    def start_backward(self, g: torch.Tensor) -> None:
        plan, group, meter = self.exchange
        self.bwd_send = g.contiguous()
        self.bwd_recv, self.bwd_work = _exchange(self.bwd_send, plan.reversed(), group, meter, async_op=True)

    def finish_backward(self) -> torch.Tensor:
        meter = self.exchange[2]
        with meter.measure(self.bwd_recv.device):
            self.bwd_work.wait()
        out = self.bwd_recv
        self.bwd_work = self.bwd_send = self.bwd_recv = None
        return out


class _AllToAllStart(torch.autograd.Function):
    """Launches the exchange by ``plan`` asynchronously; the returned buffer is valid after
    :class:`_AllToAllWait`. Backward: the reverse exchange, waited here if :class:`_AllToAllWait`'s
    backward launched it (``pending.overlap_backward``), else run here (blocking)."""

    @staticmethod
    def forward(ctx, x, plan, group, pending, meter):
        ctx.plan, ctx.group, ctx.meter = plan, group, meter
        ctx.pending = pending
        x = x.contiguous()
        out, pending.work = _exchange(x, plan, group, meter, async_op=True)
        pending.send = x
        pending.exchange = (plan, group, meter)
        return out

    @staticmethod
    def backward(ctx, g):
        if ctx.pending.bwd_work is not None:   # launched by _AllToAllWait.backward; g is the same gradient
            return ctx.pending.finish_backward(), None, None, None, None
        return _reverse_exchange(ctx, g), None, None, None, None


class _AllToAllWait(torch.autograd.Function):
    """Identity that first waits for the pending exchange that fills ``x``. Backward: passes the gradient
    through and, with ``pending.overlap_backward``, launches its reverse exchange (see :class:`_Pending`)."""

    @staticmethod
    def forward(ctx, x, pending, meter):
        ctx.pending = pending
        with meter.measure(x.device):
            pending.wait()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if ctx.needs_input_grad[0] and ctx.pending.overlap_backward and ctx.pending.exchange is not None:
            ctx.pending.start_backward(g)
        return g, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None,
               meter: Optional[A2AMeter] = None) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0 with uneven splits.

    Args:
        x: ``[sum(in_splits), ...]``; rows ``[sum(in_splits[:j]), sum(in_splits[:j+1]))`` go to group rank j.
        out_splits / in_splits: host ints, one per rank of ``group``.
    Returns:
        ``[sum(out_splits), ...]`` (same dtype/device). Backward sends the gradient back (reverse splits).
    """
    return _AllToAll.apply(x, SplitPlan(out_splits, in_splits), group, meter or A2AMeter())


# --------------------------------------------------------------------------------------------
# Capacity
# --------------------------------------------------------------------------------------------

def expert_capacity(n_tokens: int, topk: int, n_experts: int, capacity_factor: float) -> int:
    """``ceil(capacity_factor * n_tokens * topk / n_experts)`` token copies per expert and source rank."""
    return int(math.ceil(capacity_factor * n_tokens * topk / n_experts))


def capacity_keep_mask(topk_ids: torch.Tensor, topk_weights: torch.Tensor, n_experts: int, capacity: int,
                       policy: str = "probs") -> torch.Tensor:
    """Which of the ``N*K`` token copies fit their expert's capacity (on device, no host sync).

    Args:
        topk_ids: ``[N, K]`` int64 expert ids in ``[0, n_experts)``.
        topk_weights: ``[N, K]`` routing weights (used by ``policy="probs"``).
        capacity: copies kept per expert (``>= 0``).
        policy: ``"probs"`` keeps an expert's ``capacity`` heaviest copies (ties: earlier position first);
            ``"position"`` keeps its first ``capacity`` copies in row-major ``[N, K]`` order.
    Returns:
        ``keep [N, K]`` bool.
    Raises:
        ValueError: unknown policy.
    """
    if policy not in CAPACITY_POLICIES:
        raise ValueError(f"capacity_policy={policy!r}: must be one of {', '.join(CAPACITY_POLICIES)}")
    flat = topk_ids.reshape(-1)
    nk = flat.numel()
    if policy == "probs":
        by_weight = torch.sort(-topk_weights.detach().reshape(-1).float(), stable=True)[1]
        order = by_weight.index_select(0, torch.sort(flat.index_select(0, by_weight), stable=True)[1])
    else:
        order = torch.sort(flat, stable=True)[1]
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(nk, device=flat.device) - starts.index_select(0, flat.index_select(0, order))
    keep = torch.empty(nk, dtype=torch.bool, device=flat.device)
    keep[order] = rank_in_expert < capacity
    return keep.view_as(topk_ids)


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------

def stable_order(keys: torch.Tensor, n_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, inverse)`` for ``keys [M]`` int64 in ``[0, n_bins)``: ``order`` the stable argsort
    (``keys[order]`` ascending, ties in index order), ``inverse[order[i]] = i``. On device, no host sync."""
    order = torch.sort(keys, stable=True)[1]
    return order, inverse_permutation(order)


@dataclass
class A2AState:
    """What :meth:`AllToAllDispatcher.dispatch` hands to ``wait`` / ``combine``.

    ``recv`` ``[M, D]`` rows received: grouped by (source rank, local expert) with the ``all_to_all``
    exchange, by local expert with ``per_expert``; ``order`` ``[M]`` the permutation that sorts them by
    local expert (None when no reorder is needed) and ``inv_order`` its inverse; ``tokens_per_expert``
    ``[E_local]`` int64; ``sorted_idx`` ``[N*K]`` from :func:`permute`; ``n_kept`` host int (copies sent,
    ``N*K`` minus the dropped); ``plan`` the dispatch's exchange plan (:class:`SplitPlan` or
    :class:`ChunkPlan`, whose reverse the combine runs; or the pipelined exchange's :class:`ChunkRoute` /
    the symmetric exchange's ``SymmRoute``, with ``recv`` already expert-major and no ``sorted_idx``).
    """

    recv: torch.Tensor
    tokens_per_expert: torch.Tensor
    sorted_idx: torch.Tensor
    topk_weights: torch.Tensor
    dtype: torch.dtype
    n_assign: int
    n_kept: int
    plan: object = None
    order: Optional[torch.Tensor] = None
    inv_order: Optional[torch.Tensor] = None
    pending: Optional[_Pending] = None


class AllToAllDispatcher:
    """Expert-parallel dispatcher behind the MoE seam (``dispatch`` / ``wait`` / ``combine``).

    Args:
        n_experts: ``E``, routed experts of the layer (global); ``E % ep == 0``.
        group: the ``"ep"`` process group (``None``: ``ep = 1``, no communication, e.g. to apply the
            capacity rule on one rank).
        capacity_factor: 0 = dropless; ``> 0`` = at most ``ceil(cf * N * K / E)`` copies per expert and
            source rank (see the module docstring for the drop policy).
        capacity_policy: ``"probs"`` | ``"position"``.
        overlap: launch the token all-to-all asynchronously in :meth:`dispatch` and wait in :meth:`wait`
            (the MoE runs its shared experts in between). ``False`` waits inside :meth:`dispatch`.
        meter: where all-to-all time/bytes go (default the module's :data:`A2A_METER`).
        exchange: ``"all_to_all"`` (one ``all_to_all_single``, then the received rows are regrouped by local
            expert) | ``"per_expert"`` (one batched send/receive per (rank, local expert) chunk, received
            straight in local-expert order: no regroup pass); see :mod:`moetrain.parallel.token_exchange` |
            ``"pipelined"`` (``chunks`` all-to-alls, each overlapping the local passes of its neighbours;
            see :mod:`moetrain.parallel.pipelined_exchange`; ``overlap`` does not apply) | ``"symmetric"``
            (CUDA + NCCL, or CPU + gloo: token copies stored into / read from the peers' symmetric-memory
            buffers, one kernel each way on GPUs, :mod:`moetrain.parallel.symm_exchange`; ``overlap`` does not
            apply).
        chunks: token chunks of the ``"pipelined"`` exchange (``parallel.ep_chunks``, >= 1).
        autocast_comm: on CUDA under autocast, fp32 ``x`` is cast to the autocast dtype before the
            permute (half the all-to-all bytes; the routed experts' GEMMs take that dtype under autocast
            anyway, and ``GroupedExperts`` then uses its ``torch._grouped_mm`` path). The output of
            :meth:`combine` is still in the dtype of ``x``.

    Attributes: ``permute_fn`` / ``unpermute_fn`` (swappable like :class:`LocalDispatcher`'s; called
    with ``n_experts + 1`` bins when capacity is on: bin ``E`` holds the dropped copies), ``order_fn``
    (``(keys [M] int64, n_bins) -> (order, inverse)``, the stable sort of the received rows by local
    expert; default :func:`stable_order`, swapped for the Triton counting sort with ``kernels.permute``),
    ``row_ops`` (the pipelined exchange's chunk-local passes: :class:`TorchRowOps`, swapped for
    ``kernels.permute.RowOps`` with ``kernels.permute``), ``n_local`` (``E_local``), ``ep_rank``,
    ``dropped`` / ``assigned`` (host ints, token copies dropped / routed by training forwards since
    :func:`moe_telemetry` last read them).

    Shapes: ``x [N, D]`` (any float dtype the backend can send), ``topk_ids [N, K]`` int64,
    ``topk_weights [N, K]``; ``wait`` -> ``([M, D] rows sorted by local expert, [E_local] int64)``;
    ``combine([M, D]) -> [N, D]`` in ``x.dtype``.

    Raises:
        ValueError: ``n_experts`` not divisible by the group size, bad capacity settings, unknown exchange.
    """

    def __init__(self, n_experts: int, group=None, capacity_factor: float = 0.0,
                 capacity_policy: str = "probs", overlap: bool = True, meter: Optional[A2AMeter] = None,
                 autocast_comm: bool = True, exchange: str = "all_to_all", chunks: int = 2):
        self.n_experts = n_experts
        self.group = group
        self.ep = dist.get_world_size(group) if group is not None else 1
        self.ep_rank = dist.get_rank(group) if group is not None else 0
        if n_experts % self.ep:
            raise ValueError(f"n_routed_experts={n_experts} is not divisible by ep={self.ep}")
        if capacity_factor < 0:
            raise ValueError(f"capacity_factor={capacity_factor}: must be >= 0 (0 = dropless)")
        if capacity_policy not in CAPACITY_POLICIES:
            raise ValueError(f"capacity_policy={capacity_policy!r}: must be one of {', '.join(CAPACITY_POLICIES)}")
        if exchange not in EXCHANGES:
            raise ValueError(f"ep_exchange={exchange!r}: must be one of {', '.join(EXCHANGES)}")
        if int(chunks) != chunks or chunks < 1:
            raise ValueError(f"ep_chunks={chunks}: must be an integer >= 1")
        self.exchange = exchange
        self.chunks = int(chunks)
        self.n_local = n_experts // self.ep
        self.capacity_factor = float(capacity_factor)
        self.capacity_policy = capacity_policy
        self.overlap = overlap
        self.autocast_comm = autocast_comm
        self.meter = meter if meter is not None else A2A_METER
        self.permute_fn = permute
        self.unpermute_fn = unpermute
        self.order_fn = stable_order
        self.row_ops = TorchRowOps
        self._symm_buffers: dict = {}  # exchange="symmetric": this layer's dispatch buffer (freed with the layer)
        # exchange="symmetric" on CUDA: push on a side stream, so the shared experts run during it (opt-in until
        # measured: benchmarks/bench_ep.py --exchanges symmetric_overlap)
        self.symm_overlap = False
        self.dropped = 0
        self.assigned = 0

    def __repr__(self) -> str:
        return (f"AllToAllDispatcher(E={self.n_experts}, ep={self.ep}, rank={self.ep_rank}, "
                f"E_local={self.n_local}, capacity_factor={self.capacity_factor}, "
                f"policy={self.capacity_policy}, overlap={self.overlap}, exchange={self.exchange}"
                f"{f', chunks={self.chunks}' if self.exchange == 'pipelined' else ''})")

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> A2AState:
        """Permute token copies by expert, exchange counts, launch the token all-to-all (see class doc)."""
        N, K = topk_ids.shape
        E, El, ep = self.n_experts, self.n_local, self.ep
        dtype = x.dtype
        if self.autocast_comm and x.is_cuda and x.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
            x = x.to(torch.get_autocast_dtype("cuda"))  # the experts' GEMMs take this dtype anyway
        ids, n_bins = topk_ids, E
        if self.capacity_factor > 0:
            cap = expert_capacity(N, K, E, self.capacity_factor)
            keep = capacity_keep_mask(topk_ids, topk_weights, E, cap, self.capacity_policy)
            ids = torch.where(keep, topk_ids, torch.full_like(topk_ids, E))
            n_bins = E + 1
        tracking = torch.is_grad_enabled()
        meter = self.meter if tracking else _NULL_METER
        if ep > 1 and self.exchange == "symmetric":
            from moetrain.parallel.symm_exchange import build_symm_route, symm_dispatch
            route = build_symm_route(ids, n_bins, E, self.group, self.ep_rank, self.row_ops, x.dtype, x.shape[1],
                                     meter, self._symm_buffers)
            route.async_push = self.symm_overlap
            recv = symm_dispatch(x, route)  # learns the row counts on the host after queuing its push
            self._count(tracking, N * K, route.sent)
            return A2AState(recv, route.tokens_per_expert, None, topk_weights, dtype, N * K, route.sent, route)
        if ep > 1 and self.exchange == "pipelined":
            x = x.contiguous()
            send = SendBuffer(x, K, self.row_ops)
            route = build_route(ids, n_bins, E, ep, self.chunks, self.group, meter, self.row_ops,
                                prefetch=send.prefetch)
            self._count(tracking, N * K, sum(route.kept))
            recv = pipelined_dispatch(x, route, send)
            return A2AState(recv, route.tokens_per_expert, None, topk_weights, dtype, N * K, sum(route.kept), route)
        expert_x, counts, sorted_idx = self.permute_fn(x, ids, n_bins)
        send_counts = counts[:E]
        if ep == 1:
            if n_bins > E:  # capacity on one rank: one host sync for the number of copies kept
                n_kept = int(send_counts.sum().item())
                expert_x = expert_x[:n_kept]
            else:
                n_kept = N * K
            self._count(tracking, N * K, n_kept)
            return A2AState(expert_x, send_counts, sorted_idx, topk_weights, dtype, N * K, n_kept)
        with meter.measure(x.device, 2 * _nbytes(send_counts)):
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)
            host = torch.cat([send_counts, recv_counts]).tolist()  # the one host sync of the dispatch
        in_splits = [sum(host[r * El:(r + 1) * El]) for r in range(ep)]
        out_splits = [sum(host[E + r * El:E + (r + 1) * El]) for r in range(ep)]
        n_kept, M = sum(in_splits), sum(out_splits)
        self._count(tracking, N * K, n_kept)
        send = expert_x[:n_kept] if n_kept < expert_x.shape[0] else expert_x
        recv_counts = recv_counts.view(ep, El)
        order = inv = None
        if self.exchange == "per_expert" and El > 1:  # received straight into expert-major order
            plan = ChunkPlan.for_dispatch(host[:E], [host[E + r * El:E + (r + 1) * El] for r in range(ep)],
                                          recv_counts, self.ep_rank)
        else:
            plan = SplitPlan(out_splits, in_splits)
            if El > 1:  # rows arrive grouped by (source rank, local expert): sort them by local expert
                local_ids = torch.arange(El, device=x.device).repeat(ep)
                expert_of_row = torch.repeat_interleave(local_ids, recv_counts.reshape(-1), output_size=M)
                order, inv = self.order_fn(expert_of_row, El)
        pending = _Pending(overlap_backward=self.overlap)
        recv = _AllToAllStart.apply(send, plan, self.group, pending, meter)
        state = A2AState(recv, recv_counts.sum(0), sorted_idx, topk_weights, dtype, N * K, n_kept,
                         plan, order, inv, pending)
        if not self.overlap:
            state.recv = _AllToAllWait.apply(state.recv, pending, meter)
            state.pending = None
        return state

    def wait(self, state: A2AState):
        """Waits for the token all-to-all; returns ``(expert_x [M, D] sorted by local expert,
        tokens_per_expert [E_local] int64)``."""
        if state.pending is not None:
            meter = self.meter if torch.is_grad_enabled() else _NULL_METER
            state.recv = _AllToAllWait.apply(state.recv, state.pending, meter)
            state.pending = None
        if self.exchange == "symmetric" and self.ep > 1:
            from moetrain.parallel.symm_exchange import symm_wait
            symm_wait(state.plan)
        x = state.recv if state.order is None else state.recv.index_select(0, state.order)
        return x, state.tokens_per_expert

    def combine(self, expert_y: torch.Tensor, state: A2AState) -> torch.Tensor:
        """``expert_y [M, D]`` (rows in ``wait``'s order) -> ``[N, D]`` weighted by ``topk_weights``,
        in the dtype of x. Dropped copies contribute zero."""
        if isinstance(state.plan, ChunkRoute):
            return pipelined_combine(expert_y, state.topk_weights, state.plan, state.dtype)
        if self.exchange == "symmetric" and self.ep > 1:
            from moetrain.parallel.symm_exchange import symm_combine
            return symm_combine(expert_y, state.topk_weights, state.plan, state.dtype)
        y = expert_y
        if self.ep > 1:
            if state.inv_order is not None:
                y = y.index_select(0, state.inv_order)
            meter = self.meter if torch.is_grad_enabled() else _NULL_METER
            y = _AllToAll.apply(y, state.plan.reversed(), self.group, meter)
        if state.n_assign == 0:  # no tokens here: an empty output that stays in the graph, so that
            # this rank still runs the backward all-to-all the other ranks wait for
            keep = y.sum() * 0 + state.topk_weights.sum() * 0
            return (y.new_zeros((0,) + tuple(y.shape[1:])) + keep).to(state.dtype)
        if state.n_kept < state.n_assign:
            y = torch.cat([y, y.new_zeros((state.n_assign - state.n_kept,) + tuple(y.shape[1:]))])
        return self.unpermute_fn(y, state.sorted_idx, state.topk_weights).to(state.dtype)

    def _count(self, tracking: bool, n_assign: int, n_kept: int) -> None:
        if tracking:
            self.assigned += n_assign
            self.dropped += n_assign - n_kept

    def take_counts(self) -> tuple[int, int]:
        """``(dropped, assigned)`` since the last call; resets them."""
        out = (self.dropped, self.assigned)
        self.dropped = self.assigned = 0
        return out


class _NullMeter(A2AMeter):
    def __init__(self):
        super().__init__()
        self.enabled = False


_NULL_METER = _NullMeter()


# --------------------------------------------------------------------------------------------
# Applying EP to a model
# --------------------------------------------------------------------------------------------

def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routed experts' parameters (``w1``, ``w2``, ``w3`` of every ``MoE.experts``), module order."""
    return [p for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()]


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of :func:`expert_parameters` (e.g. ``layers.1.ffn.experts.w1``)."""
    ids = {id(p) for p in expert_parameters(model)}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def _ep_coords(ctx) -> tuple[int, object, object]:
    """(ep rank, ep group, expert-dp group) of this process; groups are None without a mesh."""
    from moetrain.parallel.mesh import ep_group, ep_rank, expert_dp_group
    if getattr(ctx, "mesh", None) is None and ctx.ep > 1:
        raise ValueError(f"ep={ctx.ep} needs a ('dp', 'ep') DeviceMesh: call mesh.build_mesh first")
    return ep_rank(ctx), ep_group(ctx), expert_dp_group(ctx)


def apply_capacity(model: nn.Module, capacity_factor: float, capacity_policy: str = "probs") -> None:
    """``ep = 1`` with a capacity: every MoE gets a communication-free :class:`AllToAllDispatcher`
    (``group=None``) that applies the per-rank capacity rule. The experts stay whole."""
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        old = moe.dispatcher
        moe.dispatcher = AllToAllDispatcher(moe.n_routed_experts, None, capacity_factor, capacity_policy)
        moe.dispatcher.permute_fn = getattr(old, "permute_fn", permute)
        moe.dispatcher.unpermute_fn = getattr(old, "unpermute_fn", unpermute)


def apply_ep(model: nn.Module, ctx, capacity_factor: float = 0.0, capacity_policy: str = "probs",
             overlap: bool = True, bucket_mb: float = 25.0, exchange: str = "all_to_all",
             chunks: int = 2) -> Callable[[], None]:
    """Shards the routed experts over the ``"ep"`` mesh dim and installs :class:`AllToAllDispatcher`.

    In place, before the optimizer is built: every ``MoE.experts.w{1,2,3}`` ``[E, ...]`` is replaced by a
    new Parameter holding this rank's slice ``[ep_rank * E_local, (ep_rank + 1) * E_local)`` (a copy; the
    fully qualified names stay), ``experts.n_experts = E_local``, and every ``MoE.dispatcher`` becomes an
    :class:`AllToAllDispatcher` on the ``"ep"`` group (keeping any swapped ``permute_fn`` /
    ``unpermute_fn``). With ``ep > 1`` the model gets ``model.dcp_state_dict_hook``
    (:class:`ExpertShardCheckpointHook`), which ``moetrain.checkpoint`` uses to save expert weights and
    Adam moments with their global shapes.

    Args:
        model: a plain model (e.g. ``Transformer``) whose MoE layers hold full ``[E, ...]`` experts,
            identical on every rank (same seed).
        ctx: ``DistContext`` with ``ep``, ``dp`` and (when distributed) ``mesh`` from ``build_mesh``.
        exchange: the dispatchers' token exchange, ``"all_to_all"`` | ``"per_expert"`` | ``"pipelined"``
            (see :class:`AllToAllDispatcher`); chunks: the pipelined exchange's token chunks.
    Returns:
        ``grad_sync()``: a :class:`moetrain.parallel.grad_sync.GradSync` to call once per optimizer step
        after the last backward (dense grads averaged over the world, expert grads summed over the
        ``"dp"`` group and divided by the world size). The model must NOT also be wrapped in DDP.
    Raises:
        ValueError: ``E`` not divisible by ``ep``, experts already sharded, no mesh for ``ep > 1``,
            unknown exchange.
    """
    from moetrain.parallel.grad_sync import GradSync

    if exchange not in EXCHANGES:
        raise ValueError(f"parallel.ep_exchange={exchange!r}: must be one of {', '.join(EXCHANGES)}")
    ep_rank, ep_group, _ = _ep_coords(ctx)
    ep = ctx.ep
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        E = moe.n_routed_experts
        if E % ep:
            raise ValueError(f"parallel.ep={ep} must divide n_routed_experts ({E})")
        experts = moe.experts
        if experts.w1.shape[0] != E:
            raise ValueError(f"apply_ep: experts already sharded ({experts.w1.shape[0]} of {E} experts)")
        El = E // ep
        lo = ep_rank * El
        with torch.no_grad():
            for name in ("w1", "w2", "w3"):
                full = getattr(experts, name)
                setattr(experts, name, nn.Parameter(full[lo:lo + El].clone(),
                                                    requires_grad=full.requires_grad))
        experts.n_experts = El
        old = moe.dispatcher
        moe.dispatcher = AllToAllDispatcher(E, ep_group if ep > 1 else None, capacity_factor,
                                            capacity_policy, overlap, exchange=exchange, chunks=chunks)
        moe.dispatcher.permute_fn = getattr(old, "permute_fn", permute)
        moe.dispatcher.unpermute_fn = getattr(old, "unpermute_fn", unpermute)
    if ep > 1:
        model.dcp_state_dict_hook = ExpertShardCheckpointHook(ctx.mesh, expert_parameter_names(model))
    return GradSync(model, ctx, bucket_mb=bucket_mb, meter=A2A_METER)


# --------------------------------------------------------------------------------------------
# Checkpoints: expert shards <-> DTensors with global shapes
# --------------------------------------------------------------------------------------------

class ExpertShardCheckpointHook:
    """Presents local expert shards (and their optimizer moments) to DCP as DTensors.

    Expert parameters stay plain local tensors ``[E_local, ...]`` for compute; at save/load time
    :meth:`to_dcp` wraps them (views, no copy) as DTensors on the ``("dp", "ep")`` mesh with placements
    ``[Replicate(), Shard(0)]``, i.e. global shape ``[E, ...]``, so ``torch.distributed.checkpoint``
    stores one copy of every expert and reshards on load to any ``ep`` / ``dp`` (or to a plain full
    tensor in a single process). :meth:`from_dcp` turns them back into local tensors for
    ``set_state_dict``. Used by ``moetrain.checkpoint`` through ``model.dcp_state_dict_hook``.

    Args:
        mesh: the ``("dp", "ep")`` DeviceMesh. names: FQNs of the expert parameters.
    """

    def __init__(self, mesh, names: list[str]):
        self.mesh = mesh
        self.names = list(names)

    def _wrap(self, t):
        from torch.distributed.tensor import DTensor, Replicate, Shard
        if not torch.is_tensor(t) or isinstance(t, DTensor) or t.dim() == 0:
            return t
        ep = self.mesh.size(self.mesh.mesh_dim_names.index("ep"))
        shape = (t.shape[0] * ep,) + tuple(t.shape[1:])
        return DTensor.from_local(t, self.mesh, [Replicate(), Shard(0)], run_check=False,
                                  shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())

    @staticmethod
    def _unwrap(t):
        from torch.distributed.tensor import DTensor
        return t.to_local() if isinstance(t, DTensor) else t

    def to_dcp(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
        """Returns copies of ``get_state_dict``'s model and optimizer dicts whose expert entries are
        DTensors (the per-parameter optimizer state dicts are copied too: ``Optimizer.state_dict()``
        shares them with the live optimizer, which must keep its plain tensors)."""
        model_sd = dict(model_sd)
        optim_sd = dict(optim_sd)
        state = optim_sd["state"] = dict(optim_sd.get("state", {}))
        for n in self.names:
            if n not in model_sd:
                continue
            local_shape = model_sd[n].shape
            model_sd[n] = self._wrap(model_sd[n])
            if state.get(n):
                state[n] = {k: self._wrap(v) if torch.is_tensor(v) and v.shape == local_shape else v
                            for k, v in state[n].items()}
        return model_sd, optim_sd

    def from_dcp(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
        """Inverse of :meth:`to_dcp`: copies with the expert entries as local shards again (other DTensors,
        e.g. FSDP2's dense shards with ``parallel.fsdp``, stay DTensors)."""
        names = set(self.names)
        model_sd = {k: self._unwrap(v) if k in names else v for k, v in model_sd.items()}
        optim_sd = dict(optim_sd)
        optim_sd["state"] = {n: ({k: self._unwrap(v) for k, v in st.items()}
                                 if isinstance(st, dict) and n in names else st)
                             for n, st in optim_sd.get("state", {}).items()}
        return model_sd, optim_sd


# --------------------------------------------------------------------------------------------
# Expert-load telemetry
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def moe_telemetry(model: nn.Module, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                  hist: bool = False) -> dict:
    """Routing statistics since the last bias update, over all ranks (one ``reduce`` call).

    Reads every MoE gate's ``expert_load`` ([E] token counts of this rank's router, GLOBAL expert ids,
    so a world SUM gives the global load) and every :class:`AllToAllDispatcher`'s dropped/assigned
    copies (reset by this call). Call before ``update_expert_biases`` (which zeroes ``expert_load``).

    Args:
        reduce: elementwise SUM over ranks, e.g. ``moetrain.parallel.mesh.all_reduce_sum`` (collective:
            every rank must call); None in one process.
        hist: also return the per-expert load histograms.
    Returns (host floats; ``{}`` without MoE layers), ``i`` = the block index:
        ``moe/load_imbalance`` (max/mean load, mean over layers; 1 = perfect), ``moe/load_cv`` (mean
        over layers), ``moe/dropped_frac`` (all layers), ``moe/bias_abs_max``; per layer
        ``moe/load_imbalance/layer_{i}``, ``moe/load_max/layer_{i}`` and ``moe/load_mean/layer_{i}``
        (token copies per expert), ``moe/load_cv/layer_{i}`` (std/mean over experts),
        ``moe/dropped_frac/layer_{i}``; with ``hist``: ``moe/load_hist/layer_{i}`` (list of E ints).
    """
    pairs = [(getattr(blk, "layer_id", j), blk.ffn) for j, blk in enumerate(getattr(model, "layers", []))
             if isinstance(getattr(blk, "ffn", None), MoE)]
    if not pairs:
        pairs = [(j, m) for j, m in enumerate(m for m in model.modules() if isinstance(m, MoE))]
    if not pairs:
        return {}
    loads = torch.stack([moe.gate.expert_load.float() for _, moe in pairs])
    drops = []
    for _, moe in pairs:
        d = moe.dispatcher
        drops.append(d.take_counts() if hasattr(d, "take_counts") else (0, 0))
    drop_t = torch.tensor(drops, dtype=torch.float32, device=loads.device)
    packed = torch.cat([loads, drop_t], dim=1)
    if reduce is not None:
        packed = reduce(packed)
    E = loads.shape[1]
    loads, drop_t = packed[:, :E], packed[:, E:]
    ids = [i for i, _ in pairs]
    stats = load_stats(loads, ids, hist)
    frac = torch.where(drop_t[:, 1] > 0, drop_t[:, 0] / drop_t[:, 1].clamp_min(1), torch.zeros_like(drop_t[:, 0]))
    bias_max = torch.stack([moe.gate.bias.abs().max() for _, moe in pairs]).max()
    tot = drop_t.sum(dim=0).tolist()
    stats["moe/dropped_frac"] = tot[0] / tot[1] if tot[1] > 0 else 0.0
    stats["moe/bias_abs_max"] = bias_max.item()
    for i, f in zip(ids, frac.tolist()):
        stats[f"moe/dropped_frac/layer_{i}"] = f
    return stats
