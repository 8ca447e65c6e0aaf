"""MLA vs. an explicit full-attention reference; absorbed path; RoPE / YaRN tables."""
import dataclasses
import math

import pytest
import torch

from moetrain.model import MLA, ModelArgs, LatentKVCache, mla_absorbed_attention, precompute_freqs_cis
from moetrain.model.mla import apply_rotary_emb, sdpa_attention, yarn_softmax_scale


def small_args(**kw):
    base = dict(dim=32, n_heads=3, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=6,
                v_head_dim=10, max_seq_len=16, q_lora_rank=0)
    base.update(kw)
    return ModelArgs(**base)


def build(args, seed=0):
    torch.manual_seed(seed)
    m = MLA(args)
    for p in m.parameters():  # non-trivial norm weights too
        torch.nn.init.normal_(p, std=0.3)
    return m


def ref_rope(x, base, positions):
    """Complex-number RoPE on interleaved pairs, plain (no YaRN). x [B, T, H, Dr]."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * theta[None]
    rot = torch.polar(torch.ones_like(ang), ang)  # [T, d/2]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * rot[None, :, None, :]).flatten(-2).to(x.dtype)


def ref_rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_mla(m: MLA, args, x):
    """Materialise per-head q, k, v and do softmax(q k^T * scale + causal mask) v explicitly."""
    B, T, D = x.shape
    H, dn, dr, dv = args.n_heads, args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
    if args.q_lora_rank == 0:
        q = x @ m.wq.weight.T
    else:
        q = ref_rms(x @ m.wq_a.weight.T, m.q_norm.weight, args.norm_eps) @ m.wq_b.weight.T
    q = q.view(B, T, H, dn + dr)
    pos = torch.arange(T)
    q = torch.cat([q[..., :dn], ref_rope(q[..., dn:], args.rope_theta, pos)], -1)
    kv = x @ m.wkv_a.weight.T
    c, kpe = kv[..., :args.kv_lora_rank], kv[..., args.kv_lora_rank:]
    kpe = ref_rope(kpe[:, :, None, :], args.rope_theta, pos)  # [B, T, 1, dr]
    kvb = (ref_rms(c, m.kv_norm.weight, args.norm_eps) @ m.wkv_b.weight.T).view(B, T, H, dn + dv)
    k = torch.cat([kvb[..., :dn], kpe.expand(B, T, H, dr)], -1)
    v = kvb[..., dn:]
    out = torch.zeros(B, T, H, dv)
    scale = (dn + dr) ** -0.5
    for b in range(B):
        for h in range(H):
            s = (q[b, :, h] @ k[b, :, h].T) * scale
            s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            out[b, :, h] = s.softmax(-1) @ v[b, :, h]
    return out.reshape(B, T, H * dv) @ m.wo.weight.T


@pytest.mark.parametrize("q_lora_rank", [0, 7])
def test_mla_matches_reference(q_lora_rank):
    args = small_args(q_lora_rank=q_lora_rank)
    m = build(args)
    assert hasattr(m, "wq") == (q_lora_rank == 0) and hasattr(m, "wq_b") == (q_lora_rank > 0)
    x = torch.randn(2, 9, args.dim)
    cos, sin = precompute_freqs_cis(args)
    torch.testing.assert_close(m(x, cos, sin), ref_mla(m, args, x), atol=2e-5, rtol=1e-4)


def test_mla_gradients_reach_every_parameter():
    args = small_args(q_lora_rank=5)
    m = build(args)
    x = torch.randn(2, 7, args.dim, requires_grad=True)
    cos, sin = precompute_freqs_cis(args)
    m(x, cos, sin).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("q_lora_rank", [0, 5])
def test_absorbed_equals_naive(q_lora_rank):
    args = small_args(q_lora_rank=q_lora_rank, max_seq_len=64, original_seq_len=16, rope_factor=4.0)
    m = build(args, seed=1)
    x = torch.randn(2, 11, args.dim)
    cos, sin = precompute_freqs_cis(args)
    ref = m(x, cos, sin)
    torch.testing.assert_close(mla_absorbed_attention(m, x, cos, sin), ref, atol=2e-5, rtol=1e-4)
    # incremental decoding against the latent cache: prefill 6, then one token at a time
    cache = LatentKVCache.empty(m, batch=2, max_len=16)
    outs = [mla_absorbed_attention(m, x[:, :6], cos, sin, cache)]
    for t in range(6, 11):
        outs.append(mla_absorbed_attention(m, x[:, t:t + 1], cos, sin, cache))
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError):
        mla_absorbed_attention(m, torch.randn(2, 6, args.dim), cos, sin, cache)


def test_attn_core_is_swappable():
    args = small_args()
    m = build(args)
    calls = []

    def core(q, k, v, causal=True, softmax_scale=None):
        calls.append((q.shape, k.shape, v.shape, causal, softmax_scale))
        return torch.zeros(*q.shape[:-1], v.shape[-1])

    m.attn_core = core
    cos, sin = precompute_freqs_cis(args)
    out = m(torch.randn(1, 5, args.dim), cos, sin)
    assert calls == [((1, 3, 5, 14), (1, 3, 5, 14), (1, 3, 5, 10), True, m.softmax_scale)]
    assert out.abs().sum() == 0


def test_attn_core_split_gets_the_unconcatenated_parts():
    """With ``attn_core_split`` set, MLA hands it q/k's nope and rope parts and the shared k_pe [B, 1, T, Dr];
    a split core that concatenates them itself gives the default forward's output and gradients."""
    args = small_args()
    m = build(args)
    cos, sin = precompute_freqs_cis(args)
    x = torch.randn(2, 7, args.dim, requires_grad=True)
    ref = m(x, cos, sin)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *m.parameters()])
    seen = []

    def split_core(qn, qr, kn, kr, v, causal=True, softmax_scale=None):
        seen.append((qn.shape, qr.shape, kn.shape, kr.shape, v.shape, causal, softmax_scale))
        H = qn.shape[1]
        return sdpa_attention(torch.cat([qn, qr], -1), torch.cat([kn, kr.expand(-1, H, -1, -1)], -1), v,
                              causal=causal, softmax_scale=softmax_scale)

    m.attn_core_split = split_core
    out = m(x, cos, sin)
    grads = torch.autograd.grad(out.square().sum(), [x, *m.parameters()])
    dn, dr, dv = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
    assert seen == [((2, 3, 7, dn), (2, 3, 7, dr), (2, 3, 7, dn), (2, 1, 7, dr), (2, 3, 7, dv), True, m.softmax_scale)]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def v3_reference_freqs(a):
    """DeepSeek-V3 inference/model.py precompute_freqs_cis, verbatim in spirit (complex)."""
    dim, base, factor = a.qk_rope_head_dim, a.rope_theta, a.rope_factor

    def corr_dim(n_rot):
        return dim * math.log(a.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if a.max_seq_len > a.original_seq_len:
        low = max(math.floor(corr_dim(a.beta_fast)), 0)
        high = min(math.ceil(corr_dim(a.beta_slow)), dim - 1)
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    ang = torch.outer(torch.arange(a.max_seq_len, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(ang), ang)


def test_yarn_tables():
    plain = ModelArgs(qk_rope_head_dim=64, max_seq_len=512, original_seq_len=128, rope_factor=1.0)
    cos, sin = precompute_freqs_cis(plain)
    assert cos.shape == (512, 32) and cos.dtype == torch.float32
    ang = torch.outer(torch.arange(512.0), 10000.0 ** (-torch.arange(0, 64, 2.0) / 64))
    torch.testing.assert_close(cos, ang.cos(), atol=1e-4, rtol=0)  # factor 1 = plain RoPE
    torch.testing.assert_close(sin, ang.sin(), atol=1e-4, rtol=0)
    # factor > 1 but max_seq_len <= original_seq_len: YaRN inactive
    short = dataclasses.replace(plain, rope_factor=40.0, max_seq_len=128)
    torch.testing.assert_close(precompute_freqs_cis(short)[0], cos[:128])
    assert yarn_softmax_scale(short) == pytest.approx(short.qk_head_dim ** -0.5)
    # beyond original_seq_len: low-frequency dims interpolated, high-frequency dims kept
    long = dataclasses.replace(plain, rope_factor=40.0)
    cy, sy = precompute_freqs_cis(long)
    assert not torch.allclose(cy, cos, atol=1e-3)
    torch.testing.assert_close(cy[:, 0], cos[:, 0])
    ref = v3_reference_freqs(long)
    torch.testing.assert_close(cy, ref.real, atol=1e-4, rtol=0)
    torch.testing.assert_close(sy, ref.imag, atol=1e-4, rtol=0)
    m = 0.1 * 1.0 * math.log(40.0) + 1
    assert yarn_softmax_scale(long) == pytest.approx(long.qk_head_dim ** -0.5 * m * m)


def test_rope_is_rotation_and_relative():
    args = ModelArgs(qk_rope_head_dim=8, max_seq_len=32)
    cos, sin = precompute_freqs_cis(args)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    def at(x, p):
        return apply_rotary_emb(x, cos[p:p + 1], sin[p:p + 1])
    torch.testing.assert_close(at(q, 5).norm(), q.norm())
    torch.testing.assert_close((at(q, 9) * at(k, 4)).sum(), (at(q, 15) * at(k, 10)).sum(),
                               atol=1e-5, rtol=1e-5)
    xb = torch.randn(2, 4, 3, 8, dtype=torch.bfloat16)
    assert apply_rotary_emb(xb, cos, sin).dtype == torch.bfloat16
