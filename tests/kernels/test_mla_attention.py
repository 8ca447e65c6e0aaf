"""Tests for kernels/mla_attention.py: forward and dq/dk/dv vs the pure-torch reference.

CPU: kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py before the kernel module is imported) at small odd
shapes with 16 x 16 blocks. GPU (`gpu` marker): DeepSeek sizes, bf16.
"""

import dataclasses
import math

import pytest
import torch


import kernels.mla_attention as mla  # noqa: E402
import kernels._utils as kutils  # noqa: E402
from kernels.mla_attention import (  # noqa: E402
    AttentionConfig,
    mla_attention,
    mla_attention_ref,
    mla_attention_split,
)

# poison_outputs (autouse): every launcher output (o, lse, delta, dq/dk/dv) starts as NaN, so an element the
# kernels fail to write (padded rows, head-dim tails, grads) cannot pass. Nothing in torch is patched.
from tests.kernels.common import DEVICE, poison_outputs  # noqa: E402,F401

# (dtype) -> (atol, rtol) for the output and for gradients, vs the fp32 reference on the same stored inputs.
# bf16: the output/grad is rounded to bf16 (rel 2^-8) and on the GPU P / dS are rounded to bf16 before the
# matmuls (FlashAttention-2 numerics).
TOL = {
    (torch.float32, "out"): (2e-5, 1e-4),
    (torch.float32, "grad"): (5e-5, 1e-4),
    (torch.bfloat16, "out"): (1.5e-2, 1.5e-2),
    (torch.bfloat16, "grad"): (3e-2, 3e-2),
}


def _close(name, got, want, dtype, kind):
    atol, rtol = TOL[(dtype, kind)]
    assert got.dtype == dtype, f"{name}: dtype {got.dtype} != {dtype}"
    assert not torch.isnan(got).any(), f"{name}: NaN in result"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _inputs(B, H, T, dqk, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, dqk, generator=g)
    k = torch.randn(B, H, T, dqk, generator=g)
    v = torch.randn(B, H, T, dv, generator=g)
    do = torch.randn(B, H, T, dv, generator=g)
    return [x.to(DEVICE, dtype) for x in (q, k, v, do)]


def _ref_grads(q, k, v, do, causal, scale):
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    o = mla_attention_ref(qf, kf, vf, causal=causal, softmax_scale=scale)
    o.backward(do.float())
    return o.detach(), qf.grad, kf.grad, vf.grad


def _kernel_grads(q, k, v, do, causal, scale):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = mla_attention(q, k, v, causal=causal, softmax_scale=scale)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


