"""kernels/fp8_quant.py: 1x128 / 128x128 E4M3 quantisation vs the pure-torch references.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton and
kernels/ are imported); the kernels then match the references bit for bit (they round to the E4M3 grid with
exact integer ops in interpreter mode). With CUDA the same tests run compiled on the GPU, where Triton's fp32
division may differ from torch's in the last bit: fp8 values may then differ by one E4M3 step on rare elements.
"""
import os

import pytest
import torch

os.environ.setdefault("MOETRAIN_FP8_AUTOTUNE", "0")  # GPU: one fixed tile config (no per-shape tuning runs)

from kernels import fp8_quant as fq  # noqa: E402
from kernels.fp8_quant import (  # noqa: E402
    dequant_128x128, dequant_1x128, grouped_tiles, quant_128x128, quant_128x128_ref, quant_1x128, quant_1x128_ref,
    quant_1x128_with_transpose, quant_1x128_with_transpose_grouped, quant_1x128_with_transpose_grouped_ref,
    group_block,
    quant_1x128_with_transpose_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXACT = DEVICE == "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not fq.INTERPRETED,
                                reason="kernels.fp8_quant was imported without TRITON_INTERPRET=1")

SHAPES = [(33, 257), (1, 1), (128, 128), (130, 300), (5, 129)]


