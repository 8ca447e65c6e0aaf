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
