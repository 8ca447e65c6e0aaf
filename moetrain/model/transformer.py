"""The decoder: RMSNorm, dense SwiGLU MLP, Block (MLA + MLP/MoE), Transformer.

``Transformer(args)(tokens[B, T]) -> logits[B, T, vocab_size]``; embedding -> ``n_layers`` pre-norm
blocks (the first ``n_dense_layers`` with a dense MLP, the rest MoE; DeepSeek-V3 §2 / §4.2) ->
final RMSNorm -> untied head ``output``.

Plain single-device PyTorch (never imports ``torch.distributed``): parallelism, FP8 and kernels are
applied from outside. Swappable hot-path pieces: the ``RMSNorm`` modules (and the module-level
:func:`rms_norm` they call), ``MLP.act_fn`` (SwiGLU), ``MLA.attn_core`` / ``MLA.rope_fn``,
``GroupedExperts.act_fn``, ``MoE.dispatcher``.

Meta-device flow (FSDP2): build under ``with torch.device("meta")``, ``model.to_empty(device=...)``,
then ``model.init_weights()`` (which also recomputes the RoPE tables and zeroes the gate buffers).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.model.args import ModelArgs
from moetrain.model.mla import MLA, precompute_freqs_cis
from moetrain.model.moe import MoE, Gate, _Fp32Buffers, swiglu

__all__ = ["rms_norm", "RMSNorm", "MLP", "Block", "Transformer"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` computed in fp32, returned in ``x.dtype``."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019) over the last dim, fp32 compute.

    Parameter ``weight [dim]`` (ones at init). Input any float dtype ``[..., dim]``; output same
    dtype and shape.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class MLP(nn.Module):
    """SwiGLU feed-forward ``w2(act_fn(w1 x, w3 x))``; ``nn.Linear`` w1, w3 ``[dim -> inter]``,
    w2 ``[inter -> dim]``, no bias. Used as the dense FFN and as the shared experts."""

    def __init__(self, dim: int, inter_dim: int, init_std: float = 0.02,
                 out_std: Optional[float] = None):
        super().__init__()
        self.init_std = init_std
        self.out_std = init_std if out_std is None else out_std
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)
        self.act_fn = swiglu

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1.weight, std=self.init_std)
        nn.init.normal_(self.w3.weight, std=self.init_std)
        nn.init.normal_(self.w2.weight, std=self.out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x), self.w3(x)))


def _init_mla(attn: MLA, std: float, out_std: float) -> None:
    for name in ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b"):
        lin = getattr(attn, name, None)
        if lin is not None:
            nn.init.normal_(lin.weight, std=std)
    nn.init.normal_(attn.wo.weight, std=out_std)
    for name in ("q_norm", "kv_norm"):
        norm = getattr(attn, name, None)
        if norm is not None:
            norm.reset_parameters()


def load_stats(loads: torch.Tensor, layer_ids: list[int], hist: bool = False) -> dict:
    """Balance statistics of expert loads (host floats).

    Args:
        loads: ``[L, E]`` token copies routed to each expert of each MoE layer.
        layer_ids: the block index of each row (the ``i`` of the per-layer keys).
        hist: also return ``moe/load_hist/layer_{i}`` (list of E ints).
    Returns:
        ``moe/load_imbalance`` (max/mean load, mean over layers; 1 = perfect, also for an unused
        layer), ``moe/load_cv`` (std/mean over experts, mean over layers); per layer
        ``moe/load_imbalance/layer_{i}``, ``moe/load_cv/layer_{i}``, ``moe/load_max/layer_{i}``,
        ``moe/load_mean/layer_{i}``.
    """
    loads = loads.float()
    mean, mx = loads.mean(dim=1), loads.amax(dim=1)
    safe = mean.clamp_min(1e-12)
    imb = torch.where(mean > 0, mx / safe, torch.ones_like(mean))
    cv = torch.where(mean > 0, loads.std(dim=1, unbiased=False) / safe, torch.zeros_like(mean))
    imb_l, cv_l, mx_l, mean_l = torch.stack([imb, cv, mx, mean]).tolist()
    stats = {"moe/load_imbalance": sum(imb_l) / len(imb_l), "moe/load_cv": sum(cv_l) / len(cv_l)}
    hist_rows = loads.round().long().tolist() if hist else None
    for j, i in enumerate(layer_ids):
        stats[f"moe/load_imbalance/layer_{i}"] = imb_l[j]
        stats[f"moe/load_cv/layer_{i}"] = cv_l[j]
        stats[f"moe/load_max/layer_{i}"] = mx_l[j]
        stats[f"moe/load_mean/layer_{i}"] = mean_l[j]
        if hist:
            stats[f"moe/load_hist/layer_{i}"] = hist_rows[j]
    return stats


class Block(nn.Module):
    """Pre-norm block: ``x += attn(attn_norm(x)); x += ffn(ffn_norm(x))``.

    ``ffn`` is an ``MLP(dim, inter_dim)`` for ``layer_id < n_dense_layers``, else ``MoE``.
    Residual output projections (``attn.wo``, ``w2`` of every FFN/expert) are initialised with
    ``init_std / sqrt(2 * n_layers)`` (GPT-2 style).
    """

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.init_std = args.init_std
        self.out_std = args.init_std / math.sqrt(2 * args.n_layers)
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        if layer_id < args.n_dense_layers:
            self.ffn = MLP(args.dim, args.inter_dim, args.init_std, self.out_std)
        else:
            self.ffn = MoE(args, self.out_std)
        self.drop = nn.Dropout(args.dropout)  # on each residual branch's output (training only)

    def reset_parameters(self) -> None:
        self.attn_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        _init_mla(self.attn, self.init_std, self.out_std)
        if isinstance(self.ffn, MoE):
            self.ffn.gate.reset_parameters()
            self.ffn.experts.reset_parameters()
            if self.ffn.shared_experts is not None:
                self.ffn.shared_experts.reset_parameters()
        else:
            self.ffn.reset_parameters()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D]``, RoPE tables ``[T, Dr/2]`` -> ``[B, T, D]``."""
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class Transformer(_Fp32Buffers, nn.Module):
    """MLA + DeepSeekMoE decoder-only LM.

    Attributes: ``embed`` (``nn.Embedding``), ``layers`` (``nn.ModuleList`` of :class:`Block`),
    ``norm`` (:class:`RMSNorm`), ``output`` (``nn.Linear`` head, untied), buffers ``freqs_cos``,
    ``freqs_sin`` ``[max_seq_len, qk_rope_head_dim/2]`` fp32 (non-persistent; they stay fp32
    through ``model.to(dtype)``).

    Raises ``ValueError`` for inconsistent args (:meth:`ModelArgs.validate`).
    """

    _fp32_buffers = ("freqs_cos", "freqs_sin")

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args.validate()
        # Submodule constructors draw default inits from the RNG; fork it so that
        # `manual_seed(s); Transformer(args)` equals `manual_seed(s); init_weights()` of a model
        # built on the meta device (the FSDP flow).
        cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            self.embed = nn.Embedding(args.vocab_size, args.dim)
            self.drop = nn.Dropout(args.dropout)
            self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
            self.norm = RMSNorm(args.dim, args.norm_eps)
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("freqs_cos", torch.empty(args.max_seq_len, args.qk_rope_head_dim // 2),
                             persistent=False)
        self.register_buffer("freqs_sin", torch.empty(args.max_seq_len, args.qk_rope_head_dim // 2),
                             persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer in a fixed order (deterministic under
        ``torch.manual_seed``): embedding and head ``N(0, init_std)``, MLA/FFN input projections
        and gates ``N(0, init_std)``, residual output projections ``N(0, init_std/sqrt(2 L))``,
        norms 1, gate ``bias``/``expert_load`` 0, RoPE tables recomputed on the buffers' device.
        Called by ``__init__``: ``manual_seed(s); Transformer(args)`` gives the same weights as
        ``manual_seed(s); model.init_weights()`` on a meta-built, ``to_empty``-ed model.
        """
        std = self.args.init_std
        nn.init.normal_(self.embed.weight, std=std)
        for layer in self.layers:
            layer.reset_parameters()
        self.norm.reset_parameters()
        nn.init.normal_(self.output.weight, std=std)
        cos, sin = precompute_freqs_cis(self.args, device=self.freqs_cos.device)
        self.freqs_cos = cos
        self.freqs_sin = sin

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, T]`` int64 -> ``logits [B, T, vocab_size]`` (dtype of the head).

        Raises:
            ValueError: ``T > max_seq_len``.
        """
        T = tokens.shape[1]
        if T > self.freqs_cos.shape[0]:
            raise ValueError(f"sequence length {T} > max_seq_len {self.freqs_cos.shape[0]}")
        cos, sin = self.freqs_cos[:T], self.freqs_sin[:T]
        h = self.drop(self.embed(tokens))
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h))

    # ---- MoE bookkeeping -------------------------------------------------------------------

    def moe_layers(self) -> list[MoE]:
        """The MoE FFNs, in layer order."""
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)]

    def gates(self) -> list[Gate]:
        """The routers of the MoE layers, in layer order."""
        return [moe.gate for moe in self.moe_layers()]

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' ``aux_loss`` from the last forward (already weighted; a 0-d
        fp32 tensor, 0 without MoE layers or in eval mode)."""
        total = torch.zeros((), device=self.embed.weight.device)
        for moe in self.moe_layers():
            total = total + moe.aux_loss.to(total.device)
        return total

    @torch.no_grad()
    def update_expert_biases(self, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        """One aux-loss-free balancing step for every gate; call once per optimizer step.

        ``counts = gate.expert_load`` for every gate, stacked into one ``[n_moe_layers, E]``
        tensor so that ``reduce`` (e.g. an all-reduce SUM over data-parallel ranks; any
        elementwise reduction) is called once; then ``gate.update_bias(counts[i])`` which also
        zeroes ``expert_load``.
        """
        gates = self.gates()
        if not gates:
            return
        counts = torch.stack([g.expert_load for g in gates])
        if reduce is not None:
            counts = reduce(counts)
        for g, c in zip(gates, counts):
            g.update_bias(c)

    @torch.no_grad()
    def moe_stats(self, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
        """Routing statistics of the load accumulated since the last bias update (host floats):
        :func:`load_stats` of every MoE layer's ``expert_load`` plus ``moe/bias_abs_max`` (largest
        |bias| over all gates). Empty dict without MoE layers. ``reduce`` as in
        :meth:`update_expert_biases` (applied to a copy). Call before ``update_expert_biases``.
        """
        pairs = [(layer.layer_id, layer.ffn.gate) for layer in self.layers
                 if isinstance(layer.ffn, MoE)]
        if not pairs:
            return {}
        loads = torch.stack([g.expert_load for _, g in pairs]).clone()
        if reduce is not None:
            loads = reduce(loads)
        bias_max = torch.stack([g.bias.abs().max() for _, g in pairs]).max()
        return {**load_stats(loads, [i for i, _ in pairs]), "moe/bias_abs_max": bias_max.item()}
