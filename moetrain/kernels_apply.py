"""Puts the Triton kernels of ``kernels/`` on a plain model's hot path, from outside.

Each op replaces one swappable attribute the model exposes (docs/interfaces.md): ``MLA.attn_core`` and
``MLA.attn_core_split`` (flash-style MLA attention; the split form reads q/k's nope and rope parts in place and
the shared rope key once for all heads), ``MLA.rope_fn``, ``RMSNorm`` modules, ``MLP.act_fn`` and
``GroupedExperts.act_fn`` / ``act_packed_fn`` (SwiGLU), ``Gate.topk_fn`` (fused router) and the dispatcher's
``permute_fn`` / ``unpermute_fn``. Parameters and state-dict keys are unchanged, so checkpoints move
freely between kernels on and off. Where Triton cannot run (not installed, or a CPU tensor without
``TRITON_INTERPRET=1``) nothing is replaced and the reason is returned.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from moetrain.model.mla import MLA
from moetrain.model.moe import Gate, GroupedExperts
from moetrain.model.transformer import MLP, RMSNorm

OPS = ("attention", "rmsnorm", "rope", "swiglu", "router", "permute")


def triton_unavailable(device: torch.device) -> Optional[str]:
    """None if Triton kernels can run on ``device``, else the reason (one line)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels need a GPU (or TRITON_INTERPRET=1 on CPU, for tests)"
    if device.type not in ("cpu", "cuda"):
        return f"no Triton backend for device type {device.type}"
    return None


class FusedRMSNorm(nn.Module):
    """Drop-in for :class:`RMSNorm` (same ``weight`` parameter) running ``kernels.rmsnorm``."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.dim, self.eps = norm.dim, norm.eps
        self.weight = norm.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from kernels.rmsnorm import rmsnorm
        return rmsnorm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, triton"


def _router_for(gate: Gate):
    """The fused router for ``gate``, or None where its group rule differs from the model's.

    The kernel scores a group by the sum of its top-2 biased scores when a bias is passed and by its
    max otherwise (DeepSeek-V3's code); the model decides by ``score_func`` (sigmoid: top-2 sum,
    softmax: max). They agree for sigmoid (bias passed) and for softmax without bias updates (bias
    withheld: it is all zeros); a softmax gate with groups and a learned bias keeps the torch path.
    """
    from kernels.router import router_topk
    grouped = gate.n_groups > 1 and gate.topk_groups < gate.n_groups
    if gate.score_func == "softmax" and grouped and gate.bias_update_speed > 0:
        return None
    pass_bias = gate.score_func == "sigmoid" or gate.bias_update_speed > 0 or not grouped

    def topk_fn(logits, bias, k, score_func, n_groups, topk_groups, route_scale, norm_topk_prob):
        return router_topk(logits, bias if pass_bias else None, k, score_func, n_groups, topk_groups,
                           route_scale, norm_topk_prob)
    return topk_fn


def apply_kernels(model: nn.Module, kcfg, device: Optional[torch.device] = None) -> dict[str, int]:
    """Swaps the enabled ops in place; returns ``{op: modules changed}`` (empty if Triton can't run).

    Args:
        kcfg: the ``kernels`` config section (``attention``, ``rmsnorm``, ``rope``, ``swiglu``,
            ``router``, ``permute`` booleans).
        device: where the model runs (default: the device of its first parameter).
    """
    device = device or next(model.parameters()).device
    if triton_unavailable(device):
        return {}
    from kernels.mla_attention import mla_attention, mla_attention_split
    from kernels.permute import RowOps, permute, stable_order, unpermute
    from kernels.rope import rope
    from kernels.swiglu import swiglu, swiglu_packed

    changed = {op: 0 for op in OPS}
    for name, module in list(model.named_modules()):
        if isinstance(module, MLA):
            if kcfg.attention:
                module.attn_core, module.attn_core_split = mla_attention, mla_attention_split
                changed["attention"] += 1
            if kcfg.rope:
                module.rope_fn, changed["rope"] = rope, changed["rope"] + 1
        elif isinstance(module, (MLP, GroupedExperts)) and kcfg.swiglu:
            module.act_fn, changed["swiglu"] = swiglu, changed["swiglu"] + 1
            if isinstance(module, GroupedExperts):
                module.act_packed_fn = swiglu_packed
        elif isinstance(module, Gate) and kcfg.router:
            fn = _router_for(module)
            if fn is not None:
                module.topk_fn, changed["router"] = fn, changed["router"] + 1
        dispatcher = getattr(module, "dispatcher", None)
        if kcfg.permute and dispatcher is not None and hasattr(dispatcher, "permute_fn"):
            dispatcher.permute_fn, dispatcher.unpermute_fn = permute, unpermute
            if hasattr(dispatcher, "order_fn"):  # the expert-parallel dispatcher's regroup sort
                dispatcher.order_fn = stable_order
            if hasattr(dispatcher, "row_ops"):  # ... and its pipelined exchange's chunk passes
                dispatcher.row_ops = RowOps
            changed["permute"] += 1
    if kcfg.rmsnorm:
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is RMSNorm:
                    setattr(module, child_name, FusedRMSNorm(child))
                    changed["rmsnorm"] += 1
    return changed