# (B, H, T, Dn + Dr, Dv): T=1, T not a multiple of 16, several blocks, Dv not a power of two
SHAPES = [
    (1, 1, 1, 24, 16),
    (2, 3, 17, 24, 20),
    (1, 2, 50, 40, 16),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_matches_reference(shape, dtype, causal):
    B, H, T, dqk, dv = shape
    q, k, v, do = _inputs(B, H, T, dqk, dv, dtype)
    got = _kernel_grads(q, k, v, do, causal, None)
    want = _ref_grads(q, k, v, do, causal, 1.0 / math.sqrt(dqk))
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _close(name, g, w, dtype, "out" if name == "o" else "grad")


def test_unequal_blocks_and_strided_layout(monkeypatch):
    """Block shapes with BLOCK_M != BLOCK_N in every kernel (ratios of the GPU config), inputs in the model's
    [B, T, H, D] memory layout seen through a transpose, non-default scale."""
    monkeypatch.setattr(mla, "CONFIG_OVERRIDE", AttentionConfig(32, 16, 4, 1, 16, 32, 4, 1, 32, 16, 4, 1, 32))
    B, H, T, dqk, dv = 1, 2, 45, 24, 16
    q, k, v, do = _inputs(B, H, T, dqk, dv, torch.float32, seed=1)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    for causal in (True, False):
        got = _kernel_grads(q, k, v, do, causal, 0.3)
        want = _ref_grads(q, k, v, do, causal, 0.3)
        for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
            _close(f"{name} causal={causal}", g, w, torch.float32, "out" if name == "o" else "grad")
    assert got[0].transpose(1, 2).is_contiguous()  # output follows q's [B, T, H, D] storage


def test_power_of_two_head_dim_without_rope_part():
    B, H, T, dqk, dv = 1, 2, 17, 16, 16
    q, k, v, do = _inputs(B, H, T, dqk, dv, torch.float32, seed=2)
    got = _kernel_grads(q, k, v, do, True, None)
    want = _ref_grads(q, k, v, do, True, 0.25)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _close(name, g, w, torch.float32, "out" if name == "o" else "grad")


@pytest.mark.parametrize("dtype,causal", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32-causal", "fp32-full", "bf16-causal"])
def test_split_shared_k_pe_matches_reference(dtype, causal):
    """q_nope/q_pe/k_nope separate, k_pe [B, 1, T, Dr] shared by all heads; its gradient sums over heads."""
    _check_split_shared_k_pe(dtype, causal, T=33, seed=3)


def _check_split_shared_k_pe(dtype, causal, T, seed):
    """mla_attention_split with k_pe [B, 1, T, Dr] shared by the heads vs the fp32 reference on the concatenated
    q/k: the output and the gradients of q_nope, q_pe, k_nope, k_pe (summed over heads) and v."""
    B, H, dn, dr, dv = 2, 3, 16, 8, 20
    g = torch.Generator().manual_seed(seed)
    qn, qr, kn = (torch.randn(B, H, T, d, generator=g) for d in (dn, dr, dn))
    kr = torch.randn(B, 1, T, dr, generator=g)
    v, do = torch.randn(B, H, T, dv, generator=g), torch.randn(B, H, T, dv, generator=g)
    qn, qr, kn, kr, v, do = (x.to(DEVICE, dtype) for x in (qn, qr, kn, kr, v, do))

    leaves = [x.detach().clone().requires_grad_() for x in (qn, qr, kn, kr, v)]
    o = mla_attention_split(*leaves, causal=causal)
    o.backward(do)

    ref_leaves = [x.detach().float().requires_grad_() for x in (qn, qr, kn, kr, v)]
    rqn, rqr, rkn, rkr, rv = ref_leaves
    o_ref = mla_attention_ref(torch.cat([rqn, rqr], -1), torch.cat([rkn, rkr.expand(-1, H, -1, -1)], -1), rv,
                              causal=causal)
    o_ref.backward(do.float())

    _close("o", o.detach(), o_ref.detach(), dtype, "out")
    for name, a, b in zip(("dq_nope", "dq_pe", "dk_nope", "dk_pe", "dv"), leaves, ref_leaves):
        assert a.grad.shape == b.grad.shape
        _close(name, a.grad, b.grad, dtype, "grad")


# Block configs for the block-multiple tests: the interpreter default (16 everywhere) and one with BLOCK_M != BLOCK_N
# in every kernel, so a length can be a multiple of one block axis and not of the other.
_CFG16 = AttentionConfig(16, 16, 4, 1, 16, 16, 4, 1, 16, 16, 4, 1, 16)
_CFG_UNEQUAL = AttentionConfig(32, 16, 4, 1, 16, 32, 4, 1, 32, 16, 4, 1, 32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T,cfg", [(32, _CFG16), (31, _CFG16), (64, _CFG_UNEQUAL), (48, _CFG_UNEQUAL),
                                   (40, _CFG_UNEQUAL)],
                         ids=["T32-even", "T31-odd", "T64-even", "T48-even16-odd32", "T40-odd"])
def test_block_multiple_and_partial_lengths(T, cfg, causal, monkeypatch):
    """T a multiple of every block (EVEN_M / EVEN_N: unmasked loads and stores, no tail loops), of only the
    16-blocks (T=48 with 32 x 16 blocks) or of none: same result as the reference, every element written."""
    monkeypatch.setattr(mla, "CONFIG_OVERRIDE", cfg)
    B, H, dqk, dv = 1, 2, 24, 16
    q, k, v, do = _inputs(B, H, T, dqk, dv, torch.float32, seed=7)
    got = _kernel_grads(q, k, v, do, causal, None)
    want = _ref_grads(q, k, v, do, causal, 1.0 / math.sqrt(dqk))
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _close(f"{name} T={T}", g, w, torch.float32, "out" if name == "o" else "grad")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("scale", [-0.4, 0.0, 2.0, -8.0])
@pytest.mark.parametrize("T", [32, 27])
def test_softmax_scale_sign(T, scale, causal):
    """The forward folds the scale into the row max (max(c*s) = c*max(s) for c >= 0, c*min(s) for c < 0):
    negative and zero scales stay correct, with and without the masked blocks (at -8 the scaled scores span hundreds:
    a wrong running max would overflow exp2)."""
    q, k, v, do = _inputs(1, 1, T, 24, 16, torch.float32, seed=8)
    got = _kernel_grads(q, k, v, do, causal, scale)
    want = _ref_grads(q, k, v, do, causal, scale)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _close(f"{name} scale={scale}", g, w, torch.float32, "out" if name == "o" else "grad")


# ------------------------------------------------------------------------------------------------ fused backward
def _fused(cfg, monkeypatch=None):
    """``cfg`` with bwd_fused; with ``monkeypatch``, also stubs out the dQ kernel, so a dQ not written by the
    fused kernel stays NaN (poison_outputs) and fails the comparison."""
    if monkeypatch is not None:
        monkeypatch.setattr(mla, "_mla_attn_bwd_dq_kernel", _SkippedKernel())
    return dataclasses.replace(cfg, bwd_fused=True)


def test_fused_backward_is_opt_in(monkeypatch):
    monkeypatch.delenv("MOETRAIN_MLA_BWD_FUSED", raising=False)
    assert not mla.get_config(192, 128).bwd_fused
    assert not mla.get_config(192, 128, interpret=False).bwd_fused
    monkeypatch.setenv("MOETRAIN_MLA_BWD_FUSED", "1")
    assert mla.get_config(192, 128).bwd_fused
    cfg = AttentionConfig(32, 16, 4, 1, 16, 32, 4, 1, 32, 16, 4, 1, 32)
    assert cfg.fused_launch() == (16, 32, 4, 1)  # 0 fields inherit the dK/dV kernel's
    assert dataclasses.replace(cfg, fused_block_m=32, fused_warps=8).fused_launch() == (32, 32, 8, 1)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,cfg", [(32, _CFG16), (31, _CFG16), (48, _CFG_UNEQUAL), (45, _CFG_UNEQUAL)],
                         ids=["T32-even", "T31-odd", "T48-even16-odd32", "T45-odd"])
