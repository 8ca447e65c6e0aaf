"""kernels/fp8_rowwise.py: fused tensorwise / rowwise FP8 quantisation vs the pure-torch references (the eager code
of moetrain.precision.fp8 / fp8_grouped).

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) and must match the
references bit for bit: fp8 bytes via a uint8 view, scales via their int32 bits. The `gpu` tests run the compiled
kernels at real sizes against the references on the GPU, with poisoned (NaN) outputs, also bit for bit (both cast
modes: the hardware cvt and the exact integer cast).
"""
import pytest
import torch

import kernels._utils as kutils
from kernels import fp8_rowwise as fr

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not fr.INTERPRETED,
                                reason="kernels.fp8_rowwise was imported without TRITON_INTERPRET=1")

IN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MS = (1, 3, 17, 129, 1000)
KS = (16, 48, 130, 2048 + 16)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel fails to write cannot pass."""
    monkeypatch.setattr(kutils, "POISON_OUTPUTS", True)


def _data(M, K, dtype, seed=0, zero_rows=True):
    g = torch.Generator().manual_seed(seed)
    # magnitudes over many decades (subnormal fp8 results, saturation-free scales), a zero row, a -0 row
    x = torch.randn(M, K, generator=g) * torch.logspace(-9, 3, K)[None, :] * torch.rand(M, 1, generator=g)
    if zero_rows and M > 2:
        x[1] = 0.0
        x[2] = -0.0
    return x.to(dtype).to(DEVICE)


def _same(a, b, what=""):
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    if a.dtype.itemsize == 1:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    elif a.dtype == torch.float32:
        a, b = a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    if not torch.equal(a, b):
        bad = (a != b).nonzero()
        raise AssertionError(f"{what}: {bad.shape[0]} of {a.numel()} differ, first at {bad[0].tolist()}: "
                             f"{a[tuple(bad[0])].item()} vs {b[tuple(bad[0])].item()}")


def _case(i, j):
    """Spread input and output dtypes over the shape grid (keeps the interpreter run short)."""
    return IN_DTYPES[(i + j) % 3], fr.DTYPES[(i * 3 + j) % 2]


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K", KS)
def test_quant_rows_matches_ref(M, K):
    dt, od = _case(MS.index(M), KS.index(K))
    x = _data(M, K, dt)
    q, s = fr.quant_rows(x, od)
    qr, sr = fr.quant_rows_ref(x, od)
    assert q.is_contiguous() and s.shape == (M,)
    _same(q, qr, "q")
    _same(s, sr, "s")


@pytest.mark.parametrize("M,K", [(1, 16), (3, 48), (17, 130), (129, 2064), (1000, 16), (40, 130)])
def test_quant_cols_and_tensor_match_ref(M, K):
    i = [1, 3, 17, 129, 1000, 40].index(M)
    for j, od in enumerate(fr.DTYPES):
        dt = IN_DTYPES[(i + j) % 3]
        x = _data(M, K, dt, seed=i)
        q, s = fr.quant_cols(x, od)
        qr, sr = fr.quant_cols_ref(x, od)
        assert q.shape == (K, M) and q.is_contiguous() and s.shape == (K,)
        _same(q, qr, "cols q")
        _same(s, sr, "cols s")
        q, s = fr.quant_tensor(x, od)
        qr, sr = fr.quant_tensor_ref(x, od)
        assert s.dim() == 0
        _same(q, qr, "tensor q")
        _same(s, sr, "tensor s")


def test_long_rows_loop_path():
    """K > 16384: the rows kernel loops over K blocks (two passes) instead of holding the row in registers."""
    x = _data(3, 18432, torch.bfloat16)
    for od in fr.DTYPES:
        q, s = fr.quant_rows(x, od)
        qr, sr = fr.quant_rows_ref(x, od)
        _same(q, qr, "q")
        _same(s, sr, "s")


def test_strided_inputs_and_batched():
    x = _data(40, 96, torch.float32)
    # a transposed view and a column slice
    for t in (x.t(), x[:, 5:70]):
        q, s = fr.quant_rows(t)
        qr, sr = fr.quant_rows_ref(t)
        _same(q, qr, "q")
        _same(s, sr, "s")
    w = _data(3 * 33, 48, torch.bfloat16, seed=3).view(3, 33, 48)
    q, s = fr.quant_cols(w)
    qr, sr = fr.quant_cols_ref(w)
    assert q.shape == (3, 48, 33) and s.shape == (3, 48)
    _same(q, qr, "batched cols q")
    _same(s, sr, "batched cols s")
    q, s = fr.quant_tensor(w)
    qr, sr = fr.quant_tensor_ref(w)
    assert s.shape == (3,)
    _same(q, qr, "batched tensor q")
    _same(s, sr, "batched tensor s")


@pytest.mark.parametrize("od", fr.DTYPES, ids=["e4m3", "e5m2"])
def test_non_finite_zero_and_tiny(od):
    """inf / nan (either sign) give NaN scales and the eager path's fp8 NaN bytes; all-zero rows, -0, tiny amax."""
    x = _data(17, 130, torch.float32, seed=5)
    x[4, 5] = float("nan")
    x[5, 7] = float("inf")
    x[6, 1] = -float("inf")
    x[7, 3] = -float("nan")
    x[8, :] = 1e-30       # amax below the 1e-12 clamp
    x[9, :4] = 1e6        # saturates nothing (the scale follows amax) but large
    for fn, ref in ((fr.quant_rows, fr.quant_rows_ref), (fr.quant_cols, fr.quant_cols_ref),
                    (fr.quant_tensor, fr.quant_tensor_ref)):
        got, want = fn(x, od), ref(x, od)
        for a, b, n in zip(got, want, ("q", "s")):
            _same(a, b, f"{fn.__name__} {n}")
    z = torch.zeros(5, 48, device=DEVICE)
    for fn, ref in ((fr.quant_rows, fr.quant_rows_ref), (fr.quant_cols, fr.quant_cols_ref),
                    (fr.quant_tensor, fr.quant_tensor_ref)):
        for a, b in zip(fn(z, od), ref(z, od)):
            _same(a, b, f"{fn.__name__} zeros")
    s = fr.quant_rows(x, od)[1]
    assert torch.isnan(s[4:8]).all() and torch.isfinite(s[8:]).all()


