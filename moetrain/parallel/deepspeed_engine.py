"""``parallel.engine=deepspeed``: ZeRO stage 1/2 through ``deepspeed.initialize``, behind the engine seam
of :mod:`moetrain.parallel.engine`.

What DeepSpeed owns: gradient averaging (ZeRO reduce-scatter of the gradients, optimizer state and fp32
master weights partitioned over the data-parallel ranks), gradient accumulation
(``gradient_accumulation_steps``, ``train_micro_batch_size_per_gpu``: ``engine.backward`` divides the
loss by the accumulation steps, ``engine.step`` steps only at the boundary), global-norm clipping
(``gradient_clipping``), BF16 (``bf16.enabled`` on GPU when ``precision.dtype`` is auto or bf16: bf16
weights, fp32 master weights in the optimizer; fp32 everywhere on CPU) and the checkpoint files.
What moetrain keeps: the model, the data order, the AdamW hyper-parameters and its parameter groups
(``train.build_optimizer``: a torch optimizer, no DeepSpeed C++ ops), the LR schedule (``set_lr`` writes
the optimizer's param groups before every step), the expert-bias update and every metric.

Expert parallelism (``parallel.ep > 1``, :func:`moetrain.parallel.expert_parallel.apply_ep` already
applied): the routed-expert parameters are marked the way DeepSpeed-MoE marks its own
(``param.allreduce = False``, ``param.group_name = "ep_size_<ep>"``), the mesh's ``"ep"`` and ``"dp"``
groups are registered as DeepSpeed's expert-parallel / expert-data-parallel groups of that name, and
the optimizer's groups are split with ``split_params_into_different_moe_groups_for_optimizer``. ZeRO
then partitions and reduces expert gradients over the expert-data-parallel group only (divided by the
world size: the same ``sum over "dp" / W`` as :class:`moetrain.parallel.grad_sync.GradSync`) and counts
every expert shard once in the clipping norm. DeepSpeed turns this on only for models holding its own
``deepspeed.moe.layer.MoE``, so a parameter-less marker of that class is attached to the model for the
duration of ``deepspeed.initialize`` and removed afterwards; the engine's MoE checkpoint format (per-expert
files of ``deepspeed_moe.experts``) is not used: checkpoints are the standard ZeRO ones plus one
``experts_ep<e>.pt`` (this ep rank's expert shards, tensors only) per ep rank.

Checkpoints: ``engine.save_checkpoint(<run.dir>/checkpoints, tag="step_<N>.tmp", client_state=...)``, one
``rng_rank<R>.pt`` per rank, then rank 0 writes ``trainer.json`` (with ``"engine": "deepspeed"``) and
renames the directory to ``step_<N>`` — the same atomic layout as :mod:`moetrain.checkpoint`, so
``resume=auto`` finds the newest complete checkpoint. A DeepSpeed checkpoint resumes at the same world
size, ep and ``parallel.zero_stage`` (ZeRO partitions are per rank).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from moetrain import checkpoint as ckpt
from moetrain.config import ConfigError
from moetrain.parallel.engine import check_checkpoint_engine
from moetrain.parallel.mesh import DistContext
from moetrain.parallel.parallelize import UnavailableFeature

_MARKER = "_deepspeed_moe_marker"


def import_deepspeed(device: torch.device):
    """``import deepspeed`` (CPU accelerator on a CPU device unless ``DS_ACCELERATOR`` is set), quietened.

    Raises:
        UnavailableFeature: DeepSpeed is not installed or does not import.
    """
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        from deepspeed.utils import logger as ds_logger
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install failing at import time
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnavailableFeature(f"parallel.engine=deepspeed: DeepSpeed is not available ({reason}); "
                                 f"pip install 'moetrain[deepspeed]' or use parallel.engine=native") from None
    ds_logger.setLevel(logging.WARNING)
    # DeepSpeed's ZeRO all-gather still calls the deprecated name once per step
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    if device.type == "cpu":
        # The CPU accelerator JIT-compiles a shared-memory all-reduce op (about 2 minutes of g++) that only
        # its inference all-reduce uses; training goes through the gloo process group, so skip the build.
        # (deepspeed.ops keeps one __compatible_ops__ dict per process; edits to it persist.)
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _ensure_process_group(ctx: DistContext) -> None:
    """DeepSpeed needs a process group; one process (no torchrun) gets a group of one."""
    if dist.is_initialized():
        return
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29500")):
        os.environ.setdefault(k, v)
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _expert_groups(ctx: DistContext) -> tuple[object, object]:
    return ctx.mesh.get_group("ep"), ctx.mesh.get_group("dp")


def _register_expert_groups(name: str, ctx: DistContext) -> None:
    """Makes the mesh's "ep" / "dp" groups DeepSpeed's expert(-data)-parallel groups called ``name``."""
    from deepspeed.utils import groups
    ep_group, dp_group = _expert_groups(ctx)
    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = dp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(dp_group)


def _moe_marker(name: str, n_experts: int, ep: int) -> nn.Module:
    """A parameter-less ``deepspeed.moe.layer.MoE`` whose presence makes ``deepspeed.initialize`` build the
    ZeRO optimizer with expert-data-parallel groups (the groups are registered beforehand)."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class _ExpertGroupMarker(DeepSpeedMoE):
        def __init__(self):
            nn.Module.__init__(self)  # no experts, no gate: only the attributes the engine reads
            self.num_experts, self.ep_size, self.expert_group_name = n_experts, ep, name
            self.num_local_experts = n_experts // ep

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """The groups are moetrain's mesh groups, registered by the adapter."""

        def forward(self, *args, **kwargs):
            raise RuntimeError("the DeepSpeed MoE marker is not a layer")

    return _ExpertGroupMarker()


