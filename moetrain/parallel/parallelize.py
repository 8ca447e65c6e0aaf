"""Applies parallelism and precision to a plain single-device model, from outside, in a fixed order:
expert parallelism -> FP8 module swaps -> Triton kernels -> torch.compile -> data parallel wrapper.

The model code never learns it was parallelised: only its dispatcher and modules are replaced.
"""
from __future__ import annotations

import inspect

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel

from moetrain.parallel.mesh import DistContext


class UnavailableFeature(RuntimeError):
    """A configured feature whose implementation is not present in this installation."""


# Buffers are rank-local (each gate's expert_load counts this rank's tokens until the all-reduced bias
# update): DDP must not overwrite them with rank 0's at every forward. torch 2.13 renamed the switch.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})


def _no_grad_sync() -> None:
    """Gradients are already synchronised (one process, or DDP's hooks during backward)."""


def parallelize(model: torch.nn.Module, cfg: DictConfig, ctx: DistContext):
    """Returns (wrapped model used for forward/backward, the plain model underneath, grad_sync).

    ``grad_sync()`` is called once per optimizer step after the last backward and before clipping; it
    averages gradients where the wrapper does not already do so during backward.

    ``parallel.ep > 1``: :func:`moetrain.parallel.expert_parallel.apply_ep` (no DDP wrapper; clip with
    :func:`moetrain.parallel.grad_sync.clip_grad_norm`). ``parallel.capacity_factor > 0`` at ``ep = 1``:
    the dispatchers apply the same per-rank capacity rule without communication (DDP as usual).
    ``parallel.engine=deepspeed``: no DDP wrapper either; ZeRO reduces the gradients
    (:mod:`moetrain.parallel.deepspeed_engine`, built by :func:`moetrain.parallel.engine.build_engine`).
    ``parallel.fsdp=true`` (native engine, distributed): FSDP2 instead of DDP
    (:func:`moetrain.parallel.fsdp.apply_fsdp`); with ``ep > 1`` ``grad_sync`` then reduces only the experts.
    """
    grad_sync = _no_grad_sync
    capacity = float(cfg.parallel.get("capacity_factor", 0.0) or 0.0)
    policy = cfg.parallel.get("capacity_policy", "probs")
    if ctx.ep > 1:
        try:
            from moetrain.parallel.expert_parallel import apply_ep
        except ImportError as e:
            raise UnavailableFeature(f"parallel.ep={ctx.ep}: expert parallelism is not available ({e})") from None
        # experts sharded over "ep", AllToAllDispatcher; grad_sync replaces DDP (dense grads averaged over the
        # world, expert grads summed over the "dp" group / world size)
        if cfg.parallel.get("ep_exchange") == "symmetric" and ctx.device.type == "cuda" and ctx.backend != "nccl":
            raise UnavailableFeature("parallel.ep_exchange=symmetric on GPUs needs the NCCL backend (symmetric "
                                     "memory); use parallel.ep_exchange=pipelined here")
        grad_sync = apply_ep(model, ctx, capacity_factor=capacity, capacity_policy=policy,
                             exchange=cfg.parallel.get("ep_exchange", "pipelined"),
                             chunks=int(cfg.parallel.get("ep_chunks", 2)))
    elif capacity > 0:
        from moetrain.parallel.expert_parallel import apply_capacity
        apply_capacity(model, capacity, policy)  # ep = 1: the same per-rank capacity rule, no communication
    if cfg.precision.fp8 != "none":
        from moetrain.precision.fp8 import Fp8Config, apply_fp8, describe_backend
        expert_gemm = cfg.precision.get("fp8_expert_gemm", "auto")
        apply_fp8(model, cfg.precision.fp8, expert_gemm=expert_gemm)
        if ctx.is_main:
            line = describe_backend(Fp8Config(cfg.precision.fp8, expert_gemm=expert_gemm), ctx.device)
            print(f"fp8     {cfg.precision.fp8}: {line}", flush=True)
    if cfg.kernels.enabled:
        from moetrain.kernels_apply import apply_kernels, triton_unavailable
        reason = triton_unavailable(ctx.device)
        if reason and ctx.is_main:
            print(f"kernels.enabled=true: using the PyTorch ops ({reason})", flush=True)
        apply_kernels(model, cfg.kernels, ctx.device)
    if cfg.train.compile:
        for block in model.layers:
            block.compile()
    wrapped = model
    if ctx.distributed and cfg.parallel.engine == "native" and cfg.parallel.get("fsdp", False):
        from moetrain.parallel.fsdp import apply_fsdp
        apply_fsdp(model, ctx, cfg.precision.dtype)
        if ctx.ep > 1:
            grad_sync.drop_dense()  # FSDP reduce-scatters the dense gradients during backward
        return model, model, grad_sync
    if ctx.distributed and ctx.ep == 1 and cfg.parallel.engine == "native":  # deepspeed: ZeRO reduces instead
        wrapped = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                          **_NO_BUFFER_SYNC)
    return wrapped, model, grad_sync
