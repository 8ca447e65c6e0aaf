"""kernels/fp8_gemm.py: block-scaled FP8 GEMMs vs their dequantise-and-matmul references.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton and
kernels/ are imported) at small odd shapes; with CUDA the same tests run compiled, plus `gpu`-marked real sizes.

Tolerances: kernel vs reference differ only by fp32 accumulation order (and the per-128-K promotion order):
fp32 outputs within 1e-5 relative to the output's max; bf16 outputs within one bf16 step of the fp32
reference. FP8 vs the exact fp32 product of the unquantised inputs: relative Frobenius error < 5e-2.
"""
import os

import pytest
import torch

os.environ.setdefault("MOETRAIN_FP8_AUTOTUNE", "0")  # GPU: one fixed tile config (no per-shape tuning runs)

from kernels import fp8_gemm as fg  # noqa: E402
from kernels.fp8_gemm import (  # noqa: E402
    fp8_gemm_1x128_1x128, fp8_gemm_1x128_1x128_ref, fp8_gemm_blockwise, fp8_gemm_blockwise_ref, fp8_gemm_dgrad,
    fp8_gemm_dgrad_ref, fp8_gemm_grouped, fp8_gemm_grouped_ref, fp8_gemm_grouped_wgrad, fp8_gemm_grouped_wgrad_ref,
)
from kernels.fp8_quant import (  # noqa: E402
    grouped_tiles, quant_128x128, quant_1x128, quant_1x128_with_transpose, quant_1x128_with_transpose_grouped,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not fg.INTERPRETED,
                                reason="kernels.fp8_gemm was imported without TRITON_INTERPRET=1")

SHAPES = [(33, 130, 257), (1, 1, 1), (64, 128, 128), (7, 200, 100)]


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# accumulation slack relative to the output's max: the interpreter sums in fp32; on sm90 the fp8 WGMMA keeps
# fewer accumulator bits inside each 128-K tile (the reason for the per-tile promotion, DeepSeek-V3 §3.3.2)
ACC_SLACK = 1e-5 if DEVICE == "cpu" else 2e-3


def _close_to_ref(c, r, out_dtype):
    r = r.float()
    if out_dtype == torch.float32:
        torch.testing.assert_close(c.float(), r, rtol=0, atol=ACC_SLACK * max(r.abs().max().item(), 1e-30))
    else:  # within one bf16 step of the fp32 reference (plus accumulation slack)
        bound = r.abs() * 2.0 ** -7 + ACC_SLACK * r.abs().max()
        assert ((c.float() - r).abs() <= bound).all()


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_blockwise_matches_ref(M, N, K, out_dtype):
    x, w = _rand(M, K, seed=1), _rand(N, K, seed=2, scale=0.05)
    xq, xs = quant_1x128(x)
    wq, ws = quant_128x128(w)
    c = fp8_gemm_blockwise(xq, xs, wq, ws, out_dtype=out_dtype)
    assert c.shape == (M, N) and c.dtype == out_dtype
    _close_to_ref(c, fp8_gemm_blockwise_ref(xq, xs, wq, ws, out_dtype=torch.float32), out_dtype)
    if M * N > 100:
        assert _rel(c, x @ w.t()) < 5e-2


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_1x128_1x128_matches_ref(M, N, K):
    """The wgrad form: dW[N, K] = G^T X with G^T [N, T], X^T [K, T] both quantised 1x128 along T."""
    T = M
    g, x = _rand(T, N, seed=3), _rand(T, K, seed=4)
    _, _, gtq, gts = quant_1x128_with_transpose(g)
    _, _, xtq, xts = quant_1x128_with_transpose(x)
    dw = fp8_gemm_1x128_1x128(gtq, gts, xtq, xts)
    assert dw.shape == (N, K) and dw.dtype == torch.float32
    _close_to_ref(dw, fp8_gemm_1x128_1x128_ref(gtq, gts, xtq, xts), torch.float32)
    if T * N * K > 1000:
        assert _rel(dw, g.t() @ x) < 5e-2


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_dgrad_matches_ref(M, N, K):
    """dX[M, K] = G[M, N] W[N, K], reusing W's 128x128 quantisation transposed."""
    g, w = _rand(M, N, seed=5), _rand(N, K, seed=6, scale=0.05)
    gq, gs = quant_1x128(g)
    wq, ws = quant_128x128(w)
    dx = fp8_gemm_dgrad(gq, gs, wq, ws, out_dtype=torch.float32)
    assert dx.shape == (M, K)
    _close_to_ref(dx, fp8_gemm_dgrad_ref(gq, gs, wq, ws, out_dtype=torch.float32), torch.float32)
    # same as requantising W^T from scratch
    wtq, wts = quant_128x128(w.t())
    _close_to_ref(dx, fp8_gemm_blockwise_ref(gq, gs, wtq, wts, out_dtype=torch.float32), torch.float32)
    if M * N > 100:
        assert _rel(dx, g @ w) < 5e-2