class DeepSpeedEngineAdapter:
    """The engine seam (see :mod:`moetrain.parallel.engine`) over a ``deepspeed.DeepSpeedEngine``.

    Args:
        cfg: the run's config (``parallel.zero_stage``, ``train.grad_clip``, ``precision.dtype``, ...).
        ctx: the ``DistContext`` (mesh with "dp"/"ep" dims when distributed).
        raw_model: the plain model after ``parallelize`` (experts sharded when ``ep > 1``; no DDP wrapper).
        optimizer: the torch optimizer of ``train.build_optimizer``; its parameter groups (and
            hyper-parameters) are reused, split into DeepSpeed MoE groups when ``ep > 1``.
        grad_sync: ``parallelize``'s gradient sync; NOT called (ZeRO reduces the gradients); only its
            all-to-all meter (if any) is advanced once per optimizer step.
        micro, accum: sequences per micro-batch per rank, micro-batches per optimizer step.
    Raises:
        UnavailableFeature: DeepSpeed is not installed.
    """

    name = "deepspeed"

    def __init__(self, cfg: DictConfig, ctx: DistContext, raw_model: nn.Module, optimizer: torch.optim.Optimizer,
                 grad_sync: Callable[[], None], micro: int, accum: int):
        deepspeed = import_deepspeed(ctx.device)
        self.cfg, self.ctx, self.raw_model, self.accum = cfg, ctx, raw_model, accum
        self.meter = getattr(grad_sync, "meter", None)
        self.zero_stage = int(cfg.parallel.get("zero_stage", 1))
        self.bf16 = ctx.device.type == "cuda" and cfg.precision.dtype in ("auto", "bf16")
        self.version = deepspeed.__version__
        _ensure_process_group(ctx)

        self.ep = ctx.ep
        self.group_name: Optional[str] = None
        self.expert_names: list[str] = []
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"]),
                   "name": g.get("name", f"moetrain_{i}")} for i, g in enumerate(optimizer.param_groups)]
        marker = None
        if self.ep > 1:
            from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
            from moetrain.parallel.expert_parallel import expert_parameter_names, expert_parameters
            self.group_name = f"ep_size_{self.ep}"
            _register_expert_groups(self.group_name, ctx)
            for p in expert_parameters(raw_model):
                p.allreduce = False
                p.group_name = self.group_name
            self.expert_names = expert_parameter_names(raw_model)
            groups = split_params_into_different_moe_groups_for_optimizer(groups)
            n_experts = int(getattr(getattr(raw_model, "args", None), "n_routed_experts", self.ep))
            marker = _moe_marker(self.group_name, n_experts, self.ep)
            raw_model.add_module(_MARKER, marker)
        groups = [g for g in groups if g["params"]]
        self.optimizer = type(optimizer)(groups)  # same class and hyper-parameters, DeepSpeed's groups

        self.ds_config = {
            "train_batch_size": int(cfg.train.batch_size),
            "train_micro_batch_size_per_gpu": int(micro),
            "gradient_accumulation_steps": int(accum),
            "gradient_clipping": float(cfg.train.grad_clip),
            "zero_optimization": {"stage": self.zero_stage, "contiguous_gradients": True, "reduce_scatter": True},
            "bf16": {"enabled": self.bf16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        buffer_dtypes = {n: b.dtype for n, b in raw_model.named_buffers()}
        try:
            engine, _, _, _ = deepspeed.initialize(model=raw_model, optimizer=self.optimizer,
                                                   config=self.ds_config, dist_init_required=False)
        finally:
            if marker is not None:
                delattr(raw_model, _MARKER)
        self.engine = engine
        # The ZeRO optimizer keeps its expert-group handling; the engine itself saves/loads the standard
        # (non-MoE) checkpoint files, since the marker holds no experts.
        engine.has_moe_layers = False
        # bf16 casts every floating buffer; the router's bias / load counters and RoPE tables stay as built
        for n, b in raw_model.named_buffers():
            want = buffer_dtypes.get(n)
            if want is not None and b.dtype != want:
                mod_name, _, buf_name = n.rpartition(".")
                mod = raw_model.get_submodule(mod_name) if mod_name else raw_model
                mod._buffers[buf_name] = b.to(want)
        self.model = engine  # forward (and train()/eval()) through the engine

    def describe(self) -> str:
        clip = self.cfg.train.grad_clip or "off"
        text = (f"deepspeed {self.version} ZeRO-{self.zero_stage}, {'bf16' if self.bf16 else 'fp32'} weights, "
                f"grad accumulation {self.accum}, clip {clip}")
        if self.group_name:
            text += f", experts reduced over expert-dp groups '{self.group_name}' (dp {self.ctx.dp})"
        return text

    # ----- the step -----------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def micro_batch(self, last: bool):
        return contextlib.nullcontext()  # the engine defers the reduction to the accumulation boundary

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps

    def step(self) -> Optional[torch.Tensor]:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if not boundary:
            return None
        if self.meter is not None:
            self.meter.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return torch.tensor(float("nan"))
        return norm.detach().float() if torch.is_tensor(norm) else torch.tensor(float(norm))

    # ----- checkpoints --------------------------------------------------------------------------
    def _rank(self) -> int:
        return dist.get_rank()

    def _ep_coords(self) -> tuple[int, int]:
        """(ep rank, expert-dp rank) of this process."""
        if self.ep <= 1:
            return 0, self._rank()
        return self.ctx.mesh.get_local_rank("ep"), self.ctx.mesh.get_local_rank("dp")

    def _expert_shards(self) -> dict[str, nn.Parameter]:
        params = dict(self.raw_model.named_parameters())
        return {n: params[n] for n in self.expert_names}

    def save(self, run_dir: Path, step: int, trainer_state: dict, keep: int) -> Path:
        root = Path(run_dir) / "checkpoints"
        final = root / f"step_{step:07d}"
        tmp = root / f"step_{step:07d}.tmp"
        rank = self._rank()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        state = {**trainer_state, "step": step, "engine": self.name, "zero_stage": self.zero_stage,
                 "ep": self.ep}
        self.engine.save_checkpoint(str(root), tag=tmp.name, client_state={"moetrain": state}, save_latest=False)
        ckpt.save_rng(tmp)
        ep_rank, edp_rank = self._ep_coords()
        if self.ep > 1 and edp_rank == 0:  # one copy of every expert shard (the module file holds rank 0's)
            torch.save({n: p.detach().cpu() for n, p in self._expert_shards().items()}, tmp / f"experts_ep{ep_rank}.pt")
        dist.barrier()
        if rank == 0:
            _write_json(tmp / "trainer.json", state)  # last: marks the checkpoint complete
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            if keep:
                for old in ckpt.list_checkpoints(run_dir)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load(self, path: Path) -> dict:
        path = Path(path)
        state = ckpt.read_trainer_state(path)
        check_checkpoint_engine(path, state, self.name)
        saved = (state.get("world_size"), state.get("ep", 1), state.get("zero_stage"))
        if saved != (self.ctx.world_size, self.ep, self.zero_stage):
            raise ConfigError(f"resume: {path} was written by DeepSpeed at world size {saved[0]}, parallel.ep="
                              f"{saved[1]}, parallel.zero_stage={saved[2]}; a DeepSpeed checkpoint resumes only in "
                              f"the same layout (now {self.ctx.world_size}, {self.ep}, {self.zero_stage})")
        load_path, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise ConfigError(f"resume: {path}: DeepSpeed found no checkpoint files there")
        if self.ep > 1:
            ep_rank, _ = self._ep_coords()
            shards = torch.load(path / f"experts_ep{ep_rank}.pt", map_location="cpu", weights_only=True)
            with torch.no_grad():
                for n, p in self._expert_shards().items():
                    p.copy_(shards[n])
        ckpt.restore_rng(path)
        return state


def _write_json(path: Path, obj: dict) -> None:
    import json
    path.write_text(json.dumps(obj, indent=1))