def _plan(counts):
    from moetrain.precision.fp8_grouped import group_plan
    counts = list(counts)
    plan = group_plan(torch.tensor(counts, dtype=torch.int64, device=DEVICE), sum(counts))
    return plan.eid, plan.src, plan.n_groups


def _grouped_same_as_ref(x, eid, src, E, tag):
    """Every grouped quantisation of x (rows padded, rows per-expert tensorwise, columns per expert transposed,
    both recipes) equal to its reference; returns the padded rows' (q, s)."""
    q, s = fr.quant_rows(x, src=src)
    for a, b, n in zip((q, s), fr.quant_rows_ref(x, src=src), ("q", "s")):
        _same(a, b, f"rows padded {tag} {n}")
    for a, b, n in zip(fr.quant_rows_grouped_tensorwise(x, eid, src, E),
                       fr.quant_rows_grouped_tensorwise_ref(x, eid, src, E), ("q", "s_rows", "s_group")):
        _same(a, b, f"rows tensorwise {tag} {n}")
    for tw in (False, True):
        for a, b, n in zip(fr.quant_cols_grouped_t(x, eid, src, E, tensorwise=tw),
                           fr.quant_cols_grouped_t_ref(x, eid, src, E, tensorwise=tw), ("qt", "s")):
            _same(a, b, f"cols grouped {tag} tensorwise={tw} {n}")
    return q, s


@pytest.mark.parametrize("counts", [[0, 1, 17, 33, 0], [0, 0, 51], [130, 0, 0, 7], [1]],
                         ids=["odd", "one_expert", "empty_middle", "single_row"])
def test_grouped_padded_match_ref(counts):
    eid, src, E = _plan(counts)
    x = _data(sum(counts), 48, torch.bfloat16, seed=len(counts))
    if x.shape[0] > 3:
        x[3, 2] = float("nan")   # poisons only its expert's tensorwise scale / its column scale
    q, s = _grouped_same_as_ref(x, eid, src, E, "48")
    assert q.shape == (src.numel(), 48)
    # padding rows: zero bytes, scale 1
    pad = src < 0
    assert (q.view(torch.uint8)[pad] == 0).all() and (s[pad] == 1).all()


