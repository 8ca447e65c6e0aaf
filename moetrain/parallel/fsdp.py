"""Opt-in FSDP2 (``parallel.fsdp=true``, native engine): dense parameters sharded over the whole world.

``apply_fsdp`` calls ``fully_shard`` (FSDP2, ``torch.distributed.fsdp``; ``torch.distributed._composable.fsdp``
on older releases) on every ``Block`` and then on the root, over a 1-D ``("fsdp",)`` DeviceMesh of all
``world_size`` ranks. Every rank still reads different data, so FSDP's reduce-scatter average over the
world is the DDP average (the objective is the mean of every rank's loss).

* ``ep = 1``: every parameter (experts included) is sharded; no DDP, no ``grad_sync``.
* ``ep > 1``: the routed experts stay as :func:`moetrain.parallel.expert_parallel.apply_ep` made them (plain
  local ``[E_local, ...]`` tensors, ``ignored_params`` of FSDP); :class:`moetrain.parallel.grad_sync.GradSync`
  reduces only them (over the ``"dp"`` group) and FSDP owns the dense gradients.

Mixed precision: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` on CUDA when
``precision.dtype`` is ``bf16`` or ``auto``; fp32 otherwise (CPU). Gradient accumulation: the engine calls
``set_requires_gradient_sync(last)`` so only the last micro-batch reduce-scatters. Clipping:
:func:`moetrain.parallel.grad_sync.clip_grad_norm` sums the squares of the local shards of the sharded
(DTensor) gradients over the world. Checkpoints: DCP stores the DTensor shards with global shapes, so a run
saved with FSDP resumes with or without it, at another world size.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["apply_fsdp", "fsdp_api"]


def fsdp_api():
    """``(fully_shard, MixedPrecisionPolicy)`` from wherever this torch keeps FSDP2."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def apply_fsdp(model: nn.Module, ctx, precision: str = "auto"):
    """Applies ``fully_shard`` to every ``model.layers[i]`` and to ``model``, in place; returns the mesh.

    Call after expert parallelism / FP8 / kernels / compile and before the optimizer is built (the dense
    parameters are replaced by DTensor parameters). Sets ``model.fsdp_mesh``.

    Args:
        ctx: ``DistContext`` (``world_size``, ``device``, ``ep``). precision: ``precision.dtype``.
    """
    from torch.distributed.device_mesh import init_device_mesh

    from moetrain.parallel.expert_parallel import expert_parameters

    fully_shard, MixedPrecisionPolicy = fsdp_api()
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,), mesh_dim_names=("fsdp",))
    if ctx.device.type == "cuda" and precision in ("bf16", "auto"):
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    experts = {id(p): p for p in expert_parameters(model)} if ctx.ep > 1 else {}
    def _ignore(ps):  # ignored_params exists from torch 2.7; pass it only when there is something to ignore
        return {"ignored_params": set(ps)} if ps else {}

    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, **_ignore([p for p in block.parameters() if id(p) in experts]))
    fully_shard(model, mesh=mesh, mp_policy=mp, **_ignore(list(experts.values())))
    model.fsdp_mesh = mesh
    return mesh
