"""kernels/p2p.py (push / pull of token rows through the peers' buffers) and the symmetric exchange's destination
math, in one process: a simulated group whose per-rank buffers are segments of one tensor, addressed through the
same per-peer offsets (``delta``) the kernels get on the GPU. Interpreted on CPU, compiled on a GPU.

Checked against an explicit listing of what every rank must receive: rows grouped by local expert, then source
rank, then token order (the order of the other exchanges), dropped copies (capacity) neither sent nor summed.
"""
import pytest
import torch

from tests.kernels.common import DEVICE, assert_close_finite, gpu, poison_outputs  # noqa: F401
from kernels.p2p import pull_sum, pull_sum_ref, push_rows, push_rows_ref, push_rows_routed
from moetrain.parallel.row_ops import TorchRowOps
from moetrain.parallel.symm_exchange import destinations, route_table

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def _group(world, cap, D, dtype):
    """One tensor holding every rank's buffer [cap, D] (NaN-filled) and, per rank, its delta table."""
    big = torch.full((world * cap, D), float("nan"), dtype=dtype, device=DEVICE)
    deltas = [torch.tensor([(r - me) * cap * D for r in range(world)], dtype=torch.int64, device=DEVICE)
              for me in range(world)]
    return big, deltas


def _routing(world, N, K, E, capacity_drop, seed):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]) if N
           else torch.zeros(0, K, dtype=torch.int64) for _ in range(world)]
    if capacity_drop:  # some copies dropped: the drop bin E
        for i in ids:
            i[::3, 0] = E
    return ids


def _expected(world, ids, xs, E):
    """Rank r's rows: for its local experts e, for source ranks s, tokens of s routed to e, in token order."""
    El = E // world
    out = []
    for r in range(world):
        rows = [xs[s][t] for e in range(El) for s in range(world) for t in range(ids[s].shape[0])
                for k in range(ids[s].shape[1]) if ids[s][t, k] == r * El + e]
        out.append(torch.stack(rows) if rows else xs[0][:0])
    return out


def _dests(world, ids, E):
    n_bins = E + 1
    c_all = torch.stack([torch.bincount(i.reshape(-1), minlength=n_bins)[:E] for i in ids])
    res = []
    for me in range(world):
        counts, _, row_of = TorchRowOps.routing(ids[me], n_bins)
        res.append(destinations(ids[me], row_of, counts, c_all, me, E))
    return res


@pytest.mark.parametrize("world,N,K,E,drop", [(2, 7, 2, 8, False), (4, 5, 3, 8, True), (3, 1, 1, 6, False),
                                              (2, 0, 2, 4, False)])
def test_destinations_and_push_give_each_rank_its_rows(world, N, K, E, drop):
    D = 5
    ids = _routing(world, N, K, E, drop, seed=world * 100 + N)
    xs = [torch.randn(N, D) for _ in range(world)]
    if N == 0:  # every rank sends nothing; another rank's rows would come from xs[0][:0]
        xs = [torch.zeros(0, D) for _ in range(world)]
    want = _expected(world, ids, xs, E)
    cap = world * N * K + 1
    big, deltas = _group(world, cap, D, torch.float32)
    for me, (rank, row) in enumerate(_dests(world, ids, E)):
        assert bool((rank[ids[me] >= E] == -1).all()) and bool((rank[ids[me] < E] >= 0).all())
        push_rows(xs[me].to(DEVICE), None, rank.to(DEVICE), row.to(DEVICE), deltas[me], big[me * cap:])
    big = big.cpu()
    for r in range(world):
        M = want[r].shape[0]
        assert torch.equal(big[r * cap:r * cap + M], want[r]), f"rank {r}: received rows"
        assert big[r * cap + M:(r + 1) * cap].isnan().all(), f"rank {r}: rows past the received ones were written"


@pytest.mark.parametrize("world,N,K,E,drop,short", [(2, 7, 2, 8, False, 0), (4, 5, 3, 8, True, 0),
                                                    (3, 6, 2, 6, True, 4), (2, 0, 2, 4, False, 0)])