def test_strided_operands_and_block_n():
    x, w = _rand(40, 300, seed=7), _rand(260, 300, seed=8)
    xq, xs = quant_1x128(x)
    wq, ws = quant_128x128(w)
    ref = fp8_gemm_blockwise_ref(xq, xs, wq, ws, out_dtype=torch.float32)
    # b given as a transposed view of a [K, N] tensor (non-K-contiguous)
    wq_view = wq.t().contiguous().t()
    c = fp8_gemm_blockwise(xq, xs, wq_view, ws, out_dtype=torch.float32)
    _close_to_ref(c, ref, torch.float32)
    for cfg in ({"BLOCK_M": 16, "BLOCK_N": 32}, {"BLOCK_M": 32, "BLOCK_N": 128}):
        c = fp8_gemm_blockwise(xq, xs, wq, ws, out_dtype=torch.float32, config=cfg)
        _close_to_ref(c, ref, torch.float32)
    for bad in ({"BLOCK_N": 96}, {"BLOCK_N": 512}, {"BLOCK_M": 8}):
        with pytest.raises(ValueError, match="BLOCK_"):
            fp8_gemm_blockwise(xq, xs, wq, ws, config=bad)
    with pytest.raises(ValueError, match="unknown config keys"):
        fp8_gemm_blockwise(xq, xs, wq, ws, config={"BLOCK_K": 64})


