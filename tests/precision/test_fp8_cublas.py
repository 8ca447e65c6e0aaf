"""moetrain/precision/fp8_cublas.py: the scale layouts handed to cuBLAS's block-scaled GEMMs, the one-time check
that picks a call form, the fallback to the Triton GEMMs, and (GPU) the real cuBLAS path against the reference.

On CPU the cuBLAS contract is stood in for by ``_contract_mm``: it accepts only the operand and scale layouts the
cuBLAS documentation prescribes (A row-major, B column-major, scale_a [M, Kb] stride (1, M), 128x128 scale_b
[L4, N/128] stride (1, L4), 1x128 scale_b [N, Kb] stride (1, N)) and computes the block-scaled product in fp32.
"""
import os

import pytest
import torch

os.environ.setdefault("MOETRAIN_FP8_AUTOTUNE", "0")

from kernels import fp8_gemm, fp8_quant  # noqa: E402
from moetrain.precision import fp8_cublas  # noqa: E402
from moetrain.precision.fp8 import Fp8Config, fp8_linear, resolve_backend  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# the contract and fallback tests run the Triton kernels on CPU tensors: only under the interpreter (not on a GPU host)
interpreted = pytest.mark.skipif(not fp8_quant.INTERPRETED, reason="CPU tests: need TRITON_INTERPRET=1 (the CPU suite)")


