"""Expert-parallel pieces in one process: capacity rule, communication-free dispatcher, telemetry, meter;
and the all-to-all dispatcher's edge cases on 2 and 4 gloo ranks."""
import math

import pytest
import torch

from moetrain.model.dispatch import LocalDispatcher
from moetrain.model.transformer import Transformer
from moetrain.parallel.expert_parallel import (A2AMeter, AllToAllDispatcher, apply_capacity,
                                               capacity_keep_mask, expert_capacity, moe_telemetry)
from tests.parallel import workers
from tests.parallel._dist import run_workers


def _keep_loop(ids, w, E, cap, policy):
    """Plain-Python capacity rule."""
    N, K = ids.shape
    keep = torch.zeros(N, K, dtype=torch.bool)
    for e in range(E):
        slots = [(n, k) for n in range(N) for k in range(K) if ids[n, k] == e]
        if policy == "probs":
            slots.sort(key=lambda nk: -w[nk].item())  # stable: ties keep position order
        for n, k in slots[:cap]:
            keep[n, k] = True
    return keep


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("cap", [0, 1, 3, 100])
def test_capacity_keep_mask_matches_loop(policy, cap):
    g = torch.Generator().manual_seed(cap)
    E, N, K = 6, 23, 2
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    w = torch.rand(N, K, generator=g).round(decimals=1)  # ties
    got = capacity_keep_mask(ids, w, E, cap, policy)
    assert torch.equal(got, _keep_loop(ids, w, E, cap, policy))
    assert got.sum() == min(N * K, sum(min(cap, int((ids == e).sum())) for e in range(E)))


def test_expert_capacity_formula():
    assert expert_capacity(10, 2, 8, 1.0) == math.ceil(20 / 8)
    assert expert_capacity(10, 2, 8, 0.01) == 1
    with pytest.raises(ValueError, match="capacity_policy"):
        capacity_keep_mask(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), 2, 1, "random")
    with pytest.raises(ValueError, match="capacity_factor"):
        AllToAllDispatcher(8, None, capacity_factor=-1)


