"""The pipelined token exchange (``parallel.ep_exchange=pipelined``): the dispatcher's local passes run
while the all-to-all of a neighbouring chunk of tokens is in flight.

The plain exchange runs its passes one after another around the transfer: permute every token copy into
(destination rank, expert) order, one ``all_to_all_single``, regroup the received rows by local expert;
combine undoes the regroup, sends back, and sums each token's K weighted copies. Each pass runs near HBM
speed, yet together they took as long as the transfer itself on 2 H200s (benchmarks/README.md). Here the
N tokens are split into C chunks (``parallel.ep_chunks``) of consecutive tokens, and for chunk c::

    dispatch:  copy chunk c's token copies into its send rows      (while chunk c-1 is in flight)
               all_to_all_single(chunk c, async)
               place chunk c-1's received rows into the expert-major buffer
    combine:   gather chunk c's rows from the expert-major outputs  (while chunk c-1 is in flight)
               all_to_all_single back (async)
               weighted sum of chunk c-1's tokens

so only the first and the last chunk's passes are exposed. The backward passes of both are pipelined the
same way. The routing is computed once for all chunks: one stable counting sort of the keys
``chunk * n_bins + expert`` (so the send rows of a chunk are contiguous and in (rank, expert) order), one
all-to-all of the ``[ep, C, E_local]`` counts and one host sync for every chunk's split sizes; the
expert-major position of every received row is computed on the device from the counts (no host sync), and
the placement and its inverse are row copies through the same ``row_ops`` (K = 1).

Expert-major order here: local expert 0's rows from (chunk 0, source rank 0), (chunk 0, rank 1), ...,
(chunk 1, rank 0), ..., then local expert 1's. The grouped GEMM only needs rows grouped by expert; row
order inside an expert changes the order of the weight-gradient sums only.

The local passes go through ``row_ops`` (:class:`moetrain.parallel.row_ops.TorchRowOps`, or
``kernels.permute.RowOps`` with ``kernels.permute=true``). Works on gloo (CPU) and NCCL; every rank must
run the same number of chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

__all__ = ["ChunkRoute", "SendBuffer", "build_route", "chunk_bounds", "pipelined_dispatch", "pipelined_combine"]


@dataclass
class ChunkRoute:
    """What the pipelined dispatch and combine of one MoE forward share (built by :func:`build_route`).

    Host ints: ``bounds`` (C+1 token boundaries), ``kept[c]`` (copies chunk c sends: its rows
    ``[bounds[c]*K, bounds[c]*K + kept[c])`` of the send buffer; the rest of the chunk's rows are dropped
    copies), ``in_splits[c]`` / ``out_splits[c]`` (rows to / from each rank of the group for chunk c),
    ``recv_lo[c]`` (first received row of chunk c), ``M`` (rows received in all). Device tensors:
    ``row_of [N*K]`` (send-buffer row of token n's k-th copy), ``recv_counts [ep, C, E_local]`` (rows
    arriving per source rank, chunk and local expert), and :attr:`place` and :attr:`tokens_per_expert`.
    """

    N: int
    K: int
    bounds: list
    kept: list
    in_splits: list
    out_splits: list
    recv_lo: list
    M: int
    row_of: torch.Tensor
    recv_counts: torch.Tensor
    group: object
    meter: object
    row_ops: object
    _place: Optional[torch.Tensor] = None

    @property
    def place(self) -> torch.Tensor:
        """``[M]`` int64: the expert-major row of every received row, in arrival order (computed on first
        use, i.e. once chunk 0's all-to-all is launched, so that its launches overlap the transfer)."""
        if self._place is None:
            self._place = self.row_ops.placement(self.recv_counts, self.M)
        return self._place

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """``[E_local]`` int64 on the device (read after the dispatch launched its transfers)."""
        return self.recv_counts.sum(dim=(0, 1))

    @property
    def chunks(self) -> int:
        return len(self.kept)

    def tokens(self, c: int) -> slice:
        return slice(self.bounds[c], self.bounds[c + 1])

    def copies(self, c: int) -> slice:
        """Positions of chunk c's copies in ``[N*K]`` (and its rows in the send buffer)."""
        return slice(self.bounds[c] * self.K, self.bounds[c + 1] * self.K)

    def sent(self, c: int) -> slice:
        lo = self.bounds[c] * self.K
        return slice(lo, lo + self.kept[c])

    def dropped(self, c: int) -> slice:
        return slice(self.bounds[c] * self.K + self.kept[c], self.bounds[c + 1] * self.K)

    def received(self, c: int) -> slice:
        return slice(self.recv_lo[c], self.recv_lo[c] + sum(self.out_splits[c]))


def chunk_bounds(N: int, C: int) -> list:
    """``C + 1`` token boundaries of ``C`` chunks of consecutive tokens. With ``C >= 3`` the first and the
    last chunk get half the tokens of the others: their passes are the ones no transfer hides."""
    w = [1.0] * C
    if C >= 3:
        w[0] = w[-1] = 0.5
    total, acc, out = sum(w), 0.0, [0]
    for c in range(C):
        acc += w[c]
        out.append(N if c == C - 1 else max(out[-1], min(N, round(N * acc / total))))
    return out


def build_route(ids: torch.Tensor, n_bins: int, n_experts: int, ep: int, chunks: int, group, meter,
                row_ops, prefetch: Optional[Callable] = None) -> ChunkRoute:
    """Routes ``ids [N, K]`` (int64 in ``[0, n_bins)``; bins ``>= n_experts`` are dropped copies, never sent)
    over ``chunks`` chunks of consecutive tokens (:func:`chunk_bounds`): one counting sort, one all-to-all
    of the counts, one host sync. ``meter`` (an ``A2AMeter``) times the counts exchange here and every chunk's
    transfer later; ``prefetch(row_of, bounds)``, if given, is called while the counts are in flight."""
    N, K = ids.shape
    E, El, C = n_experts, n_experts // ep, chunks
    dev = ids.device
    bounds = chunk_bounds(N, C)
    keys = _chunk_key_offsets(bounds, n_bins, dev) + ids
    counts, _, row_of = row_ops.routing(keys, C * n_bins)
    send_counts = counts.view(C, n_bins)[:, :E].reshape(C, ep, El).transpose(0, 1).contiguous()  # [ep, C, El]
    recv_counts = torch.empty_like(send_counts)
    with meter.measure(dev, 2 * send_counts.numel() * send_counts.element_size()):
        work = dist.all_to_all_single(recv_counts, send_counts, group=group, async_op=True)
        if prefetch is not None:  # device work that needs no split sizes runs during the counts exchange
            prefetch(row_of, bounds)
        work.wait()
        host = torch.cat([send_counts.reshape(-1), recv_counts.reshape(-1)]).tolist()  # the one host sync
    n = ep * C * El
    in_splits = [[sum(host[(r * C + c) * El:(r * C + c + 1) * El]) for r in range(ep)] for c in range(C)]
    out_splits = [[sum(host[n + (r * C + c) * El:n + (r * C + c + 1) * El]) for r in range(ep)] for c in range(C)]
    kept = [sum(sp) for sp in in_splits]
    recv_lo, M = [], 0
    for c in range(C):
        recv_lo.append(M)
        M += sum(out_splits[c])
    return ChunkRoute(N, K, bounds, kept, in_splits, out_splits, recv_lo, M, row_of, recv_counts, group, meter,
                      row_ops)


_KEY_OFFSETS: dict = {}


def _chunk_key_offsets(bounds: list, n_bins: int, device) -> torch.Tensor:
    """``[N, 1]`` int64: ``chunk(n) * n_bins``, cached per (bounds, n_bins, device) (the same every step)."""
    key = (tuple(bounds), n_bins, str(device))
    t = _KEY_OFFSETS.get(key)
    if t is None:
        sizes = [bounds[c + 1] - bounds[c] for c in range(len(bounds) - 1)]
        t = torch.repeat_interleave(torch.arange(len(sizes)) * n_bins, torch.tensor(sizes)).view(-1, 1).to(device)
        if len(_KEY_OFFSETS) > 64:
            _KEY_OFFSETS.clear()
        _KEY_OFFSETS[key] = t
    return t


def _pipeline(route: ChunkRoute, pre: Callable, exchange: Callable, post: Callable) -> None:
    """For every chunk: ``send = pre(c)``; ``exchange(c, send)`` launched async; ``post(c)`` once it landed.
    Chunk c+1's ``pre`` is queued before chunk c is waited for, and chunk c's ``post`` runs while chunk
    c+1 is in flight."""
    C = route.chunks
    meter = route.meter

    def start(c):
        send = pre(c)
        with meter.measure(send.device, send.numel() * send.element_size()):
            return exchange(c, send), send

    pending = start(0)
    for c in range(C):
        work, send = pending
        if c + 1 < C:
            pending = start(c + 1)
        with meter.measure(send.device):
            work.wait()
        post(c)


def _a2a(out: torch.Tensor, send: torch.Tensor, out_splits: list, in_splits: list, group):
    return dist.all_to_all_single(out, send, output_split_sizes=out_splits, input_split_sizes=in_splits,
                                  group=group, async_op=True)


def _token_rows_to_experts(route: ChunkRoute, rows_of_chunk: Callable, width: int, like: torch.Tensor):
    """Sends every chunk's token-side rows (``rows_of_chunk(c)`` fills and returns them, ``[kept[c], D]``)
    and places what arrives in expert-major order: ``[M, width]``."""
    em = like.new_empty((route.M, width))
    recv = like.new_empty((route.M, width))

    def exchange(c, send):
        return _a2a(recv[route.received(c)], send, route.out_splits[c], route.in_splits[c], route.group)

    def post(c):
        sl = route.received(c)
        route.row_ops.copy_to_rows(recv[sl], route.place[sl], em)

    _pipeline(route, rows_of_chunk, exchange, post)
    return em


def _expert_rows_to_tokens(route: ChunkRoute, em: torch.Tensor, into: torch.Tensor, post: Callable) -> None:
    """Sends the expert-major rows ``em [M, D]`` back, chunk by chunk, into the token-side buffer ``into
    [N*K, D]`` (a chunk's dropped rows are zeroed) and calls ``post(c)`` once chunk c landed."""
    send = em.new_empty(em.shape)

    def pre(c):
        sl = route.received(c)
        route.row_ops.sum_rows(em, route.place[sl], None, send[sl])
        return send[sl]

    def exchange(c, s):
        return _a2a(into[route.sent(c)], s, route.in_splits[c], route.out_splits[c], route.group)

    def post_c(c):
        into[route.dropped(c)].zero_()
        post(c)

    _pipeline(route, pre, exchange, post_c)


class _PipelinedDispatch(torch.autograd.Function):
    """``x [N, D]`` -> the rows received for this rank's experts, expert-major ``[M, D]``.
    Backward: the gradient rows go back the same way and each token sums its K copies."""

    @staticmethod
    def forward(ctx, x, route, buf):
        ctx.route = route
        D = x.shape[1]
        prefilled = buf is not None     # chunk 0's rows were copied while the counts were in flight
        if buf is None:
            buf = x.new_empty((route.N * route.K, D))

        def pre(c):
            if c or not prefilled:
                route.row_ops.copy_to_rows(x[route.tokens(c)], route.row_of[route.copies(c)], buf)
            return buf[route.sent(c)]

        return _token_rows_to_experts(route, pre, D, x)

    @staticmethod
    def backward(ctx, g):
        route = ctx.route
        g = g.contiguous()
        rows = g.new_empty((route.N * route.K, g.shape[1]))
        dx = g.new_empty((route.N, g.shape[1]))

        def post(c):
            route.row_ops.sum_rows(rows, route.row_of[route.copies(c)], None, dx[route.tokens(c)])

        _expert_rows_to_tokens(route, g, rows, post)
        return dx, None, None


class _PipelinedCombine(torch.autograd.Function):
    """``expert_y [M, D]`` (expert-major, as the dispatch returned) and ``topk_weights [N, K]`` ->
    ``y [N, D]`` in ``out_dtype``: ``y[n] = sum_k w[n, k] * expert_y[row of (n, k)]`` (fp32 sum; dropped
    copies contribute zero). Backward: ``dw`` from the received rows (kept for it), the weighted gradient
    rows go back to the experts chunk by chunk."""

    @staticmethod
    def forward(ctx, expert_y, topk_weights, route, out_dtype):
        expert_y = expert_y.contiguous()
        w = topk_weights.contiguous()
        ys = expert_y.new_empty((route.N * route.K, expert_y.shape[1]))
        y = expert_y.new_empty((route.N, expert_y.shape[1]), dtype=out_dtype)

        def post(c):
            t = route.tokens(c)
            route.row_ops.sum_rows(ys, route.row_of[route.copies(c)], w[t], y[t])

        _expert_rows_to_tokens(route, expert_y, ys, post)
        ctx.route = route
        ctx.save_for_backward(ys, w)
        return y

    @staticmethod
    def backward(ctx, g):
        route = ctx.route
        ys, w = ctx.saved_tensors
        g = g.contiguous()
        dys = torch.empty_like(ys)
        dw = torch.empty_like(w) if ctx.needs_input_grad[1] else None

        def pre(c):
            t = route.tokens(c)
            route.row_ops.sum_rows_bwd(g[t], ys, route.row_of[route.copies(c)], w[t], dys,
                                       dw[t] if dw is not None else None)
            return dys[route.sent(c)]

        g_em = _token_rows_to_experts(route, pre, ys.shape[1], ys)
        return (g_em if ctx.needs_input_grad[0] else None), dw, None, None


class SendBuffer:
    """The dispatch's send rows ``[N*K, D]``, with chunk 0 copied into them by :meth:`prefetch` (pass it as
    ``build_route``'s ``prefetch``) while the counts are in flight."""

    def __init__(self, x: torch.Tensor, K: int, row_ops):
        self.x, self.row_ops = x, row_ops
        self.rows = x.new_empty((x.shape[0] * K, x.shape[1]))
        self.filled = False

    @torch.no_grad()
    def prefetch(self, row_of: torch.Tensor, bounds: list) -> None:
        K = self.rows.shape[0] // max(self.x.shape[0], 1)
        self.row_ops.copy_to_rows(self.x[:bounds[1]], row_of[:bounds[1] * K], self.rows)
        self.filled = True


def pipelined_dispatch(x: torch.Tensor, route: ChunkRoute, send: Optional[SendBuffer] = None) -> torch.Tensor:
    """``x [N, D]`` (contiguous) -> ``[route.M, D]`` rows for this rank's local experts, grouped by local
    expert (``route.tokens_per_expert``); differentiable. ``send``: the :class:`SendBuffer` whose prefetch ran
    in :func:`build_route` (else chunk 0 is copied here). Collective over ``route.group``."""
    buf = send.rows if send is not None and send.filled else None
    return _PipelinedDispatch.apply(x, route, buf)


def pipelined_combine(expert_y: torch.Tensor, topk_weights: torch.Tensor, route: ChunkRoute,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """``expert_y [route.M, D]`` (rows in :func:`pipelined_dispatch`'s order), ``topk_weights [N, K]`` ->
    ``[N, D]`` in ``out_dtype``; differentiable in both inputs. Collective over ``route.group``."""
    return _PipelinedCombine.apply(expert_y, topk_weights, route, out_dtype)