def _contract_mm(a, b, sa, sb, out_dtype, recipe_b, out=None):
    """C = A @ B with cuBLAS's block-scale layouts checked (ValueError otherwise), fp32 math; written into ``out``
    (which must be contiguous, as ``torch._scaled_mm``'s is) when given."""
    M, K = a.shape
    N = b.shape[1]
    kb = -(-K // 128)
    l4 = -(-kb // 4) * 4
    if a.stride(1) != 1 or b.stride(0) != 1:
        raise ValueError("A must be row-major and B column-major")
    if tuple(sa.shape) != (M, kb) or sa.stride(0) != 1:
        raise ValueError(f"scale_a must be [M, Kb] with stride (1, M), got {tuple(sa.shape)} {sa.stride()}")
    af = a.float() * sa.repeat_interleave(128, 1)[:, :K]
    if recipe_b == "128x128":
        nb = -(-N // 128)
        if tuple(sb.shape) != (l4, nb) or sb.stride() != (1, l4):
            raise ValueError(f"scale_b must be [L4, N/128] stride (1, L4), got {tuple(sb.shape)} {sb.stride()}")
        full = sb[:kb].repeat_interleave(128, 0)[:K].repeat_interleave(128, 1)[:, :N]
    else:
        if tuple(sb.shape) != (N, kb) or sb.stride(0) != 1:
            raise ValueError(f"scale_b must be [N, Kb] stride (1, N), got {tuple(sb.shape)} {sb.stride()}")
        full = sb.t().repeat_interleave(128, 0)[:K]
    y = (af @ (b.float() * full)).to(out_dtype)
    if out is None:
        return y
    if not out.is_contiguous() or tuple(out.shape) != (M, N) or out.dtype != out_dtype:
        raise ValueError(f"out must be a contiguous [{M}, {N}] {out_dtype}, got {tuple(out.shape)} {out.stride()}")
    return out.copy_(y)


def _lax_mm(a, b, sa, sb, out_dtype, recipe_b, out=None):
    """Takes the unpadded 128x128 layout but reads it as if padded (what a layout mix-up would compute)."""
    if recipe_b == "128x128":
        kb, nb = sb.shape
        l4 = -(-kb // 4) * 4
        flat = sb.t().contiguous().reshape(-1)           # memory as stride (1, kb) holds it
        wrong = torch.zeros(nb * l4, dtype=sb.dtype)
        wrong[:flat.numel()] = flat
        sb = wrong.view(nb, l4).t()                     # read with row pitch L4: blocks shifted
    return _contract_mm(a, b, sa, sb, out_dtype, recipe_b, out)


def test_scale_layouts():
    s = torch.arange(15, dtype=torch.float32).view(3, 5)   # 3 output blocks x 5 K-blocks
    b = fp8_cublas.scale_b_block_layout(s)
    assert tuple(b.shape) == (8, 3) and b.stride() == (1, 8)
    assert torch.equal(b[:5], s.t()) and torch.equal(b[5:], torch.zeros(3, 3))
    u = fp8_cublas.scale_b_block_layout(s, pad=False)
    assert tuple(u.shape) == (5, 3) and u.stride() == (1, 5) and torch.equal(u, s.t())
    a = fp8_cublas.scale_a_layout(s)
    assert a.stride() == (1, 3) and torch.equal(a, s)
    assert fp8_cublas.scale_a_layout(a).data_ptr() == a.data_ptr()   # already in the layout: no copy
    t = fp8_cublas.scale_b_block_layout(s.t())                         # W^T's blocks (the dgrad), non-contiguous
    assert tuple(t.shape) == (4, 5) and t.stride() == (1, 4)
    assert torch.equal(t[:3], s) and torch.equal(t[3:], torch.zeros(1, 5))


def _whole_blocks_mm(a, b, sa, sb, out_dtype, recipe_b, out=None):
    """The contract, refusing dims that are not multiples of 128 (a cuBLAS without partial blocks)."""
    if any(d % 128 for d in (*a.shape, b.shape[1])):
        raise ValueError("dims must be multiples of 128")
    return _contract_mm(a, b, sa, sb, out_dtype, recipe_b, out)


def _ignores_out_mm(a, b, sa, sb, out_dtype, recipe_b, out=None):
    """The contract, but a given ``out`` is left unwritten (a build whose out= overload did not take effect)."""
    return _contract_mm(a, b, sa, sb, out_dtype, recipe_b)


@interpreted
def test_check_forms_rejects_a_form_that_ignores_out():
    none, _, why = fp8_cublas.check_forms((("no-out", _ignores_out_mm, True),), torch.device("cpu"))
    assert none is None and "forward (out=) did not write into the given tensor" in why, why


@interpreted
def test_check_forms_picks_the_documented_layout_and_rejects_others():
    forms = (("lax", _lax_mm, False), ("contract", _contract_mm, False), ("contract", _contract_mm, True))
    form, ragged, detail = fp8_cublas.check_forms(forms, torch.device("cpu"))
    assert form == forms[2] and ragged, detail
    assert detail.startswith("contract (scale_b padded)") and "multiples of 16 only" in detail, detail
    form, ragged, detail = fp8_cublas.check_forms((("whole", _whole_blocks_mm, True),), torch.device("cpu"))
    assert form is not None and not ragged
    assert "dims multiples of 128 only (partial blocks: ValueError: dims must be multiples of 128)" in detail
    none, ragged, why = fp8_cublas.check_forms(forms[:2], torch.device("cpu"))
    assert none is None and not ragged
    assert "lax (scale_b unpadded): ValueError: forward differs" in why
    assert "contract (scale_b unpadded): ValueError: scale_b must be [L4" in why


@interpreted
@pytest.mark.parametrize("M,N,K", [(256, 384, 640), (128, 256, 128), (208, 336, 592)])
def test_three_gemms_through_the_contract(M, N, K):
    """Forward, dgrad and wgrad with the documented layouts equal the dequantised references."""
    form = ("contract", _contract_mm, True)
    torch.manual_seed(0)
    x, w, g = torch.randn(M, K), torch.randn(N, K) * 0.05, torch.randn(M, N)
    xq, xs, xtq, xts = fp8_quant.quant_1x128_with_transpose(x)
    wq, ws = fp8_quant.quant_128x128(w)
    gq, gs, gtq, gts = fp8_quant.quant_1x128_with_transpose(g)
    pairs = ((fp8_cublas._fwd(xq, xs, wq, ws, torch.float32, form), fp8_gemm.fp8_gemm_blockwise_ref(
              xq, xs, wq, ws, torch.float32)),
             (fp8_cublas._dgrad(gq, gs, wq, ws, torch.float32, form), fp8_gemm.fp8_gemm_dgrad_ref(
              gq, gs, wq, ws, torch.float32)),
             (fp8_cublas._wgrad(gtq, gts, xtq, xts, torch.float32, form), fp8_gemm.fp8_gemm_1x128_1x128_ref(
              gtq, gts, xtq, xts)))
    # the training path: col-major 1x128 scales from the quantisers, and the dgrad as the forward GEMM on the
    # transposed weight bytes with the transposed scales (fp8._BlockwiseLinearFn)
    _, _, wtq = fp8_quant.quant_128x128(w, with_transpose=True)
    gq2, gs2, gtq2, gts2 = fp8_quant.quant_1x128_with_transpose(g, col_major_scales=True)
    xtq2, xts2 = fp8_quant.quant_1x128(x.t(), col_major_scales=True)
    pairs += ((fp8_cublas._fwd(gq2, gs2, wtq, ws.t(), torch.float32, form), pairs[1][1]),
              (fp8_cublas._wgrad(gtq2, gts2, xtq2, xts2, torch.float32, form), pairs[2][1]))
    for got, ref in pairs:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@interpreted
def test_cpu_falls_back_to_triton():
    ok, detail = fp8_cublas.status(torch.device("cpu"))
    assert not ok and "CUDA" in detail
    torch.manual_seed(1)
    x, w = torch.randn(130, 256), torch.randn(200, 256)
    xq, xs = fp8_quant.quant_1x128(x)
    wq, ws = fp8_quant.quant_128x128(w)
    got = fp8_cublas.fp8_gemm_blockwise(xq, xs, wq, ws, torch.float32)
    torch.testing.assert_close(got, fp8_gemm.fp8_gemm_blockwise(xq, xs, wq, ws, torch.float32))
    assert resolve_backend(Fp8Config("blockwise"), torch.device("cpu")) == "triton"


@interpreted
def test_explicit_scaled_mm_backend_on_cpu_runs_the_triton_gemms():
    """backend="scaled_mm" for blockwise is accepted; where cuBLAS is not usable its GEMMs fall back."""
    torch.manual_seed(2)
    x = torch.randn(3, 50, 256, requires_grad=True)
    w = (torch.randn(128, 256) * 0.05).requires_grad_()
    outs = []
    for backend in ("scaled_mm", "triton"):
        y = fp8_linear(x, w, None, Fp8Config("blockwise", backend=backend))
        outs.append((y, *torch.autograd.grad(y.square().sum(), (x, w))))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@gpu
def test_gpu_cublas_blockwise_matches_reference():
    """On an H200 the check passes and the three GEMMs equal the dequantised reference at a DeepSeek-like
    shape (M=4096 tokens); fp8_linear on the auto backend equals the emulation, forward and gradients."""
    dev = torch.device("cuda")
    ok, detail = fp8_cublas.status(dev)
    if torch.cuda.get_device_capability(dev) != (9, 0):
        pytest.skip(detail)
    assert ok, detail
    torch.manual_seed(3)
    M, N, K = 4096, 1536, 2048
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(N, K, device=dev) * 0.02).to(torch.bfloat16)
    g = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    xq, xs, xtq, xts = fp8_quant.quant_1x128_with_transpose(x)
    wq, ws = fp8_quant.quant_128x128(w)
    gq, gs, gtq, gts = fp8_quant.quant_1x128_with_transpose(g)
    pairs = ((fp8_cublas.fp8_gemm_blockwise(xq, xs, wq, ws, torch.bfloat16),
              fp8_gemm.fp8_gemm_blockwise_ref(xq, xs, wq, ws, torch.float32)),
             (fp8_cublas.fp8_gemm_dgrad(gq, gs, wq, ws, torch.bfloat16),
              fp8_gemm.fp8_gemm_dgrad_ref(gq, gs, wq, ws, torch.float32)),
             (fp8_cublas.fp8_gemm_1x128_1x128(gtq, gts, xtq, xts),
              fp8_gemm.fp8_gemm_1x128_1x128_ref(gtq, gts, xtq, xts)))
    for got, ref in pairs:
        err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-2, err
    # dims that are multiples of 16 only: cuBLAS where its check at partial blocks passed, else Triton; either way exact
    xr_, wr_ = x[:208, :592].contiguous(), w[:336, :592].contiguous()
    a, sa = fp8_quant.quant_1x128(xr_)
    b, sb = fp8_quant.quant_128x128(wr_)
    got, ref = fp8_cublas.fp8_gemm_blockwise(a, sa, b, sb, torch.bfloat16), fp8_gemm.fp8_gemm_blockwise_ref(
        a, sa, b, sb, torch.float32)
    assert ((got.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2, detail
    assert resolve_backend(Fp8Config("blockwise"), dev) == "scaled_mm"
    xr = x.view(2, 2048, K).requires_grad_()
    wr = w.clone().requires_grad_()
    res = []
    for cfg in (Fp8Config("blockwise"), Fp8Config("blockwise", backend="emulate")):
        y = fp8_linear(xr, wr, None, cfg)
        res.append((y, *torch.autograd.grad(y, (xr, wr), g.view(2, 2048, N))))
    for a, b in zip(*res):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2


@interpreted
def test_describe_backend_on_cpu():
    from moetrain.precision.fp8 import describe_backend
    cpu = torch.device("cpu")
    assert describe_backend(Fp8Config("blockwise"), cpu) == "Triton block-scaled GEMMs"  # the interpreter here
    assert describe_backend(Fp8Config("rowwise"), cpu).startswith("emulated")
    assert describe_backend(Fp8Config("blockwise", backend="emulate"), cpu).startswith("emulated")


def test_scaled_mm_form_writes_through_the_out_overload(monkeypatch):
    """The torch.nn.functional.scaled_mm form writes a given ``out`` through torch._scaled_mm_v2's out= overload
    (no copy); where that overload fails it computes and copies, and remembers not to try again."""
    import torch.nn.functional as F
    calls = []

    def v2_out(a, b, sa, ra, swa, sb, rb, swb, bias, out_dtype, cdim, fast, *, out):
        calls.append((ra, rb, out_dtype))
        return out.fill_(1.0)
    monkeypatch.setattr(fp8_cublas, "_V2_OUT", {})
    monkeypatch.setattr(torch, "_scaled_mm_v2", v2_out)
    out = torch.zeros(2, 3)
    args = (torch.zeros(2, 4), torch.zeros(4, 3), torch.ones(2, 1), torch.ones(1, 1))
    assert fp8_cublas._v2(*args, torch.float32, "128x128", out=out) is out and (out == 1).all()
    assert calls == [([F.ScalingType.BlockWise1x128.value], [F.ScalingType.BlockWise128x128.value], torch.float32)]

    def missing(*a, **k):
        raise TypeError("no out= overload")
    monkeypatch.setattr(torch, "_scaled_mm_v2", missing)
    monkeypatch.setattr(F, "scaled_mm", lambda *a, **k: torch.full((2, 3), 2.0))
    for _ in range(2):
        assert fp8_cublas._v2(*args, torch.float32, "1x128", out=out) is out and (out == 2).all()
    assert fp8_cublas._V2_OUT == {"ok": False, "why": "TypeError: no out= overload"}