class _LaunchSpy:
    """Stands in for a jitted kernel: records each launch's keyword (constexpr) arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("K", [384, 200])  # 384: EVEN_K (no K mask); 200: one full K tile + a masked tail
@pytest.mark.parametrize("bm,bn", [(64, 256), (128, 256), (256, 128), (32, 64)])
def test_block_sizes_odd_shapes(K, bm, bn, monkeypatch):
    """BLOCK_N = 256 spans two 128x128 b-scale blocks (the second absent in the last partial N tile: N = 300);
    rows past M / N are clamped (unmasked loads), only the store is masked."""
    M, N = 130, 300
    x, w = _rand(M, K, seed=21), _rand(N, K, seed=22, scale=0.05)
    w[:128] *= 50.0  # b-scale blocks differ by 50x: a block read for the wrong columns shows up
    xq, xs = quant_1x128(x)
    wq, ws = quant_128x128(w)
    spy = _LaunchSpy(fg._fp8_gemm_kernel)
    monkeypatch.setattr(fg, "_fp8_gemm_kernel", spy)
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4}
    c = fp8_gemm_blockwise(xq, xs, wq, ws, out_dtype=torch.float32, config=cfg)
    _close_to_ref(c, fp8_gemm_blockwise_ref(xq, xs, wq, ws, out_dtype=torch.float32), torch.float32)
    assert spy.calls[-1]["EVEN_K"] is (K % 128 == 0)
    assert spy.calls[-1]["BLOCK_N"] == bn and spy.calls[-1]["BLOCK_M"] == bm
    # bf16 output and the per-row (wgrad) b scales with the same tile
    cb = fp8_gemm_blockwise(xq, xs, wq, ws, config=cfg)
    _close_to_ref(cb, fp8_gemm_blockwise_ref(xq, xs, wq, ws, out_dtype=torch.float32), torch.bfloat16)
    _, _, xtq, xts = quant_1x128_with_transpose(x.t().contiguous())
    _, _, wtq, wts = quant_1x128_with_transpose(w.t().contiguous())
    d = fp8_gemm_1x128_1x128(xtq, xts, wtq, wts, config=cfg)
    _close_to_ref(d, fp8_gemm_1x128_1x128_ref(xtq, xts, wtq, wts), torch.float32)


def test_block_n_256_dgrad_and_small_n():
    """dgrad with BLOCK_N = 256 over N = 130 (one tile, both blocks present) and N = 70 (one block only)."""
    for N in (130, 70):
        g, w = _rand(9, 256, seed=23), _rand(256, N, seed=24, scale=0.05)
        gq, gs = quant_1x128(g)
        wq, ws = quant_128x128(w)
        dx = fp8_gemm_dgrad(gq, gs, wq, ws, out_dtype=torch.float32, config={"BLOCK_M": 16, "BLOCK_N": 256})
        _close_to_ref(dx, fp8_gemm_dgrad_ref(gq, gs, wq, ws, out_dtype=torch.float32), torch.float32)


def test_autotune_prune():
    cfgs = fg._gpu_configs()
    assert len(cfgs) >= 10 and all(c.kwargs["GROUP_M"] == 8 for c in cfgs)
    big = fg._prune_dense(cfgs, {"M": 4096, "N": 7168, "K": 16384})
    assert any(c.kwargs["BLOCK_N"] == 256 for c in big) and any(c.kwargs["BLOCK_M"] == 256 for c in big)
    assert all(c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * 128 <= fg._SMEM_BYTES for c in big)
    small = fg._prune_dense(cfgs, {"M": 20, "N": 100, "K": 256})
    assert small and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 128 for c in small)
    assert fg._prune_dense([c for c in cfgs if c.kwargs["BLOCK_N"] == 256], {"M": 1, "N": 1, "K": 1})  # never empty
    g = fg._prune_grouped(fg._grouped_gpu_configs(), {"N": 2048, "K": 7168})
    assert g and all(128 % c.kwargs["BLOCK_M"] == 0 for c in g)
    assert fg._prune_wgrad(fg._wgrad_gpu_configs(), {"N": 2048, "K": 7168})


def test_promotion_per_k_tile_uses_each_tiles_scale():
    """Two K tiles with very different scales: each partial product gets its own (a, b) scale pair."""
    M, N, K = 4, 3, 256
    x = torch.ones(M, K)
    x[:, 128:] = 1000.0
    w = torch.ones(N, K)
    w[:, :128] = 1e-3
    x, w = x.to(DEVICE), w.to(DEVICE)
    xq, xs = quant_1x128(x)
    wq, ws = quant_128x128(w)
    c = fp8_gemm_blockwise(xq, xs, wq, ws, out_dtype=torch.float32)
    torch.testing.assert_close(c, x @ w.t(), rtol=1e-3, atol=0)  # 128*1e-3 + 128*1000


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on inf * 0
def test_nan_scale_propagates():
    x, w = _rand(5, 256, seed=9), _rand(6, 256, seed=10)
    x[2, 3] = float("inf")
    xq, xs = quant_1x128(x)
    wq, ws = quant_128x128(w)
    c = fp8_gemm_blockwise(xq, xs, wq, ws, out_dtype=torch.float32)
    assert torch.isnan(c[2]).all()
    assert torch.isfinite(c[[0, 1, 3, 4]]).all()


def test_errors():
    xq, xs = quant_1x128(_rand(8, 256))
    wq, ws = quant_128x128(_rand(16, 256))
    with pytest.raises(ValueError, match="reduction"):
        fp8_gemm_blockwise(xq[:, :200], xs, wq, ws)
    with pytest.raises(ValueError, match="a_scales"):
        fp8_gemm_blockwise(xq, xs[:, :1], wq, ws)
    with pytest.raises(ValueError, match="b_scales"):
        fp8_gemm_blockwise(xq, xs, wq, ws.t())
    with pytest.raises(ValueError, match="b_scales"):
        fp8_gemm_1x128_1x128(xq, xs, wq, ws)  # 128x128 scales where per-row ones are expected
    with pytest.raises(TypeError):
        fp8_gemm_blockwise(xq.float(), xs, wq, ws)
    with pytest.raises(TypeError):
        fp8_gemm_blockwise(xq, xs, wq, ws, out_dtype=torch.int32)


def test_empty_dims():
    xq, xs = quant_1x128(_rand(0, 256))
    wq, ws = quant_128x128(_rand(16, 256))
    assert fp8_gemm_blockwise(xq, xs, wq, ws).shape == (0, 16)


GROUP_COUNTS = [[0, 130, 3, 1, 200, 0], [257], [0, 0, 0]]


@pytest.mark.parametrize("counts", GROUP_COUNTS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_fwd_dgrad_match_ref(counts, out_dtype):
    c = torch.tensor(counts, device=DEVICE)
    E, M, N, K = len(counts), sum(counts), 130, 257
    tiles = grouped_tiles(c, M)
    x, w = _rand(M, K, seed=11), _rand(E, N, K, seed=12, scale=0.05)
    xq, xs, _, _ = quant_1x128_with_transpose_grouped(x, tiles)
    wq, ws = quant_128x128(w)
    y = fp8_gemm_grouped(xq, xs, wq, ws, tiles, out_dtype=out_dtype)
    assert y.shape == (M, N) and y.dtype == out_dtype
    if M:
        _close_to_ref(y, fp8_gemm_grouped_ref(xq, xs, wq, ws, tiles, out_dtype=torch.float32), out_dtype)
        true = torch.cat([xe @ w[e].t() for e, xe in enumerate(torch.split(x, counts))])
        assert _rel(y, true) < 5e-2
    # dgrad: B = W^T per expert (the 128x128 blocks transposed)
    g = _rand(M, N, seed=13)
    gq, gs, _, _ = quant_1x128_with_transpose_grouped(g, tiles)
    wtq, wts = wq.transpose(1, 2).contiguous(), ws.transpose(1, 2).contiguous()
    dx = fp8_gemm_grouped(gq, gs, wtq, wts, tiles, out_dtype=out_dtype)
    assert dx.shape == (M, K)
    if M:
        _close_to_ref(dx, fp8_gemm_grouped_ref(gq, gs, wtq, wts, tiles, out_dtype=torch.float32), out_dtype)


def _grouped_n300_case(K, x_seed, w_seed):
    """Grouped case at N = 300 (a 256-wide tile's second half partly past N): counts [0, 70, 3, 130, 0] (empty
    groups first and last), x [173, K] (seed x_seed), w [5, 300, K] (seed w_seed, scale 0.05) with rows 128..255
    (a 128x128 b-scale block) 50x larger, quantised. Returns (tiles, xq, xs, xtq, xts, wq, ws): x's grouped 1x128
    quantisation and its tile-padded transpose, w's 128x128."""
    counts = [0, 70, 3, 130, 0]
    c = torch.tensor(counts, device=DEVICE)
    E, M, N = len(counts), sum(counts), 300
    tiles = grouped_tiles(c, M)
    x, w = _rand(M, K, seed=x_seed), _rand(E, N, K, seed=w_seed, scale=0.05)
    w[:, 128:256] *= 50.0
    xq, xs, xtq, xts = quant_1x128_with_transpose_grouped(x, tiles)
    wq, ws = quant_128x128(w)
    return tiles, xq, xs, xtq, xts, wq, ws