def test_fused_backward_matches_reference(T, cfg, dtype, causal, monkeypatch):
    """bwd_fused: dK, dV and dQ (fp32 atomics) from one kernel, with the dK/dV blocks (BLOCK_N keys per program
    != BLOCK_M queries per step in _CFG_UNEQUAL); T a multiple of the blocks or not; the [B, T, H, D] layout."""
    monkeypatch.setattr(mla, "CONFIG_OVERRIDE", _fused(cfg, monkeypatch))
    B, H, dqk, dv = 2, 2, 24, 20
    q, k, v, do = _inputs(B, H, T, dqk, dv, dtype, seed=10)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    got = _kernel_grads(q, k, v, do, causal, None)
    want = _ref_grads(q, k, v, do, causal, 1.0 / math.sqrt(dqk))
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _close(f"{name} T={T}", g, w, dtype, "out" if name == "o" else "grad")


def test_fused_backward_own_blocks_and_no_rope_part(monkeypatch):
    """fused_* block fields (BLOCK_M > BLOCK_N), and a power-of-two head dim (no rope part: dQ nope only)."""
    monkeypatch.setattr(mla, "CONFIG_OVERRIDE", dataclasses.replace(_fused(_CFG16, monkeypatch), fused_block_m=32))
    for dqk, T in ((24, 37), (16, 17)):
        q, k, v, do = _inputs(1, 2, T, dqk, 16, torch.float32, seed=11)
        for causal in (True, False):
            got = _kernel_grads(q, k, v, do, causal, 0.3)
            want = _ref_grads(q, k, v, do, causal, 0.3)
            for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
                _close(f"{name} dqk={dqk} causal={causal}", g, w, torch.float32, "out" if name == "o" else "grad")


@pytest.mark.parametrize("dtype,causal", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True),
                                          (torch.bfloat16, False)],
                         ids=["fp32-causal", "fp32-full", "bf16-causal", "bf16-full"])
def test_fused_backward_split_shared_k_pe(dtype, causal, monkeypatch):
    """bwd_fused with separate nope/rope tensors and k_pe [B, 1, T, Dr] shared by the heads: dq_nope, dq_pe
    (atomics) and the head-summed dk_pe."""
    monkeypatch.setattr(mla, "CONFIG_OVERRIDE", _fused(_CFG_UNEQUAL, monkeypatch))
    _check_split_shared_k_pe(dtype, causal, T=41, seed=12)


