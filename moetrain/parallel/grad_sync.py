"""Gradient synchronisation and global-norm clipping for expert parallelism (no DDP wrapper).

The objective of a step is the mean of every rank's loss, ``L = (1 / W) * sum_r L_r`` (``W = dp * ep``
ranks, each reading different data). Hence:

* dense (replicated) parameter ``p``: ``dL/dp = (1 / W) * sum_r dL_r/dp`` -- an all-reduce SUM over the
  whole world divided by ``W`` (the DDP average);
* routed-expert shard ``e`` on rank ``(d, e)``: its local gradient already sums ``dL_r/dp_e`` over the
  ``ep`` ranks ``r`` of its ep group (the backward of the dispatch all-to-all brings every token's
  gradient back to the expert that processed it), so ``dL/dp_e = (1 / W) * SUM over the "dp" group`` of
  the local gradients. It must not be averaged over the ep group as well: that scales expert gradients by
  ``1 / ep`` (DeepSpeed issue #5618, "expert gradients divided by ep_size twice").

Gradients are flattened into buckets (``bucket_mb``, one dtype/device each), all-reduced asynchronously,
scaled and copied back. Parameters whose gradient is ``None`` on some rank but not on another get a zero
gradient (every rank must issue the same collectives); parameters without a gradient anywhere stay
``None`` (as in one process). See also PyTorch DDP (Li et al., VLDB 2020) for bucketing.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["GradSync", "clip_grad_norm", "grad_norm_and_coef", "split_parameters"]


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(dense, expert)`` trainable parameters; expert = the routed experts of every MoE layer."""
    from moetrain.parallel.expert_parallel import expert_parameters

    ids = {id(p) for p in expert_parameters(model)}
    dense, expert = [], []
    for p in model.parameters():
        if p.requires_grad:
            (expert if id(p) in ids else dense).append(p)
    return dense, expert


def _buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    out: list[list[nn.Parameter]] = []
    by_kind: dict = {}
    for p in params:
        key = (p.grad.dtype, p.grad.device)
        cur = by_kind.get(key)
        if cur is None or (cur[1] + p.grad.numel() * p.grad.element_size() > bucket_bytes and cur[0]):
            cur = by_kind[key] = [[], 0]
            out.append(cur[0])
        cur[0].append(p)
        cur[1] += p.grad.numel() * p.grad.element_size()
    return out


class GradSync:
    """``grad_sync()``: call once per optimizer step after the last backward (and before clipping).

    Args:
        model: the plain model (experts already sharded by ``apply_ep``).
        ctx: ``DistContext``: ``world_size``; ``mesh`` with the ``"dp"`` dim when distributed.
        bucket_mb: bucket size of the flattened all-reduces.
        meter: an ``A2AMeter`` whose ``step()`` is called (per-step all-to-all telemetry).

    In one process it does nothing (the gradients are already the full ones).
    """

    def __init__(self, model: nn.Module, ctx, bucket_mb: float = 25.0, meter=None):
        self.dense, self.expert = split_parameters(model)
        self.world = ctx.world_size
        self.dp_group = ctx.mesh.get_group("dp") if getattr(ctx, "mesh", None) is not None else None
        self.dp = dist.get_world_size(self.dp_group) if self.dp_group is not None else 1
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.meter = meter

    def drop_dense(self) -> None:
        """Stop reducing dense gradients: FSDP2 owns them (``parallel.fsdp``); only experts are reduced."""
        self.dense = []

    def __call__(self) -> None:
        if self.meter is not None:
            self.meter.step()
        if self.world == 1:
            return
        params = self.dense + self.expert
        flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                             device=params[0].device if params else "cpu")
        dist.all_reduce(flags)
        for p, f in zip(params, flags.tolist()):
            if f > 0 and p.grad is None:
                p.grad = torch.zeros_like(p)
        scale = 1.0 / self.world
        works = []
        for group, plist, size in ((None, self.dense, self.world), (self.dp_group, self.expert, self.dp)):
            plist = [p for p in plist if p.grad is not None]
            for bucket in _buckets(plist, self.bucket_bytes):
                grads = [p.grad for p in bucket]
                flat = _flatten_dense_tensors(grads)
                work = dist.all_reduce(flat, group=group, async_op=True) if size > 1 else None
                works.append((work, flat, grads))
        for work, flat, grads in works:
            if work is not None:
                work.wait()
            flat.mul_(scale)
            for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)


