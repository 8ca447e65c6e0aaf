"""Applies parallelism and precision to a plain single-device model, from outside, in a fixed order:
expert parallelism -> FP8 module swaps -> Triton kernels -> torch.compile -> data parallel wrapper.

The model code never learns it was parallelised: only its dispatcher and modules are replaced.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel

from moetrain.parallel.mesh import DistContext


class UnavailableFeature(RuntimeError):
    """A configured feature whose implementation is not present in this installation."""


def _no_grad_sync() -> None:
    """Gradients are already synchronised (one process, or DDP's hooks during backward)."""


def parallelize(model: torch.nn.Module, cfg: DictConfig, ctx: DistContext):
    """Returns (wrapped model used for forward/backward, the plain model underneath, grad_sync).

    ``grad_sync()`` is called once per optimizer step after the last backward and before clipping; it
    averages gradients where the wrapper does not already do so during backward.
    """
    grad_sync = _no_grad_sync
    if ctx.ep > 1:
        try:
            from moetrain.parallel.expert_parallel import apply_ep
        except ImportError as e:
            raise UnavailableFeature(f"parallel.ep={ctx.ep}: expert parallelism is not available ({e})") from None
        grad_sync = apply_ep(model, ctx)
    if cfg.precision.fp8 != "none":
        from moetrain.precision.fp8 import apply_fp8
        apply_fp8(model, cfg.precision.fp8)
    if cfg.kernels.enabled:
        from moetrain.kernels_apply import apply_kernels
        apply_kernels(model, cfg.kernels)
    if cfg.train.compile:
        for block in model.layers:
            block.compile()
    wrapped = model
    if ctx.distributed and ctx.ep == 1:
        wrapped = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                          broadcast_buffers=False)
    return wrapped, model, grad_sync
