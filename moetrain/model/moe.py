"""DeepSeekMoE layer: gate, grouped routed experts, shared experts, balance losses.

Sources: DeepSeekMoE (Dai et al. 2024) fine-grained + shared experts; DeepSeek-V2 §2.2 (device-
limited routing, expert-level balance loss); DeepSeek-V3 §2.1.2 (sigmoid affinities, aux-loss-free
balancing with a selection-only bias, eq. 12-16; sequence-wise balance loss, eq. 17-20; node-
limited routing); Switch Transformer (Fedus et al. 2021) balance loss; ST-MoE (Zoph et al. 2022)
router z-loss.

Swappable hot-path ops: ``Gate.topk_fn`` (routing), ``GroupedExperts.act_fn`` (SwiGLU), the
module-level ``grouped_mm`` used by :class:`GroupedExperts`, and ``MoE.dispatcher`` (its
``permute_fn`` / ``unpermute_fn``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.model.args import ModelArgs
from moetrain.model.dispatch import LocalDispatcher

__all__ = [
    "Gate",
    "RouteOutput",
    "affinities",
    "route_topk",
    "GroupedExperts",
    "MoE",
    "swiglu",
    "grouped_mm",
    "_grouped_mm_supported",
    "sequence_balance_loss",
    "switch_balance_loss",
    "router_z_loss",
]


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation (Shazeer 2020): ``silu(gate) * up``."""
    return F.silu(gate) * up


# --------------------------------------------------------------------------------------------
# Gate
# --------------------------------------------------------------------------------------------

class RouteOutput(NamedTuple):
    """A routing decision for ``N`` tokens over ``E`` experts with top-``K``.

    ``weights [N, K]`` fp32, ``ids [N, K]`` int64, ``logits [N, E]`` fp32 (``x W^T``; the
    affinities are :func:`affinities` of them).
    """

    weights: torch.Tensor
    ids: torch.Tensor
    logits: torch.Tensor


