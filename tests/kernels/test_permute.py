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
