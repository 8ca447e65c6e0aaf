"""The training engine seam: who owns backward, the optimizer step, gradient clipping and checkpoints.

The trainer runs one optimizer step as ``accum`` micro-batches and talks to an engine only through
this interface (``parallel.engine`` picks the implementation)::

    engine.set_lr(lr)                                  # moetrain's schedule, once per optimizer step
    for i, micro_batch in enumerate(micro_batches):
        with engine.micro_batch(last=i == accum - 1):  # e.g. DDP's no_sync on all but the last
            loss = forward(micro_batch)
            engine.backward(loss)                      # the micro-batch's mean loss, not divided by accum
        grad_norm = engine.step()                      # optimizer step at the accumulation boundary only:
                                                       # returns the pre-clip global grad norm there, else None
    model.update_expert_biases(...)                    # trainer: once per optimizer step
    engine.save(run_dir, step, trainer_state, keep) / engine.load(path) -> trainer_state

* :class:`NativeEngine` (``native``): plain PyTorch — (DDP or expert-parallel ``grad_sync``) ->
  global-norm clipping -> ``optimizer.step()``; checkpoints through :mod:`moetrain.checkpoint` (DCP). With
  torch's fused AdamW the clip coefficient goes into the optimizer's own pass (``optimizer.grad_scale``)
  instead of a separate multiply of every gradient (see :meth:`NativeEngine.step`).
* :class:`moetrain.parallel.deepspeed_engine.DeepSpeedEngineAdapter` (``deepspeed``): ZeRO stage 1/2
  through ``deepspeed.initialize``; DeepSpeed owns gradient averaging, accumulation, clipping, BF16 and
  the checkpoint files.

Both write ``<run.dir>/checkpoints/step_<NNNNNNN>/`` atomically (a ``.tmp`` directory renamed once
complete, ``trainer.json`` last), so ``resume=auto`` (:func:`moetrain.checkpoint.latest_checkpoint`)
finds the newest complete checkpoint of either kind; ``trainer.json`` records which engine wrote it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig

from moetrain import checkpoint as ckpt
from moetrain.config import ConfigError
from moetrain.parallel.mesh import DistContext


def checkpoint_engine(state: dict) -> str:
    """The engine that wrote a checkpoint (its ``trainer.json``); checkpoints from before the seam are native."""
    return str(state.get("engine", "native"))


def check_checkpoint_engine(path: Path, state: dict, engine: str) -> None:
    """Raises ConfigError (one line) when the checkpoint at ``path`` was written by another engine."""
    wrote = checkpoint_engine(state)
    if wrote != engine:
        raise ConfigError(f"resume: {path} was written by parallel.engine={wrote}; resume it with "
                          f"parallel.engine={wrote}, or start afresh in another run.dir")


class NativeEngine:
    """Plain PyTorch: the behaviour of the trainer before the seam, unchanged.

    Args:
        model: what forward runs through (DDP-wrapped or the plain model).
        raw_model: the plain model underneath (clipping, checkpoints).
        optimizer: a torch optimizer over ``raw_model``'s parameters.
        grad_sync: called once per optimizer step after the last backward (expert-parallel gradient
            averaging; a no-op under DDP or in one process).
        ctx: the ``DistContext`` (``ep``/``mesh`` for expert-parallel clipping).
        accum: micro-batches per optimizer step; grad_clip: max global norm, 0 = off.
    """

    name = "native"

    def __init__(self, model: torch.nn.Module, raw_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 grad_sync: Callable[[], None], ctx: DistContext, accum: int, grad_clip: float):
        self.model, self.raw_model, self.optimizer = model, raw_model, optimizer
        self.grad_sync, self.ctx, self.accum = grad_sync, ctx, accum
        self.grad_clip = grad_clip
        self._micro = 0

    def describe(self) -> str:
        return "native"

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def micro_batch(self, last: bool):
        """DDP all-reduces (FSDP2 reduce-scatters) gradients only on the last micro-batch of a step."""
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2 (parallel.fsdp)
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if last or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> Optional[torch.Tensor]:
        """At the accumulation boundary: grad sync, global-norm clipping, ``optimizer.step()``, zero grads.

        With torch's fused Adam/AdamW (every param group ``fused``) and ``grad_clip > 0`` the gradients are
        not multiplied by the clip coefficient in a pass of their own: ``optimizer.grad_scale = 1 / coef``
        (torch's GradScaler hook; the fused kernel divides every gradient by it as it reads it) for this one
        step. That removes the clip's separate multiply pass (a read and a write of every gradient), 7.3 ms a
        step on fp8-v3-layers on an H200 (benchmarks/README.md, seventh GPU session). With ``grad_scale`` set
        the fused kernel writes the divided gradient back to ``.grad`` (one write of every gradient): measured in
        the eighth session, the fused kernel went from 27.1 to 32.4-33.0 ms and the optimizer's whole share from
        38.4 to 36.1-36.8 ms a step. After the step ``.grad`` holds the clipped gradient as before (to rounding:
        ``g / (1 / coef)`` instead of ``g * coef``), then it is zeroed.
        Returns the pre-clip global norm (a 0-d device tensor; no host sync).
        """
        self._micro += 1
        if self._micro % self.accum:
            return None
        from moetrain.parallel.grad_sync import clip_grad_norm, grad_norm_and_coef  # experts counted once (ep > 1)
        self.grad_sync()
        if self.grad_clip > 0 and self._fused_step_scales_grads():
            grad_norm, coef = grad_norm_and_coef(self.raw_model, self.grad_clip, self.ctx)
            # NaN norm: 1/coef is NaN and every gradient becomes NaN; inf norm: 1/coef = inf, finite gradients
            # become 0 and inf ones NaN -- exactly what clip_grad_norm's multiply by coef (NaN / 0) does
            self.optimizer.grad_scale = coef.float().reciprocal()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale
        else:
            clip = self.grad_clip if self.grad_clip > 0 else float("inf")
            grad_norm = clip_grad_norm(self.raw_model, clip, self.ctx)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _fused_step_scales_grads(self) -> bool:
        """torch's fused optimizer step divides the gradients by ``optimizer.grad_scale`` (set for GradScaler;
        ``_step_supports_amp_scaling`` is True exactly for fused Adam / AdamW / SGD / Adagrad). FSDP2 keeps the
        multiply pass: its ``auto`` optimizer is the foreach one, and torch's fused AdamW did not run on its
        DTensor parameters in the CPU tests ("got mixed torch.Tensor and DTensor", with or without grad_scale)."""
        return (getattr(self.optimizer, "_step_supports_amp_scaling", False)
                and all(g.get("fused") for g in self.optimizer.param_groups)
                and getattr(self.raw_model, "fsdp_mesh", None) is None)

    def save(self, run_dir: Path, step: int, trainer_state: dict, keep: int) -> Path:
        return ckpt.save_checkpoint(run_dir, step, self.raw_model, self.optimizer, trainer_state, keep=keep)

    def load(self, path: Path) -> dict:
        check_checkpoint_engine(path, ckpt.read_trainer_state(path), self.name)
        # foreach / fused are this run's choice (device, layout, train.optimizer_impl), not the checkpoint's
        impl = [(g.get("foreach"), g.get("fused")) for g in self.optimizer.param_groups]
        state = ckpt.load_checkpoint(path, self.raw_model, self.optimizer)
        for g, (foreach, fused) in zip(self.optimizer.param_groups, impl):
            g["foreach"], g["fused"] = foreach, fused
        return state


def build_engine(cfg: DictConfig, ctx: DistContext, model: torch.nn.Module, raw_model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, grad_sync: Callable[[], None], micro: int, accum: int):
    """The engine named by ``parallel.engine`` around the model returned by ``parallelize``.

    Raises:
        moetrain.parallel.parallelize.UnavailableFeature: ``deepspeed`` is not installed.
    """
    if cfg.parallel.engine == "deepspeed":
        from moetrain.parallel.deepspeed_engine import DeepSpeedEngineAdapter
        return DeepSpeedEngineAdapter(cfg, ctx, raw_model, optimizer, grad_sync, micro, accum)
    return NativeEngine(model, raw_model, optimizer, grad_sync, ctx, accum, cfg.train.grad_clip)