def _data(M, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # magnitudes over 6 decades so tiles have very different scales
    x = torch.randn(M, K, generator=g) * torch.logspace(-3, 3, K)[None, :] * torch.rand(M, 1, generator=g)
    return x.to(dtype).to(DEVICE)


def _same_fp8(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.numel() == 0:
        return
    if EXACT:
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    else:  # one E4M3 step (relative 2^-3) at most, on few elements
        diff = (a.float() - b.float()).abs()
        assert (diff <= b.float().abs() * 0.125 + 2.0 ** -9).all()
        assert (diff > 0).float().mean() < 1e-3


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_1x128_matches_ref(shape, dtype):
    x = _data(*shape, dtype)
    q, s = quant_1x128(x)
    qr, sr = quant_1x128_ref(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (shape[0], -(-shape[1] // 128))
    torch.testing.assert_close(s, sr, rtol=0, atol=0)
    _same_fp8(q, qr)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_1x128_with_transpose_matches_ref(shape, dtype):
    x = _data(*shape, dtype, seed=1)
    q, s, qt, st = quant_1x128_with_transpose(x)
    qr, sr, qtr, str_ = quant_1x128_with_transpose_ref(x)
    M, K = shape
    assert qt.shape == (K, M) and st.shape == (K, -(-M // 128)) and qt.is_contiguous()
    torch.testing.assert_close(s, sr, rtol=0, atol=0)
    torch.testing.assert_close(st, str_, rtol=0, atol=0)
    _same_fp8(q, qr)
    _same_fp8(qt, qtr)
    # the transposed outputs are exactly the 1x128 quantisation of x^T
    q2, s2 = quant_1x128(x.t())
    torch.testing.assert_close(st, s2, rtol=0, atol=0)
    _same_fp8(qt, q2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_128x128_matches_ref(shape, dtype):
    w = _data(*shape, dtype, seed=2)
    q, s = quant_128x128(w)
    qr, sr = quant_128x128_ref(w)
    assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    torch.testing.assert_close(s, sr, rtol=0, atol=0)
    _same_fp8(q, qr)


def test_quant_128x128_of_transpose_is_transpose():
    w = _data(200, 300, seed=3)
    q, s = quant_128x128(w)
    qt, st = quant_128x128(w.t())
    torch.testing.assert_close(st, s.t(), rtol=0, atol=0)
    _same_fp8(qt, q.t())


@pytest.mark.parametrize("shape", [(200, 300), (1, 1), (128, 256), (130, 129)])
@pytest.mark.parametrize("batch", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_128x128_with_transpose(shape, batch, dtype):
    """The fused transposed copy: the bytes of w_fp8 transposed, contiguous, at odd shapes, 2-D and batched; w_fp8
    and the scales are those of the plain call."""
    N, K = shape
    w = _data(max(batch, 1) * N, K, dtype, seed=11)
    w = w.view(batch, N, K) if batch else w
    q, s, qt = quant_128x128(w, with_transpose=True)
    q0, s0 = quant_128x128(w)
    assert qt.shape == (*w.shape[:-2], K, N) and qt.is_contiguous() and qt.dtype == torch.float8_e4m3fn
    assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0)
    assert torch.equal(qt.view(torch.uint8), q.transpose(-1, -2).contiguous().view(torch.uint8))
    qr, sr, qtr = quant_128x128_ref(w, with_transpose=True)
    _same_fp8(qt, qtr)


@pytest.mark.parametrize("shape", [(33, 257), (130, 300), (1, 1)])
def test_col_major_scales(shape):
    """col_major_scales: the same values with strides (1, rows), for every 1x128 quantiser and its reference."""
    M, K = shape
    x = _data(M, K, torch.bfloat16, seed=12)

    def col_major(t):
        return t.dim() == 2 and (t.shape[0] <= 1 or t.stride(0) == 1) and (t.shape[1] <= 1 or t.stride(1) == t.shape[0])
    for fn in (quant_1x128, quant_1x128_with_transpose, quant_1x128_ref, quant_1x128_with_transpose_ref):
        plain, cm = fn(x), fn(x, col_major_scales=True)
        for a, b in zip(plain, cm):
            if a.dtype == torch.float32:
                assert col_major(b), (fn.__name__, b.shape, b.stride())
                assert torch.equal(a, b)
            else:
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    counts = torch.tensor([0, M - M // 3, M // 3], device=DEVICE)
    tiles = grouped_tiles(counts, M)
    plain = quant_1x128_with_transpose_grouped(x, tiles)
    gm = quant_1x128_with_transpose_grouped(x, tiles, group_major=True)   # its x^T scales: cuBLAS's layout
    assert col_major(gm[3]) and torch.equal(plain[3], gm[3])


def test_strided_input():
    x = _data(70, 520, seed=4)[:, ::2]  # non-contiguous columns
    q, s = quant_1x128(x)
    qr, sr = quant_1x128_ref(x.contiguous())
    torch.testing.assert_close(s, sr, rtol=0, atol=0)
    _same_fp8(q, qr)


@pytest.mark.parametrize("kind", ["1x128", "1x128_t", "128x128"])
def test_roundtrip_error_bound(kind):
    """E4M3 has 3 mantissa bits: |dequant(quant(x)) - x| <= 2^-4 |x| for values in the normal range
    (|x| / scale >= 2^-6); below it the absolute error is <= half the subnormal step, 2^-10 * scale."""
    x = _data(150, 333, seed=5)
    if kind == "1x128":
        q, s = quant_1x128(x)
        xd, xs = dequant_1x128(q, s), s.repeat_interleave(128, 1)[:, :333]
    elif kind == "1x128_t":
        _, _, q, s = quant_1x128_with_transpose(x)
        x = x.t()
        xd, xs = dequant_1x128(q, s), s.repeat_interleave(128, 1)[:, :150]
    else:
        q, s = quant_128x128(x)
        xd = dequant_128x128(q, s)
        xs = s.repeat_interleave(128, 0)[:150].repeat_interleave(128, 1)[:, :333]
    err = (xd - x.float()).abs()
    normal = x.abs() / xs >= 2.0 ** -6
    assert normal.float().mean() > 0.5
    assert (err[normal] <= x.abs()[normal] * 2.0 ** -4 * (1 + 1e-6)).all()
    assert (err[~normal] <= xs[~normal] * 2.0 ** -10 * (1 + 1e-6)).all()


def test_exact_scales_hand_built():
    x = torch.zeros(3, 130)
    x[0, 5] = 896.0          # tile max 896 -> scale 2.0, quantises to 448 exactly
    x[0, 7] = 3.0            # 3 / 2 = 1.5 is an E4M3 value
    x[1, :128] = 1.0
    x[1, 17] = -448.0        # negative max: scale 1.0
    x[2, 128] = 0.5          # partial second tile (2 valid columns): amax over the valid part only
    x[2, 129] = -0.25
    x = x.to(DEVICE)
    q, s = quant_1x128(x)
    torch.testing.assert_close(s.cpu(), torch.tensor([[2.0, 1.0], [1.0, 1.0], [1.0, 0.5 / 448.0]]),
                               rtol=0 if EXACT else 1e-6, atol=0)
    assert q[0, 5].float().item() == 448.0
    assert q[0, 7].float().item() == 1.5
    assert q[1, 17].float().item() == -448.0
    assert q[2, 128].float().item() == 448.0 and q[2, 129].float().item() == -224.0
    torch.testing.assert_close(dequant_1x128(q, s).cpu(), x.cpu(), rtol=0, atol=0)  # all exactly representable

    w = torch.zeros(130, 5)
    w[3, 2] = 896.0
    w[129, 4] = -7.0         # second block row holds only 2 valid rows
    w = w.to(DEVICE)
    qw, sw = quant_128x128(w)
    assert sw.shape == (2, 1)
    assert sw[0, 0].item() == 2.0 and sw[1, 0].item() == pytest.approx(7.0 / 448.0, rel=1e-6)
    assert qw[3, 2].float().item() == 448.0 and qw[129, 4].float().item() == -448.0
    torch.testing.assert_close(dequant_128x128(qw, sw).cpu(), w.cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("fn", ["1x128", "1x128_t", "128x128"])
def test_zero_and_tiny_blocks(fn):
    x = torch.zeros(130, 260, device=DEVICE)
    x[129, 259] = 1e-20      # a tiny block: amax clamped to 1e-12, no nan / inf
    outs = {"1x128": quant_1x128, "1x128_t": quant_1x128_with_transpose, "128x128": quant_128x128}[fn](x)
    for o in outs:
        assert torch.isfinite(o.float()).all()
    s = outs[1]
    tiny = s[s != 1.0]
    assert tiny.numel() >= 1
    torch.testing.assert_close(tiny, torch.full_like(tiny, 1e-12 / 448.0), rtol=1e-6, atol=0)
    assert (s == 1.0).float().mean() > 0.5  # all-zero tiles get scale 1
    q = outs[0]
    assert (q.float()[:129] == 0).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on inf * 0
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_flags_nan_scale(bad):
    x = _data(4, 300, seed=6)
    x[2, 140] = bad
    q, s = quant_1x128(x)
    assert torch.isnan(s[2, 1])                            # the tile that holds it is flagged
    assert torch.isfinite(s[[0, 1, 3]]).all() and torch.isfinite(s[2, [0, 2]]).all()
    assert torch.isnan(dequant_1x128(q, s)[2, 128:256]).all()
    with pytest.raises(FloatingPointError):
        quant_1x128(x, check_finite=True)
    _, st = quant_128x128(x)
    assert torch.isnan(st[0, 1]) and torch.isfinite(st[0, [0, 2]]).all()
    with pytest.raises(FloatingPointError):
        quant_1x128_with_transpose(x, check_finite=True)


def test_errors():
    with pytest.raises(ValueError):
        quant_1x128(torch.zeros(3, 4, 5, device=DEVICE))
    with pytest.raises(TypeError):
        quant_1x128(torch.zeros(3, 4, dtype=torch.int32, device=DEVICE))
    q, s = quant_1x128(torch.ones(3, 200, device=DEVICE))
    with pytest.raises(ValueError):
        dequant_1x128(q, s[:, :1])
    with pytest.raises(ValueError):
        dequant_128x128(q, s)


def test_empty():
    q, s = quant_1x128(torch.zeros(0, 300, device=DEVICE))
    assert q.shape == (0, 300) and s.shape == (0, 3)
    q, s, qt, st = quant_1x128_with_transpose(torch.zeros(5, 0, device=DEVICE))
    assert qt.shape == (0, 5) and st.shape == (0, 1)


def test_quant_128x128_batched():
    w = _data(3 * 130, 200, seed=7).view(3, 130, 200)
    q, s = quant_128x128(w)
    assert q.shape == (3, 130, 200) and s.shape == (3, 2, 2)
    for e in range(3):  # blocks never straddle two batch entries
        qe, se = quant_128x128_ref(w[e])
        torch.testing.assert_close(s[e], se, rtol=0, atol=0)
        _same_fp8(q[e], qe)


def test_grouped_tiles_table():
    counts = torch.tensor([0, 130, 3, 1, 200, 0], device=DEVICE)
    t = grouped_tiles(counts, 334)
    assert t.n_tiles == 3 + 6 and t.n_groups == 6
    assert t.tile_group.tolist() == [1, 1, 2, 3, 4, 4, 6, 6, 6]
    assert t.tile_start.tolist() == [0, 128, 130, 133, 134, 262, 0, 0, 0]
    assert t.tile_end.tolist() == [128, 130, 133, 134, 262, 334, 0, 0, 0]
    assert t.group_tile_start.tolist() == [0, 0, 2, 3, 4, 6, 6]
    empty = grouped_tiles(torch.zeros(3, dtype=torch.long, device=DEVICE), 0)
    assert empty.n_tiles == 3 and empty.tile_end.tolist() == [0, 0, 0]


@pytest.mark.parametrize("counts", [[0, 130, 3, 1, 200, 0], [257], [0, 0]])
@pytest.mark.parametrize("group_major", [False, True])
def test_quant_grouped_matches_ref(counts, group_major):
    c = torch.tensor(counts, device=DEVICE)
    M = sum(counts)
    x = _data(M, 150, seed=8) if M else torch.zeros(0, 150, device=DEVICE)
    tiles = grouped_tiles(c, M)
    q, s, qt, st = quant_1x128_with_transpose_grouped(x, tiles, group_major=group_major)
    qr, sr, qtr, str_ = quant_1x128_with_transpose_grouped_ref(x, tiles, group_major=group_major)
    assert st.shape == (150, tiles.n_tiles)
    if group_major:   # each group's rows start at a multiple of 128; the padding rows are zeros with scale 1
        assert q.shape == (tiles.n_tiles * 128, 150) and s.shape == (tiles.n_tiles * 128 * 2,)
        assert qt.shape == (150 * tiles.n_tiles * 128,)
        q0, s0 = quant_1x128(x)
        gts, groups = tiles.group_tile_start.tolist(), tiles.tile_group.tolist()
        for t, (a, b) in enumerate(zip(tiles.tile_start.tolist(), tiles.tile_end.tolist())):
            assert torch.equal(q[t * 128:t * 128 + b - a].view(torch.uint8), q0[a:b].view(torch.uint8))
            assert (q[t * 128 + b - a:(t + 1) * 128].view(torch.uint8) == 0).all()
            if groups[t] < len(counts):   # a real tile: its rows of its group's scale block
                r = (t - gts[groups[t]]) * 128
                blk = group_block(s, gts, groups[t], 2).t()
                assert torch.equal(blk[r:r + b - a], s0[a:b]) and (blk[r + b - a:r + 128] == 1).all()
    else:
        assert qt.shape == (150, tiles.n_tiles * 128)
    torch.testing.assert_close(s, sr, rtol=0, atol=0)
    torch.testing.assert_close(st, str_, rtol=0, atol=0)
    _same_fp8(q, qr)
    _same_fp8(qt, qtr)   # includes the zero padding past each tile's rows


@pytest.mark.parametrize("counts", [[0, 130, 3, 1, 200, 0], [257], [0, 0], [5]])
def test_quant_grouped_group_major(counts):
    """group_major: each group's x^T and scales one contiguous block (group_block), the same values as the grouped
    Triton GEMMs' layout (x^T's tile-padded columns, x's per-row scales)."""
    c = torch.tensor(counts, device=DEVICE)
    M, K = sum(counts), 300
    x = _data(M, K, seed=9) if M else torch.zeros(0, K, device=DEVICE)
    tiles = grouped_tiles(c, M)
    q, s, qt, st = quant_1x128_with_transpose_grouped(x, tiles, group_major=True)
    _, sx, qtp, stp = quant_1x128_with_transpose_grouped(x, tiles)
    qr, sr, qtr, str_ = quant_1x128_with_transpose_grouped_ref(x, tiles, group_major=True)
    assert s.dim() == 1 and qt.dim() == 1 and s.numel() == tiles.n_tiles * 128 * 3 and qt.numel() == qtp.numel()
    torch.testing.assert_close(s, sr, rtol=0, atol=0)
    torch.testing.assert_close(st, str_, rtol=0, atol=0)
    _same_fp8(q, qr)
    _same_fp8(qt, qtr)
    torch.testing.assert_close(st, stp, rtol=0, atol=0)
    gts = tiles.group_tile_start.tolist()
    row_off = [0] + torch.cumsum(c, 0).tolist()
    for g in range(len(counts)):
        a, b = gts[g] * 128, gts[g + 1] * 128
        blk_s, blk_qt = group_block(s, gts, g, 3).t(), group_block(qt, gts, g, K)
        assert blk_s.shape == (b - a, 3) and (b == a or blk_s.stride() == (1, b - a))
        assert blk_qt.shape == (K, b - a) and blk_qt.is_contiguous()
        torch.testing.assert_close(blk_s[:counts[g]], sx[row_off[g]:row_off[g + 1]], rtol=0, atol=0)
        _same_fp8(blk_qt, qtp[:, a:b])


def test_quant_128x128_into_given_outputs():
    """out=: two weights quantised into the halves of one operand equal the quantisation of their concatenation
    (rows a multiple of 128: the same blocks); wrong shapes are refused."""
    w1, w3 = _data(256, 300, seed=13).view(2, 128, 300), _data(256, 300, seed=14).view(2, 128, 300)
    q, s, qt = quant_128x128(torch.cat([w1, w3], 1), with_transpose=True)
    oq = torch.empty_like(q)
    os_ = torch.full_like(s, float("nan"))
    oqt = torch.empty_like(qt)
    for i, w in enumerate((w1, w3)):
        got = quant_128x128(w, with_transpose=True,
                            out=(oq[:, i * 128:(i + 1) * 128], os_[:, i:i + 1], oqt[..., i * 128:(i + 1) * 128]))
        assert got[0].data_ptr() == oq[:, i * 128].data_ptr()
    _same_fp8(oq, q)
    _same_fp8(oqt, qt)
    torch.testing.assert_close(os_, s, rtol=0, atol=0)
    with pytest.raises(ValueError, match="out must be 2 tensors"):
        quant_128x128(w1, out=(oq[:, :128], os_[:, :2]))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(4096, 7168), (1000, 2049)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])   # fp32: master weights (a triton 3.6 bug)
def test_gpu_real_sizes(shape, dtype):
    x = torch.randn(*shape, device="cuda", dtype=dtype)
    def q128_t(w):
        return quant_128x128(w, with_transpose=True)

    def q128_t_ref(w):
        return quant_128x128_ref(w, with_transpose=True)

    def q1t_cm(w):
        return quant_1x128_with_transpose(w, col_major_scales=True)
    for fn, ref in [(quant_1x128, quant_1x128_ref), (quant_128x128, quant_128x128_ref),
                    (quant_1x128_with_transpose, quant_1x128_with_transpose_ref), (q128_t, q128_t_ref),
                    (q1t_cm, quant_1x128_with_transpose_ref)]:
        outs, refs = fn(x), ref(x)
        for o, r in zip(outs, refs):
            if o.dtype == torch.float32:
                torch.testing.assert_close(o, r, rtol=1e-6, atol=0)
            else:
                _same_fp8(o, r)


@pytest.mark.parametrize("warps,k_fastest,ch", [(4, 0, 32), (2, 1, 64), (4, 0, 128), (8, 1, 128)])
def test_with_transpose_schedules_same_bytes(monkeypatch, warps, k_fastest, ch):
    """The with-transpose kernels' launch tunables (CFG: grid order k_fastest, warps, pass width ch) change the
    schedule only: every output equals the reference, dense and grouped (both layouts)."""
    for suffix in ("t", "tg"):
        for key, val in (("k_fastest", k_fastest), ("warps", warps), ("ch", ch)):
            monkeypatch.setitem(fq.CFG, f"{key}_{suffix}", val)
    x = _data(130, 300, seed=11)
    for got, ref in zip(quant_1x128_with_transpose(x), quant_1x128_with_transpose_ref(x)):
        if got.dtype == torch.float8_e4m3fn:
            _same_fp8(got, ref)
        else:
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
    c = torch.tensor([0, 130, 3, 0, 200], device=DEVICE)
    xg = _data(333, 300, seed=12)
    tiles = grouped_tiles(c, 333)
    for gm in (False, True):
        got = quant_1x128_with_transpose_grouped(xg, tiles, group_major=gm)
        ref = quant_1x128_with_transpose_grouped_ref(xg, tiles, group_major=gm)
        for a, b in zip(got, ref):
            if a.dtype == torch.float8_e4m3fn:
                _same_fp8(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    x[129, 290] = float("nan")           # the last row tile's last column tile: NaN row and column scales there only
    _, s, _, st = quant_1x128_with_transpose(x)
    assert torch.isnan(s[129, 2]) and torch.isnan(st[290, 1])
    assert int(torch.isnan(s).sum()) == 1 and int(torch.isnan(st).sum()) == 1


def test_cfg_from_env():
    assert fq._cfg_from_env("warps_tg=8, k_fastest_tg=1,") == {"warps_tg": 8, "k_fastest_tg": 1}
    assert fq._cfg_from_env("") == {}
    for bad in ("warps=8", "warps_tg=eight", "warps_tg"):
        with pytest.raises(ValueError, match="MOETRAIN_FP8_QUANT_CFG: bad entry"):
            fq._cfg_from_env(bad)
    with pytest.raises(ValueError, match="chunk 48 must be 16, 32, 64 or 128"):
        fq._chunk(48)
