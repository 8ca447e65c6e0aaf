"""kernels/permute.py: MoE token permute / weighted unpermute vs the reference, fwd + every grad.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before import); with
CUDA the same tests run compiled on the GPU. The permutation itself is exact (a copy); sums
(dx of permute, y and dweights of unpermute) accumulate in fp32 and are compared with fp32
references on upcast inputs.
"""

import itertools

import pytest
import torch


from tests.kernels.common import DEVICE, assert_close_finite, gpu, poison_outputs  # noqa: E402,F401
import kernels.permute as PM  # noqa: E402
from kernels.permute import (  # noqa: E402
    permute, permute_ref, routing_map, routing_map_ref, unpermute, unpermute_ref,
)
from moetrain.parallel.row_ops import TorchRowOps  # noqa: E402


# dtype -> (atol, rtol)
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPES = [torch.float32, torch.bfloat16]
# (N, D, E, K): every N x D, with (E, K) cycling through {5, 16} x {1, 2, 3}
_EK = list(itertools.product([5, 16], [1, 2, 3]))
CASES = [(N, D, *_EK[i % len(_EK)]) for i, (N, D) in enumerate(itertools.product([1, 7, 33], [1, 17, 67]))]


def _close(got, want, dtype, what):
    assert_close_finite(got, want, TOL[dtype], what)


def _topk_ids(N, E, K, experts=None):
    """Distinct ids per row (like a router), drawn from `experts` (default: all E)."""
    pool = torch.arange(E) if experts is None else torch.as_tensor(experts)
    rows = [pool[torch.randperm(len(pool))[:K]] for _ in range(N)]
    return torch.stack(rows).to(DEVICE)