def test_empty_inputs():
    e = torch.zeros(0, 48, device=DEVICE)
    q, s = fr.quant_rows(e)
    assert q.shape == (0, 48) and s.shape == (0,)
    q, s = fr.quant_cols(e)
    assert q.shape == (48, 0) and (s == 1).all()
    src = torch.full((32,), -1, dtype=torch.int32, device=DEVICE)
    eid = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    q, s = fr.quant_rows(e, src=src)
    assert (q.view(torch.uint8) == 0).all() and (s == 1).all()
    q, s_rows, s_group = fr.quant_rows_grouped_tensorwise(e, eid, src, 2)
    assert (q.view(torch.uint8) == 0).all() and (s_rows == 1).all() and (s_group == 1).all()
    qt, s = fr.quant_cols_grouped_t(e, eid, src, 2)
    assert qt.shape == (48, 32) and (qt.view(torch.uint8) == 0).all() and (s == 1).all()


def test_bad_arguments():
    x = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(TypeError):
        fr.quant_rows(x, torch.bfloat16)
    with pytest.raises(TypeError):
        fr.quant_rows(x.to(torch.int32))
    with pytest.raises(ValueError):
        fr.quant_rows(x[0])


# ------------------------------------------------------------------------------------------------
# GPU: compiled kernels at real sizes
# ------------------------------------------------------------------------------------------------
@pytest.fixture(params=[False, True], ids=["hw_cast", "exact_cast"])
def cast_mode(request, monkeypatch):
    monkeypatch.setattr(fr, "EXACT_CAST", request.param)
    return request.param


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("od", fr.DTYPES, ids=["e4m3", "e5m2"])
def test_gpu_real_sizes_match_ref(od, cast_mode):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(16333, 7168, device="cuda", generator=g, dtype=torch.bfloat16)
    x[5] = 0
    x[7, 3] = float("inf")
    w = torch.randn(7168, 2048, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    for fn, ref, t in ((fr.quant_rows, fr.quant_rows_ref, x), (fr.quant_rows, fr.quant_rows_ref, w),
                       (fr.quant_cols, fr.quant_cols_ref, x), (fr.quant_cols, fr.quant_cols_ref, w),
                       (fr.quant_tensor, fr.quant_tensor_ref, w)):
        for a, b, n in zip(fn(t, od), ref(t, od), ("q", "s")):
            _same(a, b, f"{fn.__name__} {tuple(t.shape)} {n}")
    long = torch.randn(64, 18432, device="cuda", generator=g, dtype=torch.float32)
    for a, b in zip(fr.quant_rows(long, od), fr.quant_rows_ref(long, od)):
        _same(a, b, "long rows")


@pytest.mark.gpu
@gpu
def test_gpu_grouped_real_sizes_match_ref(cast_mode):
    """8 experts, 16333 rows (an empty expert), 2048 / 7168 columns; expert weights [8, 7168, 2048]."""
    cl = [4001, 0, 3, 2999, 1, 5000, 4327, 2]
    eid, src, E = _plan(cl)
    g = torch.Generator(device="cuda").manual_seed(1)
    for C in (2048, 7168):
        x = torch.randn(sum(cl), C, device="cuda", generator=g, dtype=torch.bfloat16)
        _grouped_same_as_ref(x, eid, src, E, str(C))
    w = torch.randn(8, 7168, 2048, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    for fn, ref in ((fr.quant_cols, fr.quant_cols_ref), (fr.quant_tensor, fr.quant_tensor_ref)):
        for a, b, n in zip(fn(w), ref(w), ("q", "s")):
            _same(a, b, f"weights {fn.__name__} {n}")
    q, s = fr.quant_rows(w.view(-1, 2048))
    qr, sr = fr.quant_rows_ref(w.view(-1, 2048))
    _same(q, qr, "weights rows q")
    _same(s, sr, "weights rows s")