def test_routed_push_computes_the_destinations_in_the_kernel(world, N, K, E, drop, short):
    """push_rows_routed: the (rank, row) it writes out equal ``destinations``; the rows it stores equal push_rows';
    with a buffer ``short`` rows too small, the rows past its end are left alone and the others still land."""
    D = 6
    ids = _routing(world, N, K, E, drop, seed=world * 10 + N)
    xs = [torch.randn(N, D) for _ in range(world)]
    n_bins = E + 1
    c_all = torch.stack([torch.bincount(i.reshape(-1), minlength=n_bins)[:E] for i in ids])
    need = int(c_all.view(world, world, -1).sum(2).sum(0).max()) if N else 0
    cap = max(need - short, 1)
    big, deltas = _group(world, cap, D, torch.float32)
    big_ref, _ = _group(world, cap, D, torch.float32)
    for me in range(world):
        counts, _, row_of = TorchRowOps.routing(ids[me], n_bins)
        base = route_table(counts, c_all, me)
        rank, row = push_rows_routed(xs[me].to(DEVICE), ids[me].to(DEVICE), row_of.to(DEVICE), base.to(DEVICE), E,
                                     E // world, deltas[me], big[me * cap:])
        want_rank, want_row = destinations(ids[me], row_of, counts, c_all, me, E)
        assert torch.equal(rank.cpu(), want_rank) and torch.equal(row.cpu(), want_row)
        push_rows(xs[me].to(DEVICE), None, want_rank.to(DEVICE), want_row.to(DEVICE), deltas[me], big_ref[me * cap:])
    assert torch.equal(big.cpu().isnan(), big_ref.cpu().isnan())
    assert torch.equal(big.cpu().nan_to_num(), big_ref.cpu().nan_to_num())
    want = _expected(world, ids, xs, E)  # each rank's segment: its rows up to the capacity, nothing spilled over
    for r in range(world):
        M = min(want[r].shape[0], cap)
        assert torch.equal(big.cpu()[r * cap:r * cap + M], want[r][:M]), f"rank {r}: rows within the buffer"
        assert big.cpu()[r * cap + M:(r + 1) * cap].isnan().all(), f"rank {r}: rows past the received ones"
    assert (max(w.shape[0] for w in want) > cap) == (short > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("D", [5, 16, 33])  # 16: every peer offset a multiple of 16 (DELTA_ALIGNED)
def test_push_and_pull_match_the_reference(dtype, weighted, D):
    world, N, K, E = 3, 6, 2, 6
    ids = _routing(world, N, K, E, True, seed=D)
    cap = world * N * K
    dests = _dests(world, ids, E)
    g = torch.Generator().manual_seed(7 * D)
    xs = [torch.randn(N, D, generator=g).to(dtype) for _ in range(world)]
    ws = [torch.rand(N, K, generator=g) for _ in range(world)] if weighted else [None] * world
    big, deltas = _group(world, cap, D, dtype)
    ref = [torch.full((cap, D), float("nan"), dtype=dtype) for _ in range(world)]
    for me, (rank, row) in enumerate(dests):
        push_rows(xs[me].to(DEVICE), None if ws[me] is None else ws[me].to(DEVICE), rank.to(DEVICE),
                  row.to(DEVICE), deltas[me], big[me * cap:])
        push_rows_ref(xs[me], ws[me], rank, row, ref)
    for r in range(world):
        got = big[r * cap:(r + 1) * cap].cpu()
        assert torch.equal(got.isnan(), ref[r].isnan()), f"rank {r}: written rows"
        assert_close_finite(got.nan_to_num(), ref[r].nan_to_num(), TOL[dtype], f"push rank {r}")
    # pull back what was pushed (every written row holds data; fill the rest so a wrong row shows)
    big = torch.where(big.isnan(), torch.full_like(big, 1e4), big)
    bufs = [big[r * cap:(r + 1) * cap].cpu() for r in range(world)]
    for me, (rank, row) in enumerate(dests):
        out_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        out = torch.full((N, D), float("nan"), dtype=out_dtype, device=DEVICE)
        rows = torch.full((N * K, D), float("nan"), dtype=dtype, device=DEVICE)
        pull_sum(big[me * cap:], None if ws[me] is None else ws[me].to(DEVICE), rank.to(DEVICE), row.to(DEVICE),
                 deltas[me], out, rows)
        want_out, want_rows = pull_sum_ref(bufs, ws[me], rank, row, out_dtype)
        assert torch.equal(rows.cpu(), want_rows), f"rank {me}: pulled rows"
        assert_close_finite(out.cpu(), want_out, TOL[dtype], f"pull rank {me}")
        assert (rows.cpu()[(rank < 0).reshape(-1)] == 0).all(), "dropped copies must pull zeros"


def test_pull_skips_dropped_copies_without_reading():
    """A dropped copy (rank -1) contributes exactly 0 even if its row index points at garbage."""
    D, cap = 4, 3
    big, deltas = _group(1, cap, D, torch.float32)
    big[:] = float("nan")
    big[1] = 2.0
    rank = torch.tensor([[0, -1]], device=DEVICE)
    row = torch.tensor([[1, 0]], device=DEVICE)
    out = torch.empty(1, D, device=DEVICE)
    pull_sum(big, torch.tensor([[0.5, 3.0]], device=DEVICE), rank, row, deltas[0], out)
    assert torch.equal(out.cpu(), torch.full((1, D), 1.0))


@pytest.mark.gpu
@gpu
def test_gpu_push_pull_real_size():
    """Compiled at the bench size of one rank's share (4096 tokens x top-6 x 2048 bf16, 2 simulated ranks): push, the
    routed push and the weighted pull (the peer offsets here are multiples of 16: the vectorised path)."""
    world, N, K, E, D = 2, 4096, 6, 64, 2048
    ids = [i.cuda() for i in _routing(world, N, K, E, False, seed=1)]
    xs = [torch.randn(N, D, device="cuda", dtype=torch.bfloat16) for _ in range(world)]
    cap = world * N * K
    big, deltas = _group(world, cap, D, torch.bfloat16)
    c_all = torch.stack([torch.bincount(i.reshape(-1), minlength=E + 1)[:E] for i in ids])
    for me in range(world):
        counts, _, row_of = TorchRowOps.routing(ids[me], E + 1)
        rank, row = destinations(ids[me], row_of, counts, c_all, me, E)
        push_rows(xs[me], None, rank, row, deltas[me], big[me * cap:])
    want = _expected(world, [i.cpu() for i in ids], [x.cpu() for x in xs], E)
    for r in range(world):
        assert torch.equal(big[r * cap:r * cap + want[r].shape[0]].cpu(), want[r])
    # the routed push (destinations computed in the kernel) lands the same rows and returns the same (rank, row)
    big2, _ = _group(world, cap, D, torch.bfloat16)
    dests = []
    for me in range(world):
        counts, _, row_of = TorchRowOps.routing(ids[me], E + 1)
        rank, row = push_rows_routed(xs[me], ids[me], row_of, route_table(counts, c_all, me), E, E // world,
                                     deltas[me], big2[me * cap:])
        want_rank, want_row = destinations(ids[me], row_of, counts, c_all, me, E)
        assert torch.equal(rank, want_rank) and torch.equal(row, want_row)
        dests.append((rank, row))
    assert torch.equal(big2.isnan(), big.isnan()) and torch.equal(big2.nan_to_num(), big.nan_to_num())
    # pull + weighted sum of what was pushed, and the pulled rows, against PyTorch indexing
    big = big.nan_to_num()
    for me, (rank, row) in enumerate(dests):
        w = torch.rand(N, K, device="cuda")
        out = torch.full((N, D), float("nan"), device="cuda", dtype=torch.bfloat16)
        rows = torch.full((N * K, D), float("nan"), device="cuda", dtype=torch.bfloat16)
        pull_sum(big[me * cap:], w, rank, row, deltas[me], out, rows)
        ref_rows = big[(rank * cap + row).reshape(-1)]
        assert torch.equal(rows, ref_rows)
        ref = (w.unsqueeze(-1) * ref_rows.view(N, K, D).float()).sum(1)
        assert_close_finite(out.float(), ref, TOL[torch.bfloat16], f"pull rank {me}")