def affinities(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """Token-to-expert affinities in fp32: ``softmax(logits)`` or ``sigmoid(logits)``."""
    logits = logits.float()
    return logits.softmax(dim=-1) if score_func == "softmax" else logits.sigmoid()


def route_topk(logits: torch.Tensor, bias: Optional[torch.Tensor], k: int,
               score_func: str = "softmax", n_groups: int = 1, topk_groups: int = 1,
               route_scale: float = 1.0, norm_topk_prob: bool = True):
    """DeepSeek-V3 top-k selection from router logits (the default ``Gate.topk_fn``).

    * ``s = affinities(logits)`` (fp32); selection on ``s + bias`` (no gradient through it).
    * ``n_groups > 1``: experts form ``n_groups`` contiguous groups; a group's score is its max
      (``softmax``, V2 device-limited routing) or the sum of its top-2 biased scores
      (``sigmoid``, V3 node-limited routing); only the best ``topk_groups`` groups stay eligible.
    * weights = ``s`` (unbiased) at the chosen ids, divided by their sum when
      ``score_func == "sigmoid"`` or ``norm_topk_prob``, times ``route_scale``; gradients flow to
      ``logits`` through them.

    Args:
        logits: ``[N, E]``; bias: ``[E]`` fp32 or None.
    Returns:
        ``(weights [N, K] fp32, ids [N, K] int64)``; ids are distinct per row.
    """
    N = logits.shape[0]
    scores = affinities(logits, score_func)
    with torch.no_grad():
        sel = scores.detach()
        if bias is not None:
            sel = sel + bias.float()
        if n_groups > 1 and topk_groups < n_groups:
            sel = sel.view(N, n_groups, -1)
            if score_func == "softmax":
                group_scores = sel.amax(dim=-1)
            else:
                group_scores = sel.topk(min(2, sel.shape[-1]), dim=-1)[0].sum(dim=-1)
            keep = group_scores.topk(topk_groups, dim=-1)[1]
            mask = torch.ones(N, n_groups, dtype=torch.bool, device=logits.device)
            mask.scatter_(1, keep, False)
            sel = sel.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
        ids = sel.topk(k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if score_func == "sigmoid" or norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * route_scale, ids


class _Fp32Buffers:
    """Mixin: named float buffers stay fp32 through ``module.to(dtype)`` / ``.half()`` etc."""

    _fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        for name in self._fp32_buffers:
            buf = self._buffers.get(name)
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return out


class Gate(_Fp32Buffers, nn.Module):
    """Top-k router of DeepSeek-V3 (§2.1.2) with group-limited selection and a selection bias.

    * scores (fp32): ``softmax(x W^T)`` or ``sigmoid(x W^T)``.
    * selection uses ``scores + bias`` (aux-loss-free balancing, V3 eq. 16). With
      ``n_expert_groups > 1`` only the best ``n_limited_groups`` groups may be chosen; a group's
      score is its max (softmax, V2 device-limited routing) or the sum of its top-2 biased scores
      (sigmoid, V3 node-limited routing).
    * weights are the ORIGINAL (unbiased) scores of the selected experts; normalised to sum to 1
      when ``score_func == "sigmoid"`` or ``norm_topk_prob``; then times ``route_scale``.

    The selection itself is ``self.topk_fn`` (default :func:`route_topk`; same signature as
    ``kernels.router.router_topk``, swappable). Parameter ``weight [E, D]`` (a plain Parameter,
    not ``nn.Linear``, so precision swaps skip it). Buffers: ``bias [E]`` fp32 (persistent), ``expert_load [E]`` fp32 (non-persistent: token
    assignments counted by training forwards (``self.training`` and grad enabled, so eval and
    ``torch.no_grad()`` forwards are not counted) since the last :meth:`update_bias`; under
    activation checkpointing the recompute counts again, which changes no ratio and so neither
    the bias update nor the load imbalance).
    """

    _fp32_buffers = ("bias", "expert_load")

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dim = args.dim
        self.n_experts = args.n_routed_experts
        self.topk = args.n_activated_experts
        self.n_groups = args.n_expert_groups
        self.topk_groups = args.n_limited_groups
        self.score_func = args.score_func
        self.route_scale = args.route_scale
        self.norm_topk_prob = args.norm_topk_prob
        self.bias_update_speed = args.bias_update_speed
        self.init_std = args.init_std
        self.weight = nn.Parameter(torch.empty(self.n_experts, self.dim))
        self.register_buffer("bias", torch.zeros(self.n_experts, dtype=torch.float32))
        self.register_buffer("expert_load", torch.zeros(self.n_experts, dtype=torch.float32),
                             persistent=False)
        self.topk_fn = route_topk

    def reset_parameters(self) -> None:
        """``weight ~ N(0, init_std)``; bias and expert_load zeroed."""
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        with torch.no_grad():
            self.bias.zero_()
            self.expert_load.zero_()

    def route(self, x: torch.Tensor) -> RouteOutput:
        """Route ``x [N, D]``: fp32 logits ``x W^T``, then ``self.topk_fn`` (default
        :func:`route_topk`). Accumulates ``expert_load`` when training with grad enabled (no host
        sync: a ``scatter_add_``)."""
        logits = F.linear(x.float(), self.weight.float())
        weights, ids = self.topk_fn(logits, self.bias, self.topk, self.score_func, self.n_groups,
                                    self.topk_groups, self.route_scale, self.norm_topk_prob)
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                flat = ids.reshape(-1)
                self.expert_load.scatter_add_(
                    0, flat, torch.ones(flat.shape, dtype=self.expert_load.dtype, device=flat.device))
        return RouteOutput(weights, ids, logits)

    def forward(self, x: torch.Tensor):
        """``x [N, D]`` -> ``(topk_weights [N, K] fp32, topk_ids [N, K] int64)``."""
        out = self.route(x)
        return out.weights, out.ids

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """Aux-loss-free balancing step (V3 §2.1.2): ``bias += gamma * sign(mean(counts) - counts)``
        (overloaded experts go down, underloaded up), then zero ``expert_load``.

        Args:
            counts: ``[E]`` token counts (e.g. ``expert_load``, all-reduced by the caller).
        """
        if self.bias_update_speed:
            c = counts.to(device=self.bias.device, dtype=torch.float32)
            self.bias.add_(self.bias_update_speed * torch.sign(c.mean() - c))
        self.expert_load.zero_()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_experts={self.n_experts}, topk={self.topk}, "
                f"groups={self.n_groups}/{self.topk_groups}, score_func={self.score_func}, "
                f"route_scale={self.route_scale}")


# --------------------------------------------------------------------------------------------
# Balance losses
# --------------------------------------------------------------------------------------------

def _assignment_counts(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """``ids [B, S]`` int64 -> per-row counts ``[B, E]`` fp32 (no grad)."""
    counts = torch.zeros(ids.shape[0], n_experts, dtype=torch.float32, device=ids.device)
    return counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=torch.float32, device=ids.device))


