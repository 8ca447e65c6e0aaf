"""Process-group set-up and the (dp, ep) layout of a run.

Every rank reads a different slice of the global batch (world_size data shards). Experts are sharded
over ``ep`` ranks; ranks that hold the same experts form the expert-data-parallel group of size ``dp``.
Dense parameters are replicated on all ``dp x ep`` ranks.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Where this process sits. ``mesh`` is a DeviceMesh with dims ("dp", "ep") when world_size > 1."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    dp: int = 1
    ep: int = 1
    mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Initialises torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    Single process (no WORLD_SIZE or WORLD_SIZE=1): no process group. backend 'auto' picks NCCL when
    CUDA is available, else gloo. The device is cuda:LOCAL_RANK or cpu.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return DistContext(device=device)
    chosen = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
    if not dist.is_initialized():
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if chosen == "nccl" else None)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=chosen)


def build_mesh(ctx: DistContext, dp: int, ep: int) -> DistContext:
    """Attaches a ("dp", "ep") DeviceMesh to ``ctx`` (world_size == dp * ep, checked by the config).

    Row-major: ``rank = d * ep + e``. The ``"ep"`` dim groups the ``ep`` consecutive ranks that split the
    experts between them (all-to-all group); the ``"dp"`` dim groups the ranks with the same ``"ep"``
    coordinate, which hold the same experts (the expert-data-parallel group: expert gradients are summed
    over it). Raises ValueError when ``dp * ep != world_size``.
    """
    if dp * ep != ctx.world_size:
        raise ValueError(f"dp x ep = {dp} x {ep} must equal the world size ({ctx.world_size})")
    ctx.dp, ctx.ep = dp, ep
    if ctx.distributed:
        from torch.distributed.device_mesh import init_device_mesh
        ctx.mesh = init_device_mesh(ctx.device.type, (dp, ep), mesh_dim_names=("dp", "ep"))
    return ctx


def ep_rank(ctx: DistContext) -> int:
    """This rank's ``"ep"`` coordinate (it owns experts ``[ep_rank * E_local, (ep_rank + 1) * E_local)``)."""
    return ctx.mesh.get_local_rank("ep") if ctx.mesh is not None else 0


def ep_group(ctx: DistContext):
    """Process group of the ``"ep"`` mesh dim (the all-to-all group); None without a mesh."""
    return ctx.mesh.get_group("ep") if ctx.mesh is not None else None


def expert_dp_group(ctx: DistContext):
    """Process group of the ``"dp"`` mesh dim: the ranks holding the same experts; None without a mesh."""
    return ctx.mesh.get_group("dp") if ctx.mesh is not None else None


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM over the default group (no-op in one process); returns t."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
