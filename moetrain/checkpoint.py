"""Atomic, resumable checkpoints through torch.distributed.checkpoint (DCP).

Layout: ``<run_dir>/checkpoints/step_<NNNNNNN>/`` holding the DCP shards of the model and optimizer
(``get_state_dict``/``set_state_dict``: plain, DDP, FSDP2 and DTensor-sharded experts alike), one
``rng_rank<R>.pt`` per rank (tensors only, loaded with ``weights_only=True``) and ``trainer.json``
(step, sampler position, cost-meter totals, W&B run id: plain JSON). A checkpoint is first written to
``step_<N>.tmp`` and renamed once every rank has finished, so a crash never leaves a half-written
checkpoint where :func:`latest_checkpoint` looks. Nothing is unpickled on load.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_STEP_DIR = re.compile(r"^step_(\d{7})$")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes' a single process when no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_rng(directory: Path) -> None:
    """Writes this rank's CPU (and CUDA) RNG state to ``directory/rng_rank<R>.pt`` (tensors only)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, Path(directory) / f"rng_rank{_rank()}.pt")


def restore_rng(directory: Path) -> None:
    """Restores what :func:`save_rng` wrote for this rank, if present (``weights_only=True``)."""
    rng_file = Path(directory) / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


def _dcp_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """``get_state_dict(model, optimizer)``, passed through ``model.dcp_state_dict_hook.to_dcp`` when the
    model has one (expert parallelism: ``moetrain.parallel.expert_parallel.ExpertShardCheckpointHook``
    presents local expert shards and their Adam moments as DTensors with global shapes, so DCP stores
    each expert once and reshards to any ep / dp layout on load)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    hook = getattr(model, "dcp_state_dict_hook", None)
    if hook is not None:
        model_sd, optim_sd = hook.to_dcp(model_sd, optim_sd)
    return model_sd, optim_sd


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, trainer_state: dict, keep: int = 2,
                    extra_state: Optional[dict] = None) -> Path:
    """Saves a checkpoint collectively (every rank calls it); returns the final directory.

    Args:
        trainer_state: JSON-serialisable dict (step, sampler, cost meter, ...), written by rank 0.
        keep: number of newest checkpoints kept (older ones are deleted by rank 0); 0 keeps all.
        extra_state: additional tensors / Stateful objects saved through DCP (e.g. expert-parallel state).
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = _dcp_state_dicts(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, **(extra_state or {})}
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(tmp))
    save_rng(tmp)
    _barrier()
    if _rank() == 0:
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The checkpoint's trainer.json. Raises FileNotFoundError naming the file if it is absent."""
    f = Path(path) / "trainer.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: not a complete moetrain checkpoint (no trainer.json)")
    return json.loads(f.read_text())


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra_state: Optional[dict] = None) -> dict:
    """Loads model, optimizer (in place, collectively) and this rank's RNG; returns trainer.json.

    The model and optimizer may be laid out differently from when they were saved (another world size,
    ep or dp): DCP reshards by fully qualified names and global shapes.
    """
    path = Path(path)
    trainer_state = read_trainer_state(path)
    model_sd, optim_sd = _dcp_state_dicts(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, **(extra_state or {})}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    hook = getattr(model, "dcp_state_dict_hook", None)
    if hook is not None:  # DTensor views of local expert shards -> local tensors again
        state["model"], state["optim"] = hook.from_dcp(state["model"], state["optim"])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    restore_rng(path)
    return trainer_state
