"""Token dispatch for routed experts on one device (``ep = 1``): permute by expert, unpermute.

The MoE layer talks to its routed experts only through a dispatcher (docs/interfaces.md)::

    state = dispatcher.dispatch(x, topk_ids, topk_weights)   # may start async communication
    ...                                                       # shared experts overlap here
    expert_x, tokens_per_expert = dispatcher.wait(state)      # [M, D] rows sorted by local expert
    expert_y = experts(expert_x, tokens_per_expert)
    y = dispatcher.combine(expert_y, state)                   # [N, D] weighted by topk_weights

:class:`LocalDispatcher` does this without communication; the expert-parallel all-to-all version
lives in ``moetrain/parallel/expert_parallel.py`` and can reuse :func:`permute` / :func:`unpermute`.

Neither function synchronises with the host: the sort is on device and the per-expert counts are a
``scatter_add_`` into ``E`` bins (``torch.bincount`` would read ``max()`` back on CUDA).

Experts that need the per-expert counts on the host (one GEMM per expert, e.g. the blockwise FP8 experts on
cuBLAS) read them with :func:`host_counts`: a dispatcher that already has them attaches them to
``tokens_per_expert`` (:func:`attach_host_counts`). :class:`LocalDispatcher` does so when its
``prefetch_host_counts`` is set: ``dispatch`` queues a copy of the counts to pinned host memory right after the
sort, and ``wait`` (called after the shared experts are queued) waits for that copy only, so the device keeps
running the shared experts while the host goes on; reading them later in the experts would wait for all queued
work instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["permute", "unpermute", "inverse_permutation", "DispatchState", "LocalDispatcher", "attach_host_counts",
           "host_counts"]


def attach_host_counts(tokens_per_expert: torch.Tensor, counts: list) -> torch.Tensor:
    """Attaches ``counts`` (host ints, one per expert: the values of ``tokens_per_expert``) to the tensor, for
    :func:`host_counts`; returns the tensor."""
    tokens_per_expert.moetrain_host_counts = counts
    return tokens_per_expert


def host_counts(tokens_per_expert: torch.Tensor) -> list | None:
    """The host copy attached by :func:`attach_host_counts`, or None (the caller then reads the tensor: a sync)."""
    return getattr(tokens_per_expert, "moetrain_host_counts", None)


def permute(x: torch.Tensor, topk_ids: torch.Tensor, n_experts: int):
    """Replicate each token K times and sort the copies by expert (stable: token order kept).

    Args:
        x: ``[N, D]`` tokens.
        topk_ids: ``[N, K]`` int64 expert ids in ``[0, n_experts)``.
        n_experts: number of experts ``E``.
    Returns:
        ``expert_x [N*K, D]`` (row ``j`` is token ``sorted_idx[j] // K``),
        ``tokens_per_expert [E]`` int64, ``sorted_idx [N*K]`` int64 (positions in the flattened
        ``[N*K]`` assignment list, grouped by expert).
    """
    K = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    sorted_idx = torch.sort(flat, stable=True)[1]
    expert_x = x.index_select(0, sorted_idx // K)
    tokens_per_expert = torch.zeros(n_experts, dtype=torch.int64, device=flat.device)
    tokens_per_expert.scatter_add_(0, flat, torch.ones_like(flat))
    return expert_x, tokens_per_expert, sorted_idx


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv [M]`` with ``inv[perm[i]] = i`` for a permutation ``perm [M]`` of ``0..M-1`` (int64; one on-device
    scatter, no host sync)."""
    # a Tensor method, not torch.empty_like: torch 2.11's dynamo refused to trace the latter here (H200 run)
    inverse = perm.new_empty(perm.shape)
    return inverse.scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def unpermute(expert_y: torch.Tensor, sorted_idx: torch.Tensor,
              topk_weights: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`permute` plus the weighted sum over each token's K experts.

    ``y[n] = sum_k topk_weights[n, k] * expert_y[row of (n, k)]``. The K copies are put back in
    ``[N, K, D]`` order (a permutation: deterministic, no atomics), weighted in fp32 and summed.

    Args:
        expert_y: ``[N*K, D]`` in the order of ``sorted_idx``.
        sorted_idx: ``[N*K]`` from :func:`permute`.
        topk_weights: ``[N, K]`` (fp32 from the gate; gradients flow into it).
    Returns:
        ``[N, D]`` fp32 (the caller casts to the activation dtype).
    """
    N, K = topk_weights.shape
    y = expert_y.index_select(0, inverse_permutation(sorted_idx)).view(N, K, -1)
    return (y.float() * topk_weights.float().unsqueeze(-1)).sum(dim=1)


@dataclass
class DispatchState:
    """What :meth:`LocalDispatcher.dispatch` hands to ``wait`` / ``combine``."""

    expert_x: torch.Tensor
    tokens_per_expert: torch.Tensor
    sorted_idx: torch.Tensor
    topk_weights: torch.Tensor
    dtype: torch.dtype
    host_copy: tuple | None = None   # (pinned int64 [E], CUDA event) when the counts are being copied to the host


class LocalDispatcher:
    """Dispatcher for ``ep = 1``: all ``n_experts`` experts are local.

    ``permute_fn`` / ``unpermute_fn`` are instance attributes (defaults :func:`permute` /
    :func:`unpermute`) so a fused kernel can be swapped in from outside. ``prefetch_host_counts`` (default
    False; set from outside by experts that need the counts on the host): see the module docstring.
    """

    def __init__(self, n_experts: int):
        self.n_experts = n_experts
        self.permute_fn = permute
        self.unpermute_fn = unpermute
        self.prefetch_host_counts = False

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> DispatchState:
        """Sort token copies by expert. ``x [N, D]``, ``topk_ids [N, K]`` int64,
        ``topk_weights [N, K]``."""
        expert_x, tpe, sorted_idx = self.permute_fn(x, topk_ids, self.n_experts)
        state = DispatchState(expert_x, tpe, sorted_idx, topk_weights, x.dtype)
        if self.prefetch_host_counts and tpe.is_cuda:
            pinned = torch.empty(tpe.shape, dtype=tpe.dtype, pin_memory=True)
            pinned.copy_(tpe, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(tpe.device))
            state.host_copy = (pinned, done)
        return state

    def wait(self, state: DispatchState):
        """Returns ``(expert_x [N*K, D], tokens_per_expert [E] int64)``. With ``prefetch_host_counts``, the counts
        also on the host (:func:`host_counts`): on CUDA, waits for their copy (queued by ``dispatch``) only."""
        tpe = state.tokens_per_expert
        if state.host_copy is not None:
            pinned, done = state.host_copy
            done.synchronize()
            attach_host_counts(tpe, pinned.tolist())
        elif self.prefetch_host_counts:
            attach_host_counts(tpe, tpe.tolist())
        return state.expert_x, tpe

    def combine(self, expert_y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """``expert_y [N*K, D]`` -> ``[N, D]`` weighted by ``topk_weights``, in the dtype of x."""
        return self.unpermute_fn(expert_y, state.sorted_idx, state.topk_weights).to(state.dtype)
