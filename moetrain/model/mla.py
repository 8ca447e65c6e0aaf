"""Multi-Head Latent Attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1) with decoupled RoPE / YaRN.

Data path for ``x[B, T, D]`` (``H`` heads, ``Dn = qk_nope_head_dim``, ``Dr = qk_rope_head_dim``,
``Dv = v_head_dim``, ``R = kv_lora_rank``)::

    q    = wq(x)                      | wq_b(q_norm(wq_a(x)))        [B, T, H, Dn + Dr]
    q_nope, q_pe = split(q);  q_pe = rope(q_pe)
    c_kv, k_pe = split(wkv_a(x), [R, Dr]);  k_pe = rope(k_pe)      k_pe shared by all heads
    k_nope, v  = split(wkv_b(kv_norm(c_kv)), [Dn, Dv])              [B, T, H, Dn], [B, T, H, Dv]
    o = attn_core(cat(q_nope, q_pe), cat(k_nope, k_pe), v)         [B, H, T, Dv]
        (or, when set, attn_core_split(q_nope, q_pe, k_nope, k_pe [B, 1, T, Dr], v): no concatenation)
    out = wo(o)                                                    [B, T, D]

Training uses this "naive" form (per-head K/V materialised). :func:`mla_absorbed_attention` is the
inference form: ``wkv_b`` is absorbed into the query and the output, so attention runs against the
latent cache ``(kv_norm(c_kv), k_pe)`` only; it is tested equal to the naive form.

RoPE is applied with real ``cos``/``sin`` tables (no complex tensors: friendly to torch.compile and
bf16) on interleaved pairs ``(x[2i], x[2i+1])``, the layout of DeepSeek-V3's ``inference/model.py``.

Swappable hot-path ops (replace from outside, e.g. with Triton kernels):
``MLA.attn_core`` (instance attribute, default :func:`sdpa_attention`), ``MLA.attn_core_split`` (default None;
when set, called instead of ``attn_core`` as ``attn_core_split(q_nope, q_pe, k_nope, k_pe, v, causal=True,
softmax_scale=)`` with ``[B, H, T, .]`` views and the shared ``k_pe`` as ``[B, 1, T, Dr]``, so neither the q/k
concatenation nor the per-head copy of ``k_pe`` is materialised; code that swaps ``attn_core`` after
:func:`moetrain.kernels_apply.apply_kernels` must reset ``attn_core_split`` to None), ``MLA.rope_fn`` (default
:func:`apply_rotary_emb`), and the ``q_norm`` / ``kv_norm`` RMSNorm modules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.model.args import ModelArgs

__all__ = [
    "precompute_freqs_cis",
    "yarn_softmax_scale",
    "apply_rotary_emb",
    "sdpa_attention",
    "MLA",
    "LatentKVCache",
    "mla_absorbed_attention",
]


# --------------------------------------------------------------------------------------------
# RoPE / YaRN
# --------------------------------------------------------------------------------------------

def _find_correction_dim(num_rotations: float, dim: int, base: float, max_seq_len: int) -> float:
    """Dimension index whose wavelength completes ``num_rotations`` turns over ``max_seq_len``."""
    return dim * math.log(max_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def _find_correction_range(low_rot: float, high_rot: float, dim: int, base: float,
                           max_seq_len: int) -> tuple[int, int]:
    low = math.floor(_find_correction_dim(low_rot, dim, base, max_seq_len))
    high = math.ceil(_find_correction_dim(high_rot, dim, base, max_seq_len))
    return max(low, 0), min(high, dim - 1)


def _linear_ramp(lo: float, hi: float, n: int) -> torch.Tensor:
    if lo == hi:
        hi += 0.001
    return torch.clamp((torch.arange(n, dtype=torch.float32, device="cpu") - lo) / (hi - lo), 0, 1)


def precompute_freqs_cis(args: ModelArgs, seq_len: Optional[int] = None,
                         device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables with YaRN frequency interpolation, as DeepSeek-V3 ``precompute_freqs_cis``.

    Base frequencies ``theta_i = rope_theta ** (-2i / Dr)``, ``i < Dr/2``. When
    ``args.max_seq_len > args.original_seq_len`` (YaRN, Peng et al. 2023; V3 §4.3) the
    frequencies are blended: dims rotating faster than ``beta_fast`` turns over
    ``original_seq_len`` are kept, dims slower than ``beta_slow`` turns are divided by
    ``rope_factor``, with a linear ramp between. Otherwise (or with ``rope_factor == 1``) this is
    plain RoPE.

    Args:
        args: uses ``qk_rope_head_dim, max_seq_len, rope_theta, rope_factor, beta_fast,
            beta_slow, original_seq_len``.
        seq_len: number of positions to tabulate (default ``args.max_seq_len``). The YaRN switch
            depends on ``args.max_seq_len`` only, so a prefix of the table never changes.
        device: where to put the result (computed on CPU in fp32, then moved).
    Returns:
        ``(cos, sin)``, each fp32 ``[seq_len, qk_rope_head_dim // 2]``.
    """
    dim = args.qk_rope_head_dim
    seq_len = args.max_seq_len if seq_len is None else seq_len
    base = args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if args.max_seq_len > args.original_seq_len:
        low, high = _find_correction_range(args.beta_fast, args.beta_slow, dim, base,
                                           args.original_seq_len)
        smooth = 1 - _linear_ramp(low, high, dim // 2)
        freqs = freqs / args.rope_factor * (1 - smooth) + freqs * smooth
    t = torch.arange(seq_len, dtype=torch.float32, device="cpu")
    angles = torch.outer(t, freqs)
    cos, sin = angles.cos(), angles.sin()
    if device is not None:
        cos, sin = cos.to(device), sin.to(device)
    return cos, sin


def yarn_softmax_scale(args: ModelArgs) -> float:
    """Attention softmax scale: ``qk_head_dim ** -0.5``, times ``(0.1 * mscale * ln(rope_factor)
    + 1) ** 2`` when YaRN is active (``max_seq_len > original_seq_len``), as DeepSeek-V3 MLA."""
    scale = args.qk_head_dim ** -0.5
    if args.max_seq_len > args.original_seq_len:
        m = 0.1 * args.mscale * math.log(args.rope_factor) + 1.0
        scale = scale * m * m
    return scale


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim: ``(x0, x1) -> (x0 c - x1 s, x0 s + x1 c)``.

    Args:
        x: ``[B, T, H, Dr]`` any float dtype (computed in fp32, returned in ``x.dtype``).
        cos, sin: ``[T, Dr // 2]`` (a prefix of :func:`precompute_freqs_cis`).
    """
    dtype = x.dtype
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c = cos[: x.shape[1]].float().view(1, x.shape[1], 1, -1)
    s = sin[: x.shape[1]].float().view(1, x.shape[1], 1, -1)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).to(dtype)


# --------------------------------------------------------------------------------------------
# Attention core
# --------------------------------------------------------------------------------------------

def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                   softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Default attention core: ``F.scaled_dot_product_attention``.

    Args:
        q, k: ``[B, H, T, Dqk]``; v: ``[B, H, T, Dv]`` (``Dqk != Dv`` is fine: MLA has 192/128).
        causal: lower-triangular mask (query t sees keys <= t).
        softmax_scale: multiplies ``q.k`` before softmax (default ``Dqk ** -0.5``).
    Returns:
        ``[B, H, T, Dv]`` in ``q.dtype``.
    """
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale)


# --------------------------------------------------------------------------------------------
# MLA
# --------------------------------------------------------------------------------------------

class MLA(nn.Module):
    """Multi-Head Latent Attention; see the module docstring for the data path.

    Modules: ``wq`` (``q_lora_rank == 0``) or ``wq_a``, ``q_norm``, ``wq_b``; ``wkv_a``,
    ``kv_norm``, ``wkv_b``, ``wo`` (all ``nn.Linear`` without bias, norms ``RMSNorm``).
    Attributes: ``softmax_scale`` (YaRN-adjusted), ``attn_core``, ``attn_core_split``, ``rope_fn`` (swappable).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        from moetrain.model.transformer import RMSNorm  # lazy: transformer imports this module

        self.dim = args.dim
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.qk_head_dim = args.qk_head_dim
        self.v_head_dim = args.v_head_dim
        H = self.n_heads
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(self.dim, H * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(self.dim, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, args.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(self.dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, args.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim),
                               bias=False)
        self.wo = nn.Linear(H * self.v_head_dim, self.dim, bias=False)
        self.softmax_scale = yarn_softmax_scale(args)
        self.attn_core = sdpa_attention
        self.attn_core_split = None
        self.rope_fn = apply_rotary_emb

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Shared projections of the naive and absorbed paths.

        Returns ``q_nope [B,T,H,Dn]``, ``q_pe [B,T,H,Dr]`` (rotated), ``c_kv [B,T,R]``
        (normalised by ``kv_norm``), ``k_pe [B,T,Dr]`` (rotated).
        """
        B, T, _ = x.shape
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, self.n_heads, self.qk_head_dim)
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = self.rope_fn(q_pe, cos, sin)
        c_kv, k_pe = torch.split(self.wkv_a(x), [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = self.rope_fn(k_pe.unsqueeze(2), cos, sin).squeeze(2)
        return q_nope, q_pe, self.kv_norm(c_kv), k_pe

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal self-attention.

        Args:
            x: ``[B, T, D]``.
            cos, sin: ``[>= T, Dr // 2]`` RoPE tables (rows 0..T-1 are used).
        Returns:
            ``[B, T, D]`` in ``x.dtype``.
        """
        B, T, _ = x.shape
        H = self.n_heads
        q_nope, q_pe, c_kv, k_pe = self.project(x, cos[:T], sin[:T])
        kv = self.wkv_b(c_kv).view(B, T, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        if self.attn_core_split is not None:
            o = self.attn_core_split(q_nope.transpose(1, 2), q_pe.transpose(1, 2), k_nope.transpose(1, 2),
                                     k_pe.unsqueeze(1), v.transpose(1, 2), causal=True,
                                     softmax_scale=self.softmax_scale)
        else:
            q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
            k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, H, -1)], dim=-1).transpose(1, 2)
            o = self.attn_core(q, k, v.transpose(1, 2), causal=True, softmax_scale=self.softmax_scale)
        return self.wo(o.transpose(1, 2).reshape(B, T, H * self.v_head_dim))


# --------------------------------------------------------------------------------------------
# Absorbed (latent-cache) path, for inference and as an equivalence check
# --------------------------------------------------------------------------------------------

@dataclass
class LatentKVCache:
    """MLA inference cache: normalised latents ``c_kv [B, S, R]`` and rotated ``k_pe [B, S, Dr]``.

    ``length`` is the number of filled positions. Build with :meth:`empty`.
    """

    c_kv: torch.Tensor
    k_pe: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, attn: MLA, batch: int, max_len: int, dtype=torch.float32, device=None):
        return cls(torch.zeros(batch, max_len, attn.kv_lora_rank, dtype=dtype, device=device),
                   torch.zeros(batch, max_len, attn.qk_rope_head_dim, dtype=dtype, device=device))


def mla_absorbed_attention(attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           cache: Optional[LatentKVCache] = None) -> torch.Tensor:
    """MLA with ``wkv_b`` absorbed (DeepSeek-V2 §2.1.3; V3 ``attn_impl="absorb"``).

    Scores are ``(q_nope W_uk) . c_kv + q_pe . k_pe`` against the latent cache, and the output is
    ``(p . c_kv) W_uv`` projected by ``wo``; mathematically identical to :meth:`MLA.forward`.

    Args:
        attn: the MLA module whose weights are used.
        x: ``[B, T, D]``: the new tokens, at positions ``cache.length ..`` (0 without a cache).
        cos, sin: full RoPE tables (``[>= start + T, Dr // 2]``).
        cache: optional :class:`LatentKVCache`; the new latents are written into it and
            ``cache.length`` advances by ``T``. Without a cache the call is a full causal forward.
    Returns:
        ``[B, T, D]`` in ``x.dtype``.
    Raises:
        ValueError: the cache is too short for the new tokens.
    """
    B, T, _ = x.shape
    H, Dn = attn.n_heads, attn.qk_nope_head_dim
    start = 0 if cache is None else cache.length
    end = start + T
    q_nope, q_pe, c_kv, k_pe = attn.project(x, cos[start:end], sin[start:end])
    if cache is not None:
        if end > cache.c_kv.shape[1]:
            raise ValueError(f"LatentKVCache holds {cache.c_kv.shape[1]} positions, need {end}")
        cache.c_kv[:B, start:end] = c_kv.to(cache.c_kv.dtype)
        cache.k_pe[:B, start:end] = k_pe.to(cache.k_pe.dtype)
        cache.length = end
        c_kv, k_pe = cache.c_kv[:B, :end].to(x.dtype), cache.k_pe[:B, :end].to(x.dtype)
    w = attn.wkv_b.weight.view(H, Dn + attn.v_head_dim, attn.kv_lora_rank)
    q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w[:, :Dn])
    scores = (torch.einsum("bshc,btc->bhst", q_lat, c_kv)
              + torch.einsum("bshr,btr->bhst", q_pe, k_pe)).float() * attn.softmax_scale
    q_pos = torch.arange(start, end, device=x.device).view(T, 1)
    k_pos = torch.arange(end, device=x.device).view(1, end)
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    p = scores.softmax(dim=-1).to(x.dtype)
    o_lat = torch.einsum("bhst,btc->bshc", p, c_kv)
    o = torch.einsum("bshc,hdc->bshd", o_lat, w[:, Dn:])
    return attn.wo(o.flatten(2))