def test_local_dispatcher_without_capacity_equals_local_dispatcher():
    g = torch.Generator().manual_seed(0)
    N, K, E, D = 13, 3, 5, 4
    x = torch.randn(N, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    w = torch.rand(N, K, generator=g)
    a, b = LocalDispatcher(E), AllToAllDispatcher(E, None)
    sa, sb = a.dispatch(x, ids, w), b.dispatch(x, ids, w)
    (xa, ta), (xb, tb) = a.wait(sa), b.wait(sb)
    assert torch.equal(xa, xb) and torch.equal(ta, tb)
    assert torch.equal(a.combine(xa * 2, sa), b.combine(xb * 2, sb))


def test_capacity_drops_copies_and_reports_them():
    g = torch.Generator().manual_seed(1)
    N, K, E, D = 16, 2, 4, 3
    x = torch.randn(N, D, generator=g, requires_grad=True)
    ids = torch.stack([torch.tensor([0, 1 + int(torch.randint(3, (1,), generator=g))]) for _ in range(N)])
    w = torch.rand(N, K, generator=g, requires_grad=True)
    d = AllToAllDispatcher(E, None, capacity_factor=1.0, capacity_policy="position")
    st = d.dispatch(x, ids, w)
    ex, tpe = d.wait(st)
    cap = expert_capacity(N, K, E, 1.0)  # 8: expert 0 gets 16 copies -> 8 dropped
    assert tpe[0] == cap and int(tpe.sum()) == ex.shape[0]
    y = d.combine(ex, st)
    keep = capacity_keep_mask(ids, w, E, cap, "position")
    ref = ((w * keep).unsqueeze(-1) * x.unsqueeze(1)).sum(1)
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert torch.all(w.grad[~keep] == 0)
    dropped, assigned = d.take_counts()
    assert (dropped, assigned) == (int((~keep).sum()), N * K) and dropped == N - cap
    assert d.take_counts() == (0, 0)


def test_capacity_on_a_model_and_telemetry_keys():
    args = workers.tiny_args()
    torch.manual_seed(0)
    m = Transformer(args)
    apply_capacity(m, 0.5, "probs")
    tokens = torch.randint(0, args.vocab_size, (2, 8))
    m(tokens).sum().backward()
    s = moe_telemetry(m, hist=True)
    assert 0 < s["moe/dropped_frac"] < 1
    for i in (1, 2):
        hist = s[f"moe/load_hist/layer_{i}"]
        assert len(hist) == args.n_routed_experts and sum(hist) == 2 * 8 * args.n_activated_experts
        assert s[f"moe/load_max/layer_{i}"] == max(hist)
        assert s[f"moe/load_mean/layer_{i}"] == pytest.approx(sum(hist) / len(hist))
        assert s[f"moe/load_cv/layer_{i}"] == pytest.approx(
            torch.tensor(hist, dtype=torch.float).std(unbiased=False).item() / (sum(hist) / len(hist)))
    assert moe_telemetry(m)["moe/dropped_frac"] == 0.0  # counters were taken
    assert set(k for k in m.moe_stats() if not k.startswith("moe/load_imbalance/")) <= set(s)


def test_meter_reports_per_step_and_resets():
    m = A2AMeter()
    assert m.report() == {}
    with m.measure(torch.device("cpu"), 100):
        pass
    m.add_bytes(20)
    m.step()
    m.step()
    r = m.report()
    assert r["perf/a2a_bytes"] == 60 and r["perf/a2a_ms"] >= 0
    assert m.report() == {}


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_dispatcher_edge_cases(world):
    out = run_workers(workers.run_dispatcher_edge_cases, world, timeout=180)
    for overlap, exchange in ((True, "all_to_all"), (True, "per_expert"), (False, "pipelined"),
                              (False, "pipelined_triton"), (False, "symmetric")):
        assert out[world - 1][f"only_rank0_experts/{overlap}/{exchange}"] == 0  # the last rank received nothing
        assert out[0][f"only_rank0_experts/{overlap}/{exchange}"] > 0
    # the symmetric exchange's buffer: sized at first use, then grown (and the rows pushed again) for many tokens
    assert out[0]["rank0_sends_nothing/symmetric_capacity"][0] == 0
    first = out[0]["rank0_sends_nothing/symmetric_capacity"][1]
    before, after = out[0]["many_tokens/symmetric_capacity"]
    assert 0 < first <= before < after


@pytest.mark.timeout(200)
def test_shared_experts_run_while_the_all_to_all_is_in_flight():
    """Forward and backward: the shared experts overlap the (reverse) token all-to-all only when overlap=True."""
    out = run_workers(workers.run_overlap_order_check, 2, timeout=180)
    assert out == [{"fwd": [True, False], "bwd": [True, False]}] * 2


@pytest.mark.timeout(120)
def test_symmetric_exchange_refuses_stale_rows():
    out = run_workers(workers.run_symmetric_two_forwards, 2, timeout=100)
    for r in out:
        assert "received rows were replaced by another forward" in r["two_forwards"], r
        assert "received rows were replaced by another forward" in r["second_backward"], r


@pytest.mark.timeout(120)
def test_symmetric_exchange_without_shm_space_is_a_clear_error():
    out = run_workers(workers.run_symmetric_shm_full, 2, timeout=100)
    for msg in out:
        assert msg.startswith("UnavailableFeature: parallel.ep_exchange=symmetric on CPU: "), msg
        assert "--shm-size" in msg and "parallel.ep_exchange=pipelined" in msg and "\n" not in msg, msg


@pytest.mark.timeout(200)
def test_symmetric_exchange_pytorch_transfers_edge_cases():
    """The same edge cases with the symmetric exchange's CPU transfers done by PyTorch indexing (what CPU runs
    without Triton's interpreter use) instead of the interpreted kernels."""
    out = run_workers(workers.run_dispatcher_edge_cases_symm_torch, 2, timeout=180)
    assert out[1]["only_rank0_experts/False/symmetric"] == 0 and out[0]["only_rank0_experts/False/symmetric"] > 0