def _run_both(x, ids, E, dtype):
    """Run kernel and reference permute -> (fake experts) -> unpermute, fwd + bwd; compare all."""
    N, K = ids.shape
    D = x.shape[1]
    w = torch.rand(N, K, device=DEVICE).requires_grad_(True)
    xs, counts, sidx = permute(x, ids, E)
    xsr, countsr, sidxr = permute_ref(x.detach(), ids, E)
    assert xs.dtype == dtype and xs.shape == (N * K, D)
    assert counts.dtype == torch.int64 and sidx.dtype == torch.int64
    assert torch.equal(counts, countsr), "tokens_per_expert"
    assert torch.equal(sidx, sidxr), "sorted_index"
    assert torch.equal(xs.detach(), xsr), "x_sorted must be an exact copy"
    # the LocalDispatcher contract: rows grouped by expert, ascending, stable inside an expert
    assert (ids.flatten()[sidx].diff() >= 0).all()
    assert torch.equal(x.detach()[sidx // K], xs.detach())

    # "experts": an elementwise op so each row's output depends on its row only
    ys = xs * 1.5 + 0.25
    y = unpermute(ys, sidx, w, N)
    assert y.dtype == dtype and y.shape == (N, D)
    dy = torch.randn(N, D, device=DEVICE).to(dtype)
    gx, gw = torch.autograd.grad(y, (x, w), dy)

    xr = x.detach().float().requires_grad_(True)
    wr = w.detach().clone().requires_grad_(True)
    xsr2, _, _ = permute_ref(xr, ids, E)
    yr = unpermute_ref(xsr2 * 1.5 + 0.25, sidxr, wr, N)
    gxr, gwr = torch.autograd.grad(yr, (xr, wr), dy.float())
    _close(y, yr, dtype, "y")
    assert gx.dtype == dtype and gw.dtype == torch.float32
    _close(gx, gxr, dtype, "dx")
    _close(gw, gwr, dtype, "dweights")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_permute_unpermute(case, dtype):
    N, D, E, K = case
    torch.manual_seed(N * 100 + D)
    x = torch.randn(N, D, device=DEVICE).to(dtype).requires_grad_(True)
    _run_both(x, _topk_ids(N, E, K), E, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_some_experts_get_no_tokens(dtype):
    torch.manual_seed(1)
    N, D, E, K = 9, 17, 16, 2
    ids = _topk_ids(N, E, K, experts=[1, 4, 5, 11])
    x = torch.randn(N, D, device=DEVICE).to(dtype).requires_grad_(True)
    _run_both(x, ids, E, dtype)
    _, counts, _ = permute(x.detach(), ids, E)
    assert counts.sum().item() == N * K
    assert (counts[[0, 2, 3, 6, 15]] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_tokens_to_one_expert(dtype):
    torch.manual_seed(2)
    N, D, E = 7, 67, 5
    ids = torch.full((N, 1), 3, dtype=torch.int64, device=DEVICE)
    x = torch.randn(N, D, device=DEVICE).to(dtype).requires_grad_(True)
    _run_both(x, ids, E, dtype)
    xs, counts, sidx = permute(x.detach(), ids, E)
    assert counts.tolist() == [0, 0, 0, N, 0]
    assert torch.equal(sidx, torch.arange(N, device=DEVICE))  # stable: token order kept
    assert torch.equal(xs, x.detach())


def test_single_token_and_repeated_ids():
    """N = 1, and a row that names one expert twice (not a router output, but well defined)."""
    torch.manual_seed(3)
    x = torch.randn(1, 17, device=DEVICE, requires_grad=True)
    _run_both(x, torch.tensor([[4, 0, 4]], device=DEVICE), 5, torch.float32)


def test_roundtrip_is_identity_with_unit_weights():
    torch.manual_seed(4)
    N, D, E, K = 33, 19, 16, 3
    x = torch.randn(N, D, device=DEVICE)
    ids = _topk_ids(N, E, K)
    xs, _, sidx = permute(x, ids, E)
    w = torch.full((N, K), 1.0 / K, device=DEVICE)
    _close(unpermute(xs, sidx, w, N), x, torch.float32, "unpermute(permute(x))")


def test_routing_map():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]], device=DEVICE)
    counts, sidx, row_of = routing_map(ids, 4)
    assert counts.tolist() == [2, 2, 2, 0]
    # flattened ids [2,0,0,1,2,1] -> stable order by expert: positions [1,2,3,5,0,4]
    assert sidx.tolist() == [1, 2, 3, 5, 0, 4]
    assert row_of.tolist() == [4, 0, 1, 2, 5, 3]


# ------------------------------------------------------------- routing map: the counting sort
def _assert_same_map(ids, E, what=""):
    """routing_map (Triton counting sort) == routing_map_ref (torch.sort) exactly, all three outputs."""
    got = routing_map(ids, E)
    want = routing_map_ref(ids, E)
    for name, g, w in zip(("tokens_per_expert", "sorted_index", "row_of"), got, want):
        assert g.dtype == torch.int64 and g.shape == w.shape, f"{what} {name}: {g.dtype} {list(g.shape)}"
        assert torch.equal(g, w), f"{what} {name}"
    return got


@pytest.fixture
def rm_cfg(monkeypatch):
    """Set routing-map tunables (chunk, rank block) for one test; restored afterwards."""
    def set_(chunk, block):
        monkeypatch.setitem(PM.CFG, "rm_chunk", chunk)
        monkeypatch.setitem(PM.CFG, "rm_block", block)
    return set_


@pytest.mark.parametrize("E", [1, 2, 7, 64, 65, 257])
@pytest.mark.parametrize("K", [1, 2, 6, 8])
@pytest.mark.parametrize("N", [1, 3, 37, 1000, 4099])
def test_routing_map_equals_torch_sort(N, K, E, rm_cfg):
    """Random ids (repeats inside a row allowed): N*K is rarely a multiple of the chunk, with E=257 and
    small N most experts get no token, with E=1 all go to one. Default tunables (N=1000: up to 16 chunks
    of 512); N=4099 with 2048-position chunks and 128-position rank blocks, to keep the interpreter fast."""
    if N > 1000 and DEVICE == "cpu":
        rm_cfg(2048, 128)
    g = torch.Generator().manual_seed(N * 1000 + K * 300 + E)
    ids = torch.randint(0, E, (N, K), generator=g).to(DEVICE)
    counts, _, _ = _assert_same_map(ids, E)
    assert counts.sum().item() == N * K


@pytest.mark.parametrize("chunk,block", [(16, 16), (32, 8), (64, 64), (128, 32), (8192, 256)])
def test_routing_map_chunk_and_block_sizes(chunk, block, rm_cfg):
    """Many chunks and blocks (a chunk smaller than, equal to and larger than N*K) incl. partial last ones."""
    rm_cfg(chunk, block)
    g = torch.Generator().manual_seed(chunk + block)
    for N, K, E in [(1, 1, 1), (37, 6, 7), (250, 3, 65), (129, 8, 257), (100, 2, 2)]:
        ids = torch.randint(0, E, (N, K), generator=g).to(DEVICE)
        _assert_same_map(ids, E, f"N={N} K={K} E={E}")


@pytest.mark.parametrize("E", [1, 7, 64, 257])
def test_routing_map_skewed_ids(E, rm_cfg):
    """All tokens to one expert (the first, the last), a few experts only, ids sorted ascending and
    descending, and an int32 / int16 / non-contiguous ids tensor."""
    rm_cfg(128, 32)
    N, K = 301, 3
    g = torch.Generator().manual_seed(E)
    cases = {
        "all to 0": torch.zeros(N, K, dtype=torch.int64),
        "all to E-1": torch.full((N, K), E - 1, dtype=torch.int64),
        "subset": torch.tensor([0, E - 1, E // 2, E // 3])[torch.randint(0, 4, (N, K), generator=g)],
        "ascending": torch.randint(0, E, (N * K,), generator=g).sort()[0].view(N, K),
        "descending": torch.randint(0, E, (N * K,), generator=g).sort(descending=True)[0].view(N, K),
        "int32": torch.randint(0, E, (N, K), generator=g, dtype=torch.int32),
        "int16": torch.randint(0, E, (N, K), generator=g, dtype=torch.int16),
        "non-contiguous": torch.randint(0, E, (K, N), generator=g).t(),
    }
    for what, ids in cases.items():
        counts, sidx, _ = _assert_same_map(ids.to(DEVICE), E, what)
        if what == "all to E-1":
            assert counts[-1].item() == N * K and torch.equal(sidx, torch.arange(N * K, device=DEVICE))


def test_routing_map_empty_fallback_and_errors():
    counts, sidx, row_of = routing_map(torch.zeros(0, 3, dtype=torch.int64, device=DEVICE), 5)
    assert counts.tolist() == [0] * 5 and sidx.shape == (0,) and row_of.shape == (0,)
    assert sidx.dtype == row_of.dtype == torch.int64
    _assert_same_map(torch.randint(0, 1500, (40, 3)).to(DEVICE), 1500, "E > 1024 (torch.sort fallback)")
    with pytest.raises(TypeError, match="integer"):
        routing_map(torch.zeros(2, 2, device=DEVICE), 4)
    with pytest.raises(ValueError, match="n_experts"):
        routing_map(torch.zeros(2, 2, dtype=torch.int64, device=DEVICE), 0)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"\[0, 4\)"):
            routing_map(torch.tensor([[0, 4]]), 4)
        with pytest.raises(ValueError, match=r"\[0, 4\)"):
            routing_map(torch.tensor([[-1, 0]]), 4)


def test_unpermute_without_weight_grad_and_deterministic():
    torch.manual_seed(5)
    N, D, E, K = 7, 67, 5, 3
    ids = _topk_ids(N, E, K)
    _, _, sidx = permute(torch.zeros(N, D, device=DEVICE), ids, E)
    ys = torch.randn(N * K, D, device=DEVICE, requires_grad=True)
    w = torch.rand(N, K, device=DEVICE)
    dy = torch.randn(N, D, device=DEVICE)
    g1 = torch.autograd.grad(unpermute(ys, sidx, w, N), ys, dy)[0]
    g2 = torch.autograd.grad(unpermute(ys, sidx, w, N), ys, dy)[0]
    assert torch.equal(g1, g2)
    (gr,) = torch.autograd.grad(unpermute_ref(ys, sidx, w, N), ys, dy)
    _close(g1, gr, torch.float32, "dys")


def test_matches_model_local_dispatcher():
    """Drop-in for moetrain.model.dispatch.permute / unpermute (the LocalDispatcher seam)."""
    dispatch = pytest.importorskip("moetrain.model.dispatch")
    torch.manual_seed(6)
    N, D, E, K = 7, 17, 5, 2
    x = torch.randn(N, D, device=DEVICE)
    ids = _topk_ids(N, E, K)
    w = torch.rand(N, K, device=DEVICE)
    xs, counts, sidx = permute(x, ids, E)
    xs_m, counts_m, sidx_m = dispatch.permute(x, ids, E)
    assert torch.equal(xs, xs_m) and torch.equal(counts, counts_m) and torch.equal(sidx, sidx_m)
    ys = torch.randn(N * K, D, device=DEVICE)
    _close(unpermute(ys, sidx, w), dispatch.unpermute(ys, sidx_m, w), torch.float32, "combine")


def test_empty_batch():
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    ids = torch.zeros(0, 2, dtype=torch.int64, device=DEVICE)
    xs, counts, sidx = permute(x, ids, 4)
    assert xs.shape == (0, 8) and counts.tolist() == [0, 0, 0, 0] and sidx.shape == (0,)
    y = unpermute(xs, sidx, torch.zeros(0, 2, device=DEVICE), 0)
    assert y.shape == (0, 8)


def test_errors():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="topk_ids"):
        permute(x, torch.zeros(4, 2, dtype=torch.int64, device=DEVICE), 4)
    with pytest.raises(TypeError, match="integer"):
        permute(x, torch.zeros(3, 2, device=DEVICE), 4)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"\[0, 4\)"):
            permute(x, torch.full((3, 2), 4, dtype=torch.int64), 4)
    sidx = torch.arange(6, device=DEVICE)
    with pytest.raises(ValueError, match="y_sorted"):
        unpermute(torch.randn(5, 8, device=DEVICE), sidx, torch.ones(3, 2, device=DEVICE), 3)
    with pytest.raises(ValueError, match="sorted_index"):
        unpermute(torch.randn(6, 8, device=DEVICE), sidx.int(), torch.ones(3, 2, device=DEVICE), 3)