def sequence_balance_loss(scores: torch.Tensor, ids: torch.Tensor, topk: int) -> torch.Tensor:
    """Sequence-wise balance loss of DeepSeek-V3 eq. 17-20 (unweighted; multiply by alpha).

    Per sequence: ``f_i = E / (K T) * #{t : i in topk(t)}``, ``P_i = mean_t s'_{i,t}`` with
    ``s' = s / sum_j s_j`` (normalised affinities); loss ``sum_i f_i P_i``; mean over sequences.
    Equals 1 for perfectly balanced routing. (DeepSeek-V2's expert-level loss is the same
    formula.)

    Args:
        scores: ``[B, T, E]`` original affinities (fp32, differentiable).
        ids: ``[B, T, K]`` selected experts.
    """
    B, T, E = scores.shape
    s = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    P = s.mean(dim=1)
    f = _assignment_counts(ids.reshape(B, -1), E) * (E / (topk * T))
    return (f * P).sum(dim=-1).mean()


def switch_balance_loss(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss ``E * sum_i f_i P_i`` over all tokens (unweighted).

    ``f_i``: fraction of the ``N*K`` assignments that went to expert i; ``P_i``: mean normalised
    affinity. Equals 1 for perfectly balanced routing.

    Args:
        scores: ``[N, E]`` original affinities; ids: ``[N, K]``.
    """
    E = scores.shape[-1]
    s = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    f = _assignment_counts(ids.reshape(1, -1), E)[0] / ids.numel()
    return E * (f * s.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_n logsumexp(logits_n)^2`` (unweighted). ``logits [N, E]``."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


# --------------------------------------------------------------------------------------------
# Routed experts
# --------------------------------------------------------------------------------------------

class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s backward rejects stride-0 (expanded) gradients, such as the one
    ``y.sum().backward()`` produces.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _grouped_mm_supported(x: torch.Tensor, *dims: int) -> bool:
    """Whether ``torch._grouped_mm`` runs for ``x`` here: CPU (any float dtype eagerly; bf16
    only under ``torch.compile``, whose meta kernel insists on bf16), or CUDA with compute
    capability >= 9.0 and bf16 inputs whose inner dims are multiples of 8 (16-byte aligned
    strides)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    if x.device.type == "cuda":
        return (torch.cuda.get_device_capability(x.device) >= (9, 0)
                and x.dtype == torch.bfloat16 and all(d % 8 == 0 for d in dims))
    return False


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``out[rows of group e] = x[rows of group e] @ w[e].T`` via ``torch._grouped_mm``.

    Args:
        x: ``[M, K_in]`` rows sorted by group; w: ``[G, N_out, K_in]``; offs: ``[G]`` int32
            cumulative row counts (``offs[-1] == M``).
    Returns:
        ``[M, N_out]`` in ``x.dtype``.
    """
    return _ContiguousGrad.apply(torch._grouped_mm(x, w.transpose(-2, -1), offs=offs))


def _looped_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Exact per-group fallback of :func:`grouped_mm` (counts are host ints)."""
    outs = [xe @ w[e].transpose(0, 1) for e, xe in enumerate(torch.split(x, counts, dim=0))]
    return torch.cat(outs, dim=0) if outs else x.new_empty(0, w.shape[1])


class GroupedExperts(nn.Module):
    """``E_local`` SwiGLU experts evaluated together: ``w2(act(w1 x, w3 x))`` per expert.

    Parameters ``w1 [E, I, D]``, ``w2 [E, D, I]``, ``w3 [E, I, D]`` (``I = moe_inter_dim``).
    Uses one ``torch._grouped_mm`` per weight where :func:`_grouped_mm_supported`, otherwise an
    exact per-expert loop (reads ``tokens_per_expert`` on the host).
    ``act_fn`` (default :func:`swiglu`) is swappable. ``act_packed_fn`` (default None): the same activation on the
    packed ``[M, 2I] = cat(w1 x, w3 x)`` when set (a fused kernel that returns the packed gradient, no slice
    copies), used by modules that compute W1 and W3 as one GEMM (the FP8 experts).
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int, init_std: float = 0.02,
                 out_std: Optional[float] = None):
        super().__init__()
        self.n_experts, self.dim, self.inter_dim = n_experts, dim, inter_dim
        self.init_std = init_std
        self.out_std = init_std if out_std is None else out_std
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.act_fn = swiglu
        self.act_packed_fn = None

    def reset_parameters(self) -> None:
        """``w1, w3 ~ N(0, init_std)``, ``w2 ~ N(0, out_std)`` (residual-scaled)."""
        nn.init.normal_(self.w1, std=self.init_std)
        nn.init.normal_(self.w3, std=self.init_std)
        nn.init.normal_(self.w2, std=self.out_std)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``x [M, D]`` rows sorted by local expert, ``tokens_per_expert [E]`` (sum ``M``)
        -> ``[M, D]`` in ``x.dtype``."""
        if torch.is_autocast_enabled(x.device.type):  # autocast does not cover the grouped GEMM
            x = x.to(torch.get_autocast_dtype(x.device.type))
        w1, w2, w3 = (w.to(x.dtype) for w in (self.w1, self.w2, self.w3))
        if _grouped_mm_supported(x, self.dim, self.inter_dim):
            offs = torch.cumsum(tokens_per_expert, dim=0).to(torch.int32)
            h = self.act_fn(grouped_mm(x, w1, offs), grouped_mm(x, w3, offs))
            return grouped_mm(h, w2, offs)
        counts = tokens_per_expert.tolist()
        h = self.act_fn(_looped_mm(x, w1, counts), _looped_mm(x, w3, counts))
        return _looped_mm(h, w2, counts)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, dim={self.dim}, inter_dim={self.inter_dim}"


# --------------------------------------------------------------------------------------------
# MoE layer
# --------------------------------------------------------------------------------------------

class MoE(nn.Module):
    """DeepSeekMoE FFN: ``y = sum_k w_k * expert_{id_k}(x) + shared_experts(x)``.

    Modules: ``gate`` (:class:`Gate`), ``experts`` (:class:`GroupedExperts`), ``shared_experts``
    (an ``MLP`` of hidden size ``n_shared_experts * moe_inter_dim``, or ``None``); attribute
    ``dispatcher`` (:class:`~moetrain.model.dispatch.LocalDispatcher`; replaced by the
    expert-parallel one). After every forward ``self.aux_loss`` holds the weighted balance /
    z losses (a 0-d fp32 tensor, 0 in eval mode or with all coefficients 0).
    """

    def __init__(self, args: ModelArgs, out_std: Optional[float] = None):
        super().__init__()
        from moetrain.model.transformer import MLP  # lazy: transformer imports this module

        self.dim = args.dim
        self.n_routed_experts = args.n_routed_experts
        self.topk = args.n_activated_experts
        self.seq_aux_alpha = args.seq_aux_alpha
        self.switch_aux_alpha = args.switch_aux_alpha
        self.router_z_loss_coef = args.router_z_loss_coef
        self.gate = Gate(args)
        self.experts = GroupedExperts(args.n_routed_experts, args.dim, args.moe_inter_dim,
                                      args.init_std, out_std)
        self.shared_experts = (MLP(args.dim, args.n_shared_experts * args.moe_inter_dim,
                                   args.init_std, out_std)
                               if args.n_shared_experts > 0 else None)
        self.dispatcher = LocalDispatcher(args.n_routed_experts)
        self.aux_loss = torch.zeros(())

    def _aux_losses(self, r: RouteOutput, B: int, T: int) -> torch.Tensor:
        """Weighted sum of the enabled balance / z losses (0 outside training)."""
        loss = r.logits.new_zeros(())
        if not self.training:
            return loss
        if self.seq_aux_alpha or self.switch_aux_alpha:
            scores = affinities(r.logits, self.gate.score_func)
            if self.seq_aux_alpha:
                loss = loss + self.seq_aux_alpha * sequence_balance_loss(
                    scores.view(B, T, -1), r.ids.view(B, T, -1), self.topk)
            if self.switch_aux_alpha:
                loss = loss + self.switch_aux_alpha * switch_balance_loss(scores, r.ids)
        if self.router_z_loss_coef:
            loss = loss + self.router_z_loss_coef * router_z_loss(r.logits)
        return loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D]`` -> ``[B, T, D]`` (same dtype). Sets ``self.aux_loss``."""
        B, T, D = x.shape
        x = x.reshape(B * T, D)
        r = self.gate.route(x)
        self.aux_loss = self._aux_losses(r, B, T)
        state = self.dispatcher.dispatch(x, r.ids, r.weights)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        expert_x, tokens_per_expert = self.dispatcher.wait(state)
        expert_y = self.experts(expert_x, tokens_per_expert)
        y = self.dispatcher.combine(expert_y, state)
        if shared is not None:
            y = y + shared
        return y.view(B, T, D)