# ------------------------------------------------------------------------------------------------ loop attributes
# Opt-in tl.range attributes of each kernel's main loop (warp_specialize, num_stages). The interpreter ignores both,
# so these tests check the plumbing (config fields -> kernel constexprs -> the tl.range branch runs) and that the
# variant computes the same numbers as the default.
_CFG_LOOP = dataclasses.replace(_CFG16, fwd_ws=True, kv_ws=True, q_ws=True,
                                fwd_loop_stages=2, kv_loop_stages=3, q_loop_stages=4)


class _SpyKernel:
    """Wraps a Triton kernel: records the WS / LOOP_STAGES constexprs of each launch, then launches it."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.kernel.fn.__name__, kwargs["WS"], kwargs["LOOP_STAGES"]))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_loop_attributes_default_off():
    """Off by default: every kernel gets WS=False, LOOP_STAGES=None (the plain ``range`` loop)."""
    for cfg in (AttentionConfig(), mla.get_config(192, 128, interpret=False), mla.get_config(192, 128)):
        assert (cfg.fwd_ws, cfg.kv_ws, cfg.q_ws) == (False, False, False)
        assert (cfg.fwd_loop_stages, cfg.kv_loop_stages, cfg.q_loop_stages) == (0, 0, 0)
    assert mla._loop_knobs(False, 0, "fwd") == dict(WS=False, LOOP_STAGES=None)
    assert mla._loop_knobs(True, 3, "kv") == dict(WS=True, LOOP_STAGES=3)
    with pytest.raises(ValueError, match="q_loop_stages"):
        mla._loop_knobs(False, -1, "q")


def test_loop_attributes_need_tl_range_warp_specialize(monkeypatch):
    """A Triton whose tl.range lacks warp_specialize: a clear error when a knob is on, the default path unaffected."""
    monkeypatch.setattr(mla, "_TL_RANGE_KWARGS", frozenset())
    assert mla._loop_knobs(False, 0, "fwd") == dict(WS=False, LOOP_STAGES=None)
    with pytest.raises(RuntimeError, match="fwd_ws .*warp_specialize"):
        mla._loop_knobs(True, 0, "fwd")
    monkeypatch.setattr(mla, "CONFIG_OVERRIDE", dataclasses.replace(_CFG16, q_loop_stages=2))
    q, k, v, do = _inputs(1, 1, 20, 24, 16, torch.float32, seed=13)
    with pytest.raises(RuntimeError, match="q_ws / q_loop_stages"):
        _kernel_grads(q, k, v, do, True, None)


@pytest.mark.skipif(not mla._interpreting(), reason="interpreter plumbing test; on a GPU, whether warp "
                    "specialization compiles depends on the Triton version (bench_attention --sweep checks it)")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_loop_attributes_match_default(causal, monkeypatch):
    """fwd_ws / kv_ws / q_ws and *_loop_stages all on, at an odd length (main, diagonal and tail loops): each
    kernel receives its own knobs (the fused kernel none), and output and gradients equal the default config's
    exactly (the interpreter ignores the attributes) and match the reference."""
    B, H, T, dqk, dv = 1, 2, 37, 24, 16
    q, k, v, do = _inputs(B, H, T, dqk, dv, torch.float32, seed=14)
    monkeypatch.setattr(mla, "CONFIG_OVERRIDE", _CFG16)
    want_default = _kernel_grads(q, k, v, do, causal, None)
    calls = []
    for name in ("_mla_attn_fwd_kernel", "_mla_attn_bwd_dkdv_kernel", "_mla_attn_bwd_dq_kernel"):
        monkeypatch.setattr(mla, name, _SpyKernel(getattr(mla, name), calls))
    monkeypatch.setattr(mla, "CONFIG_OVERRIDE", _CFG_LOOP)
    got = _kernel_grads(q, k, v, do, causal, None)
    assert calls == [("_mla_attn_fwd_kernel", True, 2), ("_mla_attn_bwd_dkdv_kernel", True, 3),
                     ("_mla_attn_bwd_dq_kernel", True, 4)]
    want = _ref_grads(q, k, v, do, causal, 1.0 / math.sqrt(dqk))
    for name, g, d, w in zip(("o", "dq", "dk", "dv"), got, want_default, want):
        torch.testing.assert_close(g, d, atol=0, rtol=0, msg=lambda m: f"{name} vs default config: {m}")
        _close(name, g, w, torch.float32, "out" if name == "o" else "grad")
    calls.clear()  # the fused backward ignores kv_ws / kv_loop_stages
    monkeypatch.setattr(mla, "CONFIG_OVERRIDE", dataclasses.replace(_CFG_LOOP, bwd_fused=True))
    got = _kernel_grads(q, k, v, do, causal, None)
    assert calls == [("_mla_attn_fwd_kernel", True, 2), ("_mla_attn_bwd_dkdv_kernel", False, None)]
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _close(f"fused {name}", g, w, torch.float32, "out" if name == "o" else "grad")


# ---------------------------------------------------------------------------------------- TMA forward (fwd_tma)
# Opt-in tensor-descriptor loads in the forward (AttentionConfig.fwd_tma). The interpreter runs descriptor loads
# (zero fill past T and past the head dim), so these check the numbers, the masks on rows past T and the fallback.
class _SpyTMA:
    """Wraps the forward kernel: records whether each launch passes TMA (the default launch passes nothing)."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs.get("TMA", "unset"))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_fwd_tma_default_off(monkeypatch):
    """Off by default, and the default launch does not pass TMA at all (same kernel specialisation as before)."""
    for cfg in (AttentionConfig(), mla.get_config(192, 128, interpret=False), mla.get_config(192, 128)):
        assert cfg.fwd_tma is False
    calls = []
    monkeypatch.setattr(mla, "_mla_attn_fwd_kernel", _SpyTMA(mla._mla_attn_fwd_kernel, calls))
    q, k, v, _ = _inputs(1, 1, 20, 24, 16, torch.float32, seed=20)
    mla_attention(q, k, v)
    assert calls == ["unset"]