# ---------------------------------------------------------------------------- real sizes (GPU)
@pytest.mark.gpu
@gpu
def test_gpu_real_size():
    torch.manual_seed(0)
    N, D, E, K, dtype = 4096, 7168, 256, 8, torch.bfloat16
    ids = torch.rand(N, E, device="cuda").topk(K, dim=-1)[1]
    x = torch.randn(N, D, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.rand(N, K, device="cuda").requires_grad_(True)
    xs, counts, sidx = permute(x, ids, E)
    xsr, countsr, sidxr = permute_ref(x.detach(), ids, E)
    assert torch.equal(counts, countsr) and torch.equal(sidx, sidxr) and torch.equal(xs.detach(), xsr)
    y = unpermute(xs, sidx, w, N)
    dy = torch.randn(N, D, device="cuda", dtype=dtype)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    xr = x.detach().float().requires_grad_(True)
    wr = w.detach().clone().requires_grad_(True)
    yr = unpermute_ref(permute_ref(xr, ids, E)[0], sidxr, wr, N)
    gxr, gwr = torch.autograd.grad(yr, (xr, wr), dy.float())
    _close(y, yr, dtype, "y")
    _close(gx, gxr, dtype, "dx")
    torch.testing.assert_close(gw, gwr, atol=1e-3 * gwr.abs().max().item(), rtol=1e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("N,K,E", [(16384, 6, 64), (16384, 8, 256), (16384, 8, 257), (4097, 8, 65)])
def test_gpu_routing_map_real_sizes(N, K, E):
    """Compiled counting sort (tl.histogram, tl.gather) at the benchmark sizes, router-like ids and a
    skewed draw (most tokens to a few experts), bit-equal to the torch.sort path; and run-to-run equal."""
    torch.manual_seed(N + K + E)
    routed = torch.rand(N, E, device="cuda").topk(K, dim=-1)[1]
    skewed = (torch.randn(N, K, device="cuda").abs() * 3).long().clamp_(max=E - 1)
    for ids in (routed, skewed, routed.int()):
        got = _assert_same_map(ids, E)
        assert all(torch.equal(a, b) for a, b in zip(got, routing_map(ids, E)))


@pytest.mark.parametrize("M,n_bins", [(0, 3), (1, 1), (37, 2), (1000, 32), (4099, 7)])
def test_stable_order_matches_torch_sort(M, n_bins):
    """The EP dispatcher's regroup order: the counting sort equals the torch.sort version."""
    from moetrain.parallel.expert_parallel import stable_order as torch_stable_order
    g = torch.Generator().manual_seed(M + n_bins)
    keys = torch.randint(0, n_bins, (M,), generator=g).to(DEVICE)
    order, inv = PM.stable_order(keys, n_bins)
    ref_order, ref_inv = torch_stable_order(keys, n_bins)
    assert torch.equal(order, ref_order) and torch.equal(inv, ref_inv)


# ------------------------------------------------- RowOps: chunk-local row ops vs moetrain's TorchRowOps
def _mid(m, D, dtype, fill=None, device=DEVICE):
    """[m, D] view in the middle of a larger tensor (a data-pointer offset and stride(0) = D + 3): random, or
    filled with ``fill`` (NaN: poisoned outputs)."""
    big = (torch.randn(m + 2, D + 3, device=device) if fill is None
           else torch.full((m + 2, D + 3), fill, device=device)).to(dtype)
    return big[1:m + 1, 2:D + 2]


def _row_chunk(n, K, D, dtype, n0=3, N=None, device=DEVICE):
    """A chunk of n tokens from token n0 of N, as the pipelined exchange passes it: x / dy / w / row_of are slices
    of full-size tensors (x and dy strided wider than D), the [R = N*K, D] buffers are views with an offset too, and
    row_of is a slice of a random permutation of the R rows (so most rows belong to other chunks)."""
    N = n0 + n + 4 if N is None else N
    R, t = N * K, slice(n0, n0 + n)
    return dict(n=n, K=K, R=R, t=t, x=_mid(N, D, dtype, device=device)[t], dy=_mid(N, D, dtype, device=device)[t],
                row_of=torch.randperm(R, device=device)[n0 * K:(n0 + n) * K],
                w=(torch.rand(N, K, device=device) + 0.5)[t], src=_mid(R, D, dtype, device=device))


def _assert_rows(got, want, rows, tol, what):
    """got == want (finite, within tol) on ``rows``; every other row of got is still NaN (never written)."""
    named = torch.zeros(got.shape[0], dtype=torch.bool, device=got.device)
    named[rows] = True
    assert torch.isnan(got[~named].float()).all(), f"{what}: a row not named in row_of was written"
    assert_close_finite(got[named], want[named], tol, what)


def _check_copy_to_rows(c):
    out = _mid(c["R"], c["x"].shape[1], c["x"].dtype, float("nan"), c["x"].device)
    want = out.clone()
    PM.RowOps.copy_to_rows(c["x"], c["row_of"], out)
    TorchRowOps.copy_to_rows(c["x"], c["row_of"], want)
    _assert_rows(out, want, c["row_of"], (0.0, 0.0), "copy_to_rows")


def _check_sum_rows(c, weighted, out_dtype):
    w = c["w"] if weighted else None
    y = _mid(c["t"].stop + 4, c["src"].shape[1], out_dtype, float("nan"), c["src"].device)  # the chunk: y[t]
    want = y.clone()
    PM.RowOps.sum_rows(c["src"], c["row_of"], w, y[c["t"]])
    TorchRowOps.sum_rows(c["src"], c["row_of"], w, want[c["t"]])
    assert y.dtype == out_dtype
    _assert_rows(y, want, c["t"], TOL[out_dtype], f"sum_rows(w={'given' if weighted else 'None'})")


def _check_sum_rows_bwd(c, need_dw, dw_tol=TOL[torch.float32]):
    dy, ys = c["dy"], c["src"]
    dys = _mid(c["R"], dy.shape[1], dy.dtype, float("nan"), dy.device)
    dw = torch.full((c["t"].stop + 4, c["K"]), float("nan"), device=dy.device)  # the chunk: dw[t]
    want_dys, want_dw = dys.clone(), dw.clone()
    PM.RowOps.sum_rows_bwd(dy, ys, c["row_of"], c["w"], dys, dw[c["t"]] if need_dw else None)
    TorchRowOps.sum_rows_bwd(dy, ys, c["row_of"], c["w"], want_dys, want_dw[c["t"]] if need_dw else None)
    _assert_rows(dys, want_dys, c["row_of"], TOL[dy.dtype], "sum_rows_bwd dys")
    _assert_rows(dw, want_dw, c["t"] if need_dw else [], dw_tol, "sum_rows_bwd dw")


ROW_CASES = list(itertools.product([0, 1, 5], [1, 3], [5, 33]))  # (n, K, D): D not a multiple of the block


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,K,D", ROW_CASES)
def test_row_ops_copy_to_rows(n, K, D, dtype):
    torch.manual_seed(n * 100 + K * 10 + D)
    _check_copy_to_rows(_row_chunk(n, K, D, dtype))


@pytest.mark.parametrize("weighted", [True, False], ids=["w", "no_w"])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("n,K,D", ROW_CASES)
def test_row_ops_sum_rows(n, K, D, dtype, out_dtype, weighted):
    torch.manual_seed(n * 100 + K * 10 + D)
    _check_sum_rows(_row_chunk(n, K, D, dtype), weighted, out_dtype)


@pytest.mark.parametrize("need_dw", [True, False], ids=["dw", "no_dw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,K,D", ROW_CASES)
def test_row_ops_sum_rows_bwd(n, K, D, dtype, need_dw):
    torch.manual_seed(n * 100 + K * 10 + D)
    _check_sum_rows_bwd(_row_chunk(n, K, D, dtype), need_dw)


@pytest.mark.parametrize("n_bins", [4 * 257, 1000])
def test_row_ops_routing(n_bins):
    """The pipelined exchange's C * n_bins keys: 4 * 257 > 1024 bins takes routing_map's torch.sort fallback,
    1000 the counting sort (1024 padded bins); both equal TorchRowOps.routing, repeated keys in stable order."""
    g = torch.Generator().manual_seed(n_bins)
    keys = torch.randint(0, n_bins, (37, 3), generator=g)
    keys[::3, 1] = n_bins - 1  # a key shared by 13 positions: the order among them must stay stable
    keys = keys.to(DEVICE)
    got, want = PM.RowOps.routing(keys, n_bins), TorchRowOps.routing(keys, n_bins)
    for name, a, b in zip(("counts", "sorted_index", "row_of"), got, want):
        assert a.dtype == torch.int64 and torch.equal(a, b), name
    assert got[0].shape == (n_bins,) and got[0][-1].item() >= 13


def _placement_brute_force(counts):
    """Arrival row j (segments in (chunk, source rank, local expert) order) -> its row in (local expert,
    chunk, source rank) order, by listing every row."""
    ep, C, El = counts.shape
    arrival = [(e, c, s, j) for c in range(C) for s in range(ep) for e in range(El) for j in range(counts[s, c, e])]
    em = sorted(arrival)
    where = {r: i for i, r in enumerate(em)}
    return torch.tensor([where[r] for r in arrival], dtype=torch.int64)


@pytest.mark.parametrize("ep,C,El,zeros", [(2, 1, 1, False), (2, 3, 4, True), (4, 2, 3, False), (3, 5, 2, True),
                                           (4, 9, 80, True)])
def test_row_ops_placement(ep, C, El, zeros):
    """The pipelined exchange's placement index: TorchRowOps and the Triton kernel against a brute-force listing;
    segments with zero rows; (4, 9, 80) has 2880 segments, more than the kernel's 2048 per block."""
    g = torch.Generator().manual_seed(ep * 100 + C * 10 + El)
    counts = torch.randint(0, 4 if El > 10 else 7, (ep, C, El), generator=g)
    if zeros:
        counts[0] = 0          # a source rank that sends nothing
        counts[:, :, -1] = 0   # an expert that gets nothing
    M = int(counts.sum())
    want = _placement_brute_force(counts)
    assert torch.equal(TorchRowOps.placement(counts, M), want)
    place = PM.RowOps.placement(counts.to(DEVICE), M)
    assert place.dtype == torch.int64 and torch.equal(place.cpu(), want)


@pytest.mark.gpu
@gpu
def test_gpu_placement_real_size():
    """The placement kernel at ep=8, 4 chunks, 32 local experts and ~98k rows against TorchRowOps."""
    counts = torch.randint(0, 800, (8, 4, 32), generator=torch.Generator().manual_seed(0)).cuda()
    M = int(counts.sum())
    assert torch.equal(PM.RowOps.placement(counts, M), TorchRowOps.placement(counts, M))


@pytest.mark.gpu
@gpu
def test_gpu_row_ops_real_size():
    """RowOps compiled at a pipelined-exchange size: a chunk of 4096 of 16384 tokens, top-6, D = 2048, bf16 (the
    [98304, 2048] buffers); every op, weights and dw given and not, a bf16 src summed into fp32."""
    torch.manual_seed(0)
    c = _row_chunk(4096, 6, 2048, torch.bfloat16, n0=8192, N=16384, device="cuda")
    _check_copy_to_rows(c)
    for weighted, out_dtype in [(True, torch.bfloat16), (False, torch.bfloat16), (True, torch.float32)]:
        _check_sum_rows(c, weighted, out_dtype)
    for need_dw in (True, False):
        _check_sum_rows_bwd(c, need_dw, dw_tol=(1e-3, 1e-3))  # 2048-term fp32 dots: summation order differs


@pytest.mark.parametrize("D,dtype", [(8, torch.bfloat16), (12, torch.float32), (6, torch.bfloat16), (1, torch.float32)])
@pytest.mark.parametrize("K", [1, 3])
def test_torch_row_ops_word_view(D, dtype, K):
    """TorchRowOps moves rows as int64 words when the row bytes allow it (D=8 bf16, D=12 fp32) and element by
    element otherwise (D=6 bf16: 12 bytes; D=1): both give the rows of an explicit loop, others untouched."""
    g = torch.Generator().manual_seed(D * 10 + K)
    n, R = 5, 40
    x = torch.randn(n, D, generator=g).to(dtype)
    row_of = torch.randperm(R, generator=g)[:n * K]
    out = torch.full((R, D), float("nan"), dtype=dtype)
    TorchRowOps.copy_to_rows(x, row_of, out)
    want = torch.full((R, D), float("nan"), dtype=dtype)
    for i in range(n * K):
        want[row_of[i]] = x[i // K]
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.nan_to_num(), want.nan_to_num())
    if K == 1:  # the inverse: a plain gather
        back = torch.empty(n, D, dtype=dtype)
        TorchRowOps.sum_rows(out, row_of, None, back)
        assert torch.equal(back, x)