@pytest.mark.parametrize("K", [256, 257])  # EVEN_K and the masked tail (only for non-empty sub-tiles)
@pytest.mark.parametrize("bm,bn", [(64, 256), (128, 256), (32, 64)])
def test_grouped_gemm_block_sizes(K, bm, bn):
    """Grouped kernel with BLOCK_N = 256 (two b-scale blocks) and BLOCK_M < 128 (sub-tiles of a 128-row tile, some
    empty) at N = 300; empty tiles (group index E) must load nothing."""
    tiles, xq, xs, _, _, wq, ws = _grouped_n300_case(K, 31, 32)
    y = fp8_gemm_grouped(xq, xs, wq, ws, tiles, out_dtype=torch.float32,
                         config={"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4})
    _close_to_ref(y, fp8_gemm_grouped_ref(xq, xs, wq, ws, tiles, out_dtype=torch.float32), torch.float32)


def test_grouped_config_errors():
    tiles = grouped_tiles(torch.tensor([3, 5], device=DEVICE), 8)
    xq, xs = quant_1x128(_rand(8, 256))
    wq, ws = quant_128x128(_rand(2, 16, 256))
    with pytest.raises(ValueError, match="BLOCK_M"):
        fp8_gemm_grouped(xq, xs, wq, ws, tiles, config={"BLOCK_M": 256})
    with pytest.raises(ValueError, match="unknown config keys"):
        fp8_gemm_grouped(xq, xs, wq, ws, tiles, config={"GROUP_M": 8})


@pytest.mark.parametrize("bm,bn", [(64, 256), (256, 128)])
def test_grouped_wgrad_block_sizes(bm, bn):
    counts = [0, 130, 3, 200]
    c = torch.tensor(counts, device=DEVICE)
    M, N, K = sum(counts), 130, 300
    tiles = grouped_tiles(c, M)
    g, x = _rand(M, N, seed=33), _rand(M, K, seed=34)
    _, _, gtq, gts = quant_1x128_with_transpose_grouped(g, tiles)
    _, _, xtq, xts = quant_1x128_with_transpose_grouped(x, tiles)
    dw = fp8_gemm_grouped_wgrad(gtq, gts, xtq, xts, tiles, config={"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 2})
    _close_to_ref(dw, fp8_gemm_grouped_wgrad_ref(gtq, gts, xtq, xts, tiles), torch.float32)
    assert (dw[0] == 0).all()


@pytest.mark.parametrize("counts", GROUP_COUNTS)
def test_grouped_wgrad_matches_ref(counts):
    c = torch.tensor(counts, device=DEVICE)
    E, M, N, K = len(counts), sum(counts), 130, 150
    tiles = grouped_tiles(c, M)
    g, x = _rand(M, N, seed=14), _rand(M, K, seed=15)
    _, _, gtq, gts = quant_1x128_with_transpose_grouped(g, tiles)
    _, _, xtq, xts = quant_1x128_with_transpose_grouped(x, tiles)
    dw = fp8_gemm_grouped_wgrad(gtq, gts, xtq, xts, tiles)
    assert dw.shape == (E, N, K) and dw.dtype == torch.float32
    _close_to_ref(dw, fp8_gemm_grouped_wgrad_ref(gtq, gts, xtq, xts, tiles), torch.float32)
    for e, (ge, xe) in enumerate(zip(torch.split(g, counts), torch.split(x, counts))):
        if counts[e] == 0:
            assert (dw[e] == 0).all()
        else:
            assert _rel(dw[e], ge.t() @ xe) < 5e-2


def test_grouped_errors():
    tiles = grouped_tiles(torch.tensor([3, 5], device=DEVICE), 8)
    xq, xs = quant_1x128(_rand(8, 256))
    wq, ws = quant_128x128(_rand(2, 16, 256))
    with pytest.raises(ValueError, match="E=2"):
        fp8_gemm_grouped(xq, xs, wq[:1], ws[:1], tiles)
    with pytest.raises(ValueError, match="b_scales"):
        fp8_gemm_grouped(xq, xs, wq, ws[:, :, :1], tiles)
    with pytest.raises(ValueError, match="n_tiles"):
        fp8_gemm_grouped_wgrad(xq, xs, xq, xs, tiles)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("M,N,K", [(512, 384, 1024), (1000, 1030, 777), (4096, 2048, 7168)])
def test_gpu_real_sizes(M, N, K, monkeypatch):
    monkeypatch.setenv("MOETRAIN_FP8_AUTOTUNE", "1")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    xq, xs, xtq, xts = quant_1x128_with_transpose(x)
    wq, ws = quant_128x128(w)
    c = fp8_gemm_blockwise(xq, xs, wq, ws)
    ref = fp8_gemm_blockwise_ref(xq, xs, wq, ws, out_dtype=torch.float32)
    assert _rel(c, ref) < 4e-3  # bf16 output rounding + fp8 tensor-core accumulation inside each 128-K tile
    assert _rel(c, x.float() @ w.float().t()) < 5e-2
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    gq, gs, gtq, gts = quant_1x128_with_transpose(g)
    dx = fp8_gemm_dgrad(gq, gs, wq, ws)
    assert _rel(dx, fp8_gemm_dgrad_ref(gq, gs, wq, ws, out_dtype=torch.float32)) < 4e-3
    dw = fp8_gemm_1x128_1x128(gtq, gts, xtq, xts)
    assert _rel(dw, fp8_gemm_1x128_1x128_ref(gtq, gts, xtq, xts)) < 1e-3


@pytest.mark.gpu
@gpu
def test_gpu_grouped_real_sizes():
    counts = [4001, 0, 3, 2999, 1, 5000, 4327, 2]
    E, M, N, K = len(counts), sum(counts), 2048, 7168
    c = torch.tensor(counts, device="cuda")
    tiles = grouped_tiles(c, M)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    xq, xs, xtq, xts = quant_1x128_with_transpose_grouped(x, tiles)
    wq, ws = quant_128x128(w)
    y = fp8_gemm_grouped(xq, xs, wq, ws, tiles)
    assert _rel(y, fp8_gemm_grouped_ref(xq, xs, wq, ws, tiles, out_dtype=torch.float32)) < 4e-3
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    _, _, gtq, gts = quant_1x128_with_transpose_grouped(g, tiles)
    dw = fp8_gemm_grouped_wgrad(gtq, gts, xtq, xts, tiles)
    assert _rel(dw, fp8_gemm_grouped_wgrad_ref(gtq, gts, xtq, xts, tiles)) < 1e-3


# ----------------------------------------------------------------------------------------------------------
# kernel variants (constexpr SPLIT_N: two N halves sharing one A tile; PIPE: software-pipelined promotion)
# ----------------------------------------------------------------------------------------------------------
VARIANTS = [dict(SPLIT_N=True), dict(PIPE=True), dict(SPLIT_N=True, PIPE=True)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "+".join(v))
@pytest.mark.parametrize("K", [384, 200])  # EVEN_K / one full K tile + a masked tail
@pytest.mark.parametrize("bm,bn", [(64, 256), (32, 64)])
def test_variants_dense(variant, K, bm, bn, monkeypatch):
    """Dense kernel variants at N = 300 (a 256-wide last tile whose second half lies past N, and 128x128 b-scale
    blocks differing by 50x) against the references, block-scaled (fp32 and bf16 out) and per-row (wgrad) b."""
    M, N = 70, 300
    x, w = _rand(M, K, seed=41), _rand(N, K, seed=42, scale=0.05)
    w[:128] *= 50.0
    xq, xs = quant_1x128(x)
    wq, ws = quant_128x128(w)
    spy = _LaunchSpy(fg._fp8_gemm_kernel)
    monkeypatch.setattr(fg, "_fp8_gemm_kernel", spy)
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4, **variant}
    ref = fp8_gemm_blockwise_ref(xq, xs, wq, ws, out_dtype=torch.float32)
    _close_to_ref(fp8_gemm_blockwise(xq, xs, wq, ws, out_dtype=torch.float32, config=cfg), ref, torch.float32)
    assert all(spy.calls[-1][k] is v for k, v in variant.items()) and spy.calls[-1]["EVEN_K"] is (K % 128 == 0)
    _close_to_ref(fp8_gemm_blockwise(xq, xs, wq, ws, config=cfg), ref, torch.bfloat16)
    _, _, xtq, xts = quant_1x128_with_transpose(x.t().contiguous())
    _, _, wtq, wts = quant_1x128_with_transpose(w.t().contiguous())
    d = fp8_gemm_1x128_1x128(xtq, xts, wtq, wts, config=cfg)
    _close_to_ref(d, fp8_gemm_1x128_1x128_ref(xtq, xts, wtq, wts), torch.float32)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "+".join(v))
@pytest.mark.parametrize("K", [256, 257])
def test_variants_grouped(variant, K):
    """Grouped forward and wgrad variants (empty groups: the pipelined loop runs zero iterations)."""
    tiles, xq, xs, xtq, xts, wq, ws = _grouped_n300_case(K, 43, 44)
    M = xq.shape[0]
    y = fp8_gemm_grouped(xq, xs, wq, ws, tiles, out_dtype=torch.float32,
                         config={"BLOCK_M": 64, "BLOCK_N": 256, "num_warps": 4, **variant})
    _close_to_ref(y, fp8_gemm_grouped_ref(xq, xs, wq, ws, tiles, out_dtype=torch.float32), torch.float32)
    if K == 256:  # wgrad variants: dW [E, 130, 256] over the tile-padded token layout
        g = _rand(M, 130, seed=45)
        _, _, gtq, gts = quant_1x128_with_transpose_grouped(g, tiles)
        dw = fp8_gemm_grouped_wgrad(gtq, gts, xtq, xts, tiles,
                                    config={"BLOCK_M": 64, "BLOCK_N": 256, "GROUP_M": 2, **variant})
        _close_to_ref(dw, fp8_gemm_grouped_wgrad_ref(gtq, gts, xtq, xts, tiles), torch.float32)


def test_variant_configs_and_prune(monkeypatch):
    monkeypatch.delenv("MOETRAIN_FP8_VARIANTS", raising=False)  # default: dense SPLIT_N only (won on the H200)
    assert any(c.kwargs.get("SPLIT_N") for c in fg._gpu_configs())
    assert not any(c.kwargs.get("PIPE") for c in fg._gpu_configs())
    assert not any(c.kwargs.get("SPLIT_N") or c.kwargs.get("PIPE") for c in fg._grouped_gpu_configs())
    monkeypatch.setenv("MOETRAIN_FP8_VARIANTS", "1")
    for cfgs in (fg._gpu_configs(), fg._grouped_gpu_configs()):
        assert any(c.kwargs.get("SPLIT_N") for c in cfgs) and any(c.kwargs.get("PIPE") for c in cfgs)
        assert not any(c.kwargs.get("SPLIT_N") and c.kwargs["BLOCK_N"] < 32 for c in cfgs)
    big = fg._prune_dense(fg._gpu_configs(), {"M": 4096, "N": 7168, "K": 2048})
    assert any(c.kwargs.get("SPLIT_N") for c in big) and any(c.kwargs.get("PIPE") for c in big)
    tiny = fg._prune_dense([fg._cfg(4, 3, BLOCK_M=16, BLOCK_N=16, GROUP_M=8, SPLIT_N=True)], {"M": 1, "N": 1, "K": 1})
    assert tiny  # never empty (the fallback keeps the smallest)
    assert fg._prune_dense([fg._cfg(4, 3, BLOCK_M=64, BLOCK_N=16, GROUP_M=8, SPLIT_N=True),
                            fg._cfg(4, 3, BLOCK_M=64, BLOCK_N=64, GROUP_M=8)], {"M": 64, "N": 64, "K": 1}) \
        [0].kwargs.get("SPLIT_N") is None
    xq, xs = quant_1x128(_rand(8, 256))
    wq, ws = quant_128x128(_rand(16, 256))
    with pytest.raises(ValueError, match="SPLIT_N"):
        fp8_gemm_blockwise(xq, xs, wq, ws, config={"BLOCK_N": 16, "SPLIT_N": True})
    with pytest.raises(ValueError, match="PIPE"):
        fp8_gemm_blockwise(xq, xs, wq, ws, config={"PIPE": 1})


def test_autotune_cache_kwargs(monkeypatch):
    import inspect
    import triton
    has = "cache_results" in inspect.signature(triton.autotune).parameters
    monkeypatch.delenv("MOETRAIN_FP8_AUTOTUNE_CACHE", raising=False)
    assert fg._autotune_kwargs() == ({"cache_results": True} if has else {})  # on by default
    monkeypatch.setenv("MOETRAIN_FP8_AUTOTUNE_CACHE", "0")
    assert fg._autotune_kwargs() == {}