@pytest.mark.skipif(not mla._tma_supported(), reason="this Triton lacks tl.make_tensor_descriptor / set_allocator")
@pytest.mark.parametrize("ws", [False, True], ids=["tma", "tma+ws"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_fwd_tma_matches_default(causal, ws, monkeypatch):
    """fwd_tma (and fwd_tma + fwd_ws: one key loop, every block masked) at T=37 (partial query and key blocks,
    rows past T zero-filled by the descriptors), Dr=8 inside a 16-wide block (columns zero-filled): output and
    gradients (which read the forward's LSE) equal the default config's and match the reference."""
    B, H, T, dqk, dv = 1, 2, 37, 24, 16
    q, k, v, do = _inputs(B, H, T, dqk, dv, torch.float32, seed=21)
    monkeypatch.setattr(mla, "CONFIG_OVERRIDE", _CFG16)
    want_default = _kernel_grads(q, k, v, do, causal, None)
    calls = []
    monkeypatch.setattr(mla, "_mla_attn_fwd_kernel", _SpyTMA(mla._mla_attn_fwd_kernel, calls))
    monkeypatch.setattr(mla, "CONFIG_OVERRIDE", dataclasses.replace(_CFG16, fwd_tma=True, fwd_ws=ws))
    got = _kernel_grads(q, k, v, do, causal, None)
    assert calls == [True]
    want = _ref_grads(q, k, v, do, causal, 1.0 / math.sqrt(dqk))
    for name, g, d, w in zip(("o", "dq", "dk", "dv"), got, want_default, want):
        torch.testing.assert_close(g, d, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name} vs default config: {m}")
        _close(name, g, w, torch.float32, "out" if name == "o" else "grad")


@pytest.mark.skipif(not mla._tma_supported(), reason="this Triton lacks tl.make_tensor_descriptor / set_allocator")
def test_fwd_tma_bf16_and_split_shared_k_pe(monkeypatch):
    """bf16 (combined API) and the split API with k_pe [B, 1, T, Dr] shared by the heads (head stride 0: one
    descriptor per (batch, head) on the same rows) through the TMA forward, against the reference."""
    calls = []
    monkeypatch.setattr(mla, "_mla_attn_fwd_kernel", _SpyTMA(mla._mla_attn_fwd_kernel, calls))
    monkeypatch.setattr(mla, "CONFIG_OVERRIDE", dataclasses.replace(_CFG16, fwd_tma=True, fwd_ws=True))
    B, H, T, dqk, dv = 1, 2, 37, 24, 16
    q, k, v, do = _inputs(B, H, T, dqk, dv, torch.bfloat16, seed=22)
    got = _kernel_grads(q, k, v, do, True, None)
    want = _ref_grads(q, k, v, do, True, 1.0 / math.sqrt(dqk))
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _close(name, g, w, torch.bfloat16, "out" if name == "o" else "grad")
    assert calls == [True]
    _check_split_shared_k_pe(torch.float32, True, T=37, seed=23)  # v dim 20 x fp32: 80-byte rows, aligned
    assert calls == [True, True]


def test_fwd_tma_falls_back_on_unaligned_inputs(monkeypatch):
    """Inputs descriptors cannot address (data pointer or a row stride not a multiple of 16 bytes): the pointer
    forward runs (TMA not passed) and the result is still right; _fwd_tma_ok's individual conditions."""
    cfg = dataclasses.replace(_CFG16, fwd_tma=True)
    calls = []
    monkeypatch.setattr(mla, "_mla_attn_fwd_kernel", _SpyTMA(mla._mla_attn_fwd_kernel, calls))
    monkeypatch.setattr(mla, "CONFIG_OVERRIDE", cfg)
    B, H, T, dqk, dv = 1, 2, 37, 24, 16
    q, k, v, do = _inputs(B, H, T, dqk, dv, torch.float32, seed=24)
    buf = torch.zeros(q.numel() + 1, dtype=q.dtype, device=q.device)  # q at a 4-byte offset: unaligned base
    q_off = buf[1:].view_as(q).copy_(q).requires_grad_()  # (_kernel_grads' clone would realign it)
    k_, v_ = (x.detach().clone().requires_grad_() for x in (k, v))
    o = mla_attention(q_off, k_, v_, causal=True)
    o.backward(do)
    got = (o.detach(), q_off.grad, k_.grad, v_.grad)
    want = _ref_grads(q, k, v, do, True, 1.0 / math.sqrt(dqk))
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _close(name, g, w, torch.float32, "out" if name == "o" else "grad")
    assert calls == ["unset"]
    if not mla._tma_supported():
        return
    dims = (16, 8, 16)
    x = torch.zeros(2, 2, 8, 24)
    ok = [(t, False) for t in (x[..., :16], x[..., 16:], x[..., :16], x[..., 16:], x[..., :16])]
    assert mla._fwd_tma_ok(cfg, dims, *ok)
    shared = torch.zeros(2, 1, 8, 8)  # k_pe shared by the heads: stride over heads never used
    assert mla._fwd_tma_ok(cfg, dims, *ok[:3], (shared.expand(2, 2, 8, 8), True), ok[4])
    assert not mla._fwd_tma_ok(cfg, dims, *ok[:4], (torch.zeros(2, 2, 8, 25)[..., :16], False))  # 100-byte rows
    assert not mla._fwd_tma_ok(cfg, dims, *ok[:4], (x.transpose(-1, -2)[..., :16], False))  # last dim strided
    assert not mla._fwd_tma_ok(cfg, (512, 64, 512), *ok)  # a 512-wide block: over the TMA box limit (256)
    bf = torch.zeros(2, 2, 8, 20, dtype=torch.bfloat16)  # bf16 rows of 20: 40 bytes
    assert not mla._fwd_tma_ok(cfg, dims, *ok[:4], (bf, False))
    one = torch.zeros(400).as_strided((1, 1, 8, 16), (3, 5, 24, 1))  # size-1 batch / head: odd strides unused
    assert mla._fwd_tma_ok(cfg, dims, *ok[:4], (one, False))
    monkeypatch.setattr(mla, "_tma_supported", lambda: False)
    assert not mla._fwd_tma_ok(cfg, dims, *ok)


@pytest.mark.skipif(not mla._tma_supported(), reason="this Triton lacks triton.set_allocator")
def test_tma_allocator_set_once_and_never_replaced():
    """_ensure_tma_allocator installs its allocator where none is set (Triton's allocator is a ContextVar: a fresh
    context starts without one) and leaves an allocator set by someone else alone."""
    import contextvars

    import triton
    _allocation = pytest.importorskip("triton.runtime._allocation")
    if not (hasattr(_allocation, "NullAllocator") and hasattr(getattr(_allocation, "_allocator", None), "get")):
        pytest.skip("this Triton keeps its allocator elsewhere (_ensure_tma_allocator then always sets it)")

    def fresh():
        assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
        mla._ensure_tma_allocator()
        assert _allocation._allocator.get() is mla._tma_alloc
        mla._ensure_tma_allocator()
        assert _allocation._allocator.get() is mla._tma_alloc
        buf = mla._tma_alloc(128, 16, None)
        assert buf.numel() == 128 and buf.dtype == torch.int8

    def other():
        def mine(size, alignment, stream):
            return torch.empty(size, dtype=torch.int8)
        triton.set_allocator(mine)
        mla._ensure_tma_allocator()
        assert _allocation._allocator.get() is mine

    contextvars.Context().run(fresh)
    contextvars.Context().run(other)


class _SkippedKernel:
    """Stands in for a Triton kernel: launching it writes nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("skip", ["_mla_attn_fwd_kernel", "_mla_attn_bwd_dkdv_kernel", "_mla_attn_bwd_dq_kernel"])
def test_unwritten_outputs_are_poisoned(skip, monkeypatch):
    """The launchers allocate through kernels._utils (poison_outputs): with a kernel that writes nothing, its
    outputs are NaN -- in the transposed [B, T, H, D] output layout too -- and the test helpers would catch it."""
    assert kutils.POISON_OUTPUTS
    monkeypatch.setattr(mla, skip, _SkippedKernel())
    q, k, v, do = _inputs(1, 2, 20, 24, 16, torch.float32, seed=9)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    o, dq, dk, dv = _kernel_grads(q, k, v, do, True, None)
    assert o.transpose(1, 2).is_contiguous()
    nan = {name: bool(torch.isnan(t).all()) for name, t in (("o", o), ("dq", dq), ("dk", dk), ("dv", dv))}
    expect = {"_mla_attn_fwd_kernel": {"o"}, "_mla_attn_bwd_dkdv_kernel": {"dk", "dv"},
              "_mla_attn_bwd_dq_kernel": {"dq"}}[skip]
    if skip == "_mla_attn_fwd_kernel":  # NaN o and lse propagate into every gradient
        expect = {"o", "dq", "dk", "dv"}
    assert {n for n, is_nan in nan.items() if is_nan} == expect, nan


def test_split_per_head_k_pe_equals_combined():
    B, H, T, dn, dr, dv = 1, 2, 20, 16, 8, 16
    q, k, v, _ = _inputs(B, H, T, dn + dr, dv, torch.float32, seed=4)
    o_split = mla_attention_split(q[..., :dn], q[..., dn:], k[..., :dn], k[..., dn:], v)
    o = mla_attention(q, k, v)
    torch.testing.assert_close(o_split, o, atol=1e-6, rtol=1e-6)


def test_attn_core_signature_and_ref_default_scale():
    q, k, v, _ = _inputs(1, 1, 5, 24, 16, torch.float32, seed=5)
    attn_core = mla_attention
    o = attn_core(q, k, v, causal=True, softmax_scale=1.0 / math.sqrt(24))
    torch.testing.assert_close(o, attn_core(q, k, v), atol=0, rtol=0)
    torch.testing.assert_close(o, mla_attention_ref(q, k, v), **dict(zip(("atol", "rtol"), TOL[(torch.float32, "out")])))
    # causal: the first query sees only the first key
    torch.testing.assert_close(o[:, :, 0], v[:, :, 0], atol=1e-6, rtol=1e-6)


def test_errors():
    q, k, v, _ = _inputs(1, 2, 5, 24, 16, torch.float32)
    with pytest.raises(ValueError, match="rank 4"):
        mla_attention(q[0], k, v)
    with pytest.raises(ValueError, match="same shape"):
        mla_attention(q, k[..., :16], v)
    with pytest.raises(ValueError, match="v must be"):
        mla_attention(q, k, v[:, :1])
    with pytest.raises(ValueError, match="dtype"):
        mla_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="one dtype"):
        mla_attention(q, k, v.bfloat16())
    with pytest.raises(ValueError, match="causal"):
        mla_attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="softmax_scale"):
        mla_attention(q, k, v, softmax_scale=float("nan"))
    with pytest.raises(ValueError, match="k_pe"):
        mla_attention_split(q[..., :16], q[..., 16:], k[..., :16], k[:, :, :, 16:20], v)
    with pytest.raises(ValueError, match="k_nope"):
        mla_attention_split(q[..., :16], q[..., 16:], k[..., :8], k[..., 16:], v)


def test_empty_sequence():
    q, k, v, do = _inputs(1, 2, 0, 24, 16, torch.float32)
    q.requires_grad_()
    o = mla_attention(q, k, v)
    assert o.shape == (1, 2, 0, 16)
    o.backward(do)
    assert q.grad.shape == q.shape


# ------------------------------------------------------------------------------------------------ GPU sizes
GPU_TOL = {"out": (2e-2, 2e-2), "grad": (5e-2, 5e-2)}


def _gpu_check(got, want, kind, name):
    atol, rtol = GPU_TOL[kind]
    assert not torch.isnan(got).any(), name
    # bf16 grads summed over 4096 keys: compare relative to the reference's scale as well
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= atol + rtol * scale, f"{name}: max abs err {err:.3e} vs ref max {scale:.3e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_deepseek_size_bf16(causal):
    B, H, T, dn, dr, dv = 1, 16, 4096, 128, 64, 128
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16) for d in (dn + dr, dn + dr, dv, dv))
    got = _kernel_grads(q, k, v, do, causal, None)
    want = _ref_grads(q, k, v, do, causal, 1.0 / math.sqrt(dn + dr))
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _gpu_check(g, w, "out" if name == "o" else "grad", name)
    # and the fp32 forward against SDPA (math backend) in fp32
    qf, kf, vf = (x.float() for x in (q, k, v))
    o32 = mla_attention(qf, kf, vf, causal=causal)
    o_sdpa = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, is_causal=causal)
    torch.testing.assert_close(o32, o_sdpa, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_split_shared_k_pe_bf16():
    B, H, T, dn, dr, dv = 1, 16, 4096, 128, 64, 128
    torch.manual_seed(1)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    qn, qr, kn, kr, v, do = mk(B, H, T, dn), mk(B, H, T, dr), mk(B, H, T, dn), mk(B, 1, T, dr), mk(B, H, T, dv), mk(B, H, T, dv)
    leaves = [x.clone().requires_grad_() for x in (qn, qr, kn, kr, v)]
    o = mla_attention_split(*leaves)
    o.backward(do)
    ref = [x.float().requires_grad_() for x in (qn, qr, kn, kr, v)]
    o_ref = mla_attention_ref(torch.cat(ref[:2], -1), torch.cat([ref[2], ref[3].expand(-1, H, -1, -1)], -1), ref[4])
    o_ref.backward(do.float())
    _gpu_check(o, o_ref, "out", "o")
    for name, a, b in zip(("dq_nope", "dq_pe", "dk_nope", "dk_pe", "dv"), leaves, ref):
        _gpu_check(a.grad, b.grad, "grad", name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dims,dtype", [((128, 64, 128), torch.float32), ((512, 64, 512), torch.bfloat16),
                                        ((512, 64, 512), torch.float32)], ids=["deepseek-fp32", "absorbed-bf16",
                                                                               "absorbed-fp32"])
def test_gpu_other_dims_and_fp32_fit(dims, dtype):
    """fp32 inputs and the absorbed-MLA head dims (512 + 64, 512) get configs that fit in shared memory."""
    dn, dr, dv = dims
    B, H, T = 1, 2, 777
    torch.manual_seed(2)
    q, k, v, do = (torch.randn(B, H, T, d, device="cuda", dtype=dtype) for d in (dn + dr, dn + dr, dv, dv))
    got = _kernel_grads(q, k, v, do, True, None)
    want = _ref_grads(q, k, v, do, True, 1.0 / math.sqrt(dn + dr))
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _gpu_check(g, w, "out" if name == "o" else "grad", name)


@pytest.mark.parametrize("split", [False, True], ids=["combined", "split"])
def test_torch_compile_fullgraph(split):
    """The kernels are torch.library custom ops: torch.compile traces through the autograd Function without
    a graph break (aot_eager on CPU; Inductor on the GPU in the benchmark)."""
    torch._dynamo.reset()
    B, H, T, dn, dr, dv = 1, 2, 19, 16, 8, 16
    q, k, v, do = _inputs(B, H, T, dn + dr, dv, torch.float32, seed=6)
    k_pe = k[:, :1, :, dn:].contiguous()
    if split:
        def f(q, k, v, k_pe):
            return mla_attention_split(q[..., :dn], q[..., dn:], k[..., :dn], k_pe, v, causal=True) * 2.0
    else:
        def f(q, k, v, k_pe):
            return mla_attention(q, k, v, causal=True, softmax_scale=0.2) * 2.0
    outs = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, k_pe)]
        fn(*leaves).backward(do)
        outs.append([fn(*leaves).detach()] + [x.grad for x in leaves if x.grad is not None])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