def _grads(params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _sq_sum(grads: list[torch.Tensor], device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([n.float() for n in torch._foreach_norm(grads, 2.0)]).pow(2).sum()


def clip_grad_norm(model: nn.Module, max_norm: float, ctx, norm_type: float = 2.0,
                   foreach: Optional[bool] = None) -> torch.Tensor:
    """Clips all gradients by the global norm of the full (unsharded) model; returns that norm.

    With ``ep > 1`` (expert shards differ across the ``"ep"`` group, dense gradients are identical on
    every rank after :class:`GradSync`): ``norm^2 = sum_dense ||g||^2 + SUM_ep-group(sum_local-experts
    ||g||^2)`` (``norm_type = inf``: max instead of sum), then every gradient is multiplied by
    ``min(1, max_norm / (norm + 1e-6))`` as ``torch.nn.utils.clip_grad_norm_`` does. Otherwise it is
    ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)``.

    Args:
        max_norm: ``float('inf')`` only measures. norm_type: 2.0 or inf.
    Returns:
        0-d fp32 tensor (the same value on every rank).
    Raises:
        ValueError: other norm types with ``ep > 1`` or FSDP.

    With FSDP2 (``model.fsdp_mesh``, :mod:`moetrain.parallel.fsdp`) the dense gradients are DTensor shards
    over the world: their squares (max) are summed (maxed) over the ``"fsdp"`` group, expert shards over the
    ``"ep"`` group as above.

    :func:`grad_norm_and_coef` gives the same norm and the coefficient without multiplying the gradients.
    """
    if _plain(model, ctx):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    total, grads = _total_norm(model, ctx, norm_type, foreach)
    coef = _clip_coef(max_norm, total)
    by_kind: dict = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    for (dev, _), gs in by_kind.items():
        torch._foreach_mul_(gs, coef.to(dev))
    return total


def grad_norm_and_coef(model: nn.Module, max_norm: float, ctx, norm_type: float = 2.0,
                       foreach: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm, coef)`` of :func:`clip_grad_norm` (same layouts, same norm) without touching the gradients.

    ``coef = min(1, max_norm / (norm + 1e-6))`` (a 0-d tensor on the gradients' device, no host sync) is the
    factor :func:`clip_grad_norm` multiplies every gradient by; NaN when the norm is NaN, 0 when it is inf.
    ``ep <= 1`` without FSDP: the norm is ``torch.nn.utils.get_total_norm`` (what ``clip_grad_norm_`` computes).
    """
    total, _ = _total_norm(model, ctx, norm_type, foreach)
    return total, _clip_coef(max_norm, total)


def _plain(model: nn.Module, ctx) -> bool:
    """No FSDP and no expert parallelism: torch's own ``clip_grad_norm_`` / ``get_total_norm`` apply."""
    return getattr(model, "fsdp_mesh", None) is None and (getattr(ctx, "ep", 1) <= 1
                                                          or getattr(ctx, "mesh", None) is None)


def _clip_coef(max_norm: float, total: torch.Tensor) -> torch.Tensor:
    return (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s coefficient


def _total_norm(model: nn.Module, ctx, norm_type: float,
                foreach: Optional[bool]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The global norm of :func:`clip_grad_norm` and the local gradient tensors it covers."""
    if _plain(model, ctx):
        grads = _grads(model.parameters())
        return torch.nn.utils.get_total_norm(grads, norm_type, foreach=foreach), grads
    if getattr(model, "fsdp_mesh", None) is not None:
        return _total_norm_fsdp(model, ctx, norm_type)
    dense, expert = split_parameters(model)
    dg, eg = _grads(dense), _grads(expert)
    device = (dg or eg or [next(model.parameters())])[0].device
    ep_group = ctx.mesh.get_group("ep")
    if norm_type == 2.0:
        e_sq = _sq_sum(eg, device)
        dist.all_reduce(e_sq, group=ep_group)
        total = (_sq_sum(dg, device) + e_sq).sqrt()
    elif norm_type == float("inf"):
        def _max(gs):
            return (torch.stack([g.detach().abs().max().float() for g in gs if g.numel()]).max()
                    if any(g.numel() for g in gs) else torch.zeros((), device=device))
        e_max = _max(eg)
        dist.all_reduce(e_max, op=dist.ReduceOp.MAX, group=ep_group)
        total = torch.maximum(_max(dg), e_max)
    else:
        raise ValueError(f"clip_grad_norm: norm_type={norm_type} not supported with ep > 1 (use 2.0 or inf)")
    return total, dg + eg


def _total_norm_fsdp(model: nn.Module, ctx, norm_type: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`_total_norm` when FSDP2 shards the dense gradients (DTensors on ``model.fsdp_mesh``)."""
    from torch.distributed.tensor import DTensor

    if norm_type not in (2.0, float("inf")):
        raise ValueError(f"clip_grad_norm: norm_type={norm_type} not supported with FSDP (use 2.0 or inf)")
    expert_ids = {id(p) for p in split_parameters(model)[1]} if getattr(ctx, "ep", 1) > 1 else set()
    sharded, expert, replicated = [], [], []
    for p in model.parameters():
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):
            sharded.append(p.grad.to_local())
        else:
            (expert if id(p) in expert_ids else replicated).append(p.grad)
    device = next(model.parameters()).device
    if norm_type == 2.0:
        def _part(gs):
            return _sq_sum(gs, device)
        op, combine, finish = dist.ReduceOp.SUM, torch.add, torch.sqrt
    else:
        def _part(gs):
            gs = [g for g in gs if g.numel()]
            return (torch.stack([g.detach().abs().max().float() for g in gs]).max() if gs
                    else torch.zeros((), dtype=torch.float32, device=device))
        op, combine, finish = dist.ReduceOp.MAX, torch.maximum, (lambda t: t)
    s_part = _part(sharded)
    dist.all_reduce(s_part, op=op, group=model.fsdp_mesh.get_group("fsdp"))
    total = combine(s_part, _part(replicated))
    if expert:
        e_part = _part(expert)
        dist.all_reduce(e_part, op=op, group=ctx.mesh.get_group("ep"))
        total = combine(total, e_part)
    return finish(total), sharded + expert + replicated
