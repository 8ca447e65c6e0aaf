"""Gate invariants, grouped experts vs. a per-token loop reference, dispatcher, balance losses."""

import pytest
import torch
import torch.nn.functional as F

from moetrain.model import Gate, GroupedExperts, LocalDispatcher, MoE, ModelArgs
from moetrain.model import moe as moe_mod
from moetrain.model.moe import sequence_balance_loss, switch_balance_loss, router_z_loss


def margs(**kw):
    base = dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2,
                n_shared_experts=1, seq_aux_alpha=0.0)
    base.update(kw)
    return ModelArgs(**base)


def build_moe(args, seed=0):
    torch.manual_seed(seed)
    m = MoE(args)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return m


def ref_gate(g: Gate, x):
    """Plain per-token routing, written from the V3 description."""
    N = x.shape[0]
    E, K, G, Gl = g.n_experts, g.topk, g.n_groups, g.topk_groups
    logits = x.float() @ g.weight.float().T
    scores = logits.softmax(-1) if g.score_func == "softmax" else logits.sigmoid()
    per = E // G
    ids, ws = [], []
    for n in range(N):
        sel = scores[n] + g.bias
        if G > 1:
            grp = sel.view(G, per)
            gs = grp.max(-1).values if g.score_func == "softmax" else grp.topk(min(2, per))[0].sum(-1)
            allowed = set(gs.topk(Gl).indices.tolist())
            sel = torch.tensor([sel[e].item() if e // per in allowed else float("-inf")
                                for e in range(E)])
        idx = sel.topk(K).indices
        wn = scores[n, idx]
        if g.score_func == "sigmoid" or g.norm_topk_prob:
            wn = wn / wn.sum()
        ids.append(idx)
        ws.append(wn * g.route_scale)
    w, ids = torch.stack(ws), torch.stack(ids)
    return w, ids


def ref_moe(m: MoE, x):
    """y[n] = sum_k w[n,k] * swiglu-expert_{id[n,k]}(x[n]) + shared(x[n]), loops over tokens."""
    B, T, D = x.shape
    xf = x.reshape(-1, D)
    w, ids = ref_gate(m.gate, xf)
    ex = m.experts
    rows = []
    for n in range(xf.shape[0]):
        y = torch.zeros(D)
        for k in range(ids.shape[1]):
            e = ids[n, k]
            h = F.silu(xf[n] @ ex.w1[e].T) * (xf[n] @ ex.w3[e].T)
            y = y + w[n, k] * (h @ ex.w2[e].T)
        if m.shared_experts is not None:
            s = m.shared_experts
            y = y + s.w2.weight @ (F.silu(s.w1.weight @ xf[n]) * (s.w3.weight @ xf[n]))
        rows.append(y)
    return torch.stack(rows).view(B, T, D), ids


CASES = {
    "softmax-top1": dict(score_func="softmax", n_activated_experts=1),
    "softmax-top3-norm": dict(score_func="softmax", n_activated_experts=3, norm_topk_prob=True),
    "softmax-top2-groups": dict(score_func="softmax", n_expert_groups=4, n_limited_groups=2,
                                norm_topk_prob=False, route_scale=3.0),
    "sigmoid-top1": dict(score_func="sigmoid", n_activated_experts=1, n_shared_experts=0),
    "sigmoid-top3-groups": dict(score_func="sigmoid", n_activated_experts=3, n_expert_groups=4,
                                n_limited_groups=2, route_scale=2.5, n_shared_experts=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_moe_matches_loop_reference(case):
    args = margs(**CASES[case])
    m = build_moe(args)
    with torch.no_grad():
        m.gate.bias.copy_(torch.randn(8) * 0.1)
    x = torch.randn(2, 5, args.dim, requires_grad=True)
    y = m(x)
    ref, ref_ids = ref_moe(m, x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    # gradients of the grouped path == gradients of the loop reference
    g = torch.randn_like(y)
    params = [x] + list(m.parameters())
    got = torch.autograd.grad(y, params, g, allow_unused=True)
    exp = torch.autograd.grad(ref, params, g, allow_unused=True)
    for p, a, b in zip(["x"] + [n for n, _ in m.named_parameters()], got, exp):
        if b is None:
            assert a is None or a.abs().max() == 0, p
        else:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=p)
    _, ids = m.gate(x.reshape(-1, args.dim))
    assert torch.equal(ids, ref_ids)


def test_looped_fallback_matches_grouped(monkeypatch):
    args = margs(n_activated_experts=3)
    m = build_moe(args)
    x = torch.randn(3, 4, args.dim, requires_grad=True)
    y1 = m(x)
    g1 = torch.autograd.grad(y1.sum(), [x, m.experts.w1, m.experts.w2])
    monkeypatch.setattr(moe_mod, "_grouped_mm_supported", lambda *a: False)
    y2 = m(x)
    g2 = torch.autograd.grad(y2.sum(), [x, m.experts.w1, m.experts.w2])
    torch.testing.assert_close(y1, y2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_grouped_experts_expanded_grad_and_empty_groups():
    ex = GroupedExperts(4, 16, 8)
    ex.reset_parameters()
    x = torch.randn(7, 16, requires_grad=True)
    tpe = torch.tensor([3, 0, 4, 0])
    ex(x, tpe).sum().backward()  # stride-0 grad_output into _grouped_mm
    assert x.grad.abs().sum() > 0 and ex.w1.grad[1].abs().sum() == 0
    assert ex(torch.randn(0, 16), torch.zeros(4, dtype=torch.long)).shape == (0, 16)


def test_bf16_moe_forward_backward():
    m = build_moe(margs(score_func="sigmoid")).to(torch.bfloat16)
    assert m.gate.bias.dtype == torch.float32 and m.gate.expert_load.dtype == torch.float32
    x = torch.randn(2, 6, 16, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.experts.w2.grad.dtype == torch.bfloat16


# ---- gate invariants -----------------------------------------------------------------------

@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_gate_invariants(score_func):
    E, G, Gl, K = 16, 4, 2, 4
    args = margs(dim=24, n_routed_experts=E, n_activated_experts=K, n_expert_groups=G,
                 n_limited_groups=Gl, score_func=score_func, route_scale=2.5, norm_topk_prob=True)
    torch.manual_seed(0)
    g = Gate(args)
    g.reset_parameters()
    torch.nn.init.normal_(g.weight, std=1.0)
    x = torch.randn(64, 24)
    w, ids = g(x)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64 and w.shape == ids.shape == (64, K)
    assert all(len(set(r)) == K for r in ids.tolist())              # K distinct experts
    assert all(len(set(r)) <= Gl for r in (ids // (E // G)).tolist())  # within Gl groups
    torch.testing.assert_close(w.sum(-1), torch.full((64,), 2.5))     # normalised * route_scale
    # the bias changes the selection, not the weight values (they come from unbiased scores)
    logits = x @ g.weight.T
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    with torch.no_grad():
        g.bias[0] = 10.0  # expert 0 (and its group) always selected now
    w2, ids2 = g(x)
    assert (ids2 == 0).any(-1).all()
    assert not torch.equal(ids2, ids)
    exp = scores.gather(1, ids2)
    exp = exp / exp.sum(-1, keepdim=True) * 2.5
    torch.testing.assert_close(w2, exp)
    same = (ids2.sort(-1)[0] == ids.sort(-1)[0]).all(-1)
    assert same.any()
    torch.testing.assert_close(w2[same].sort(-1)[0], w[same].sort(-1)[0])


def test_gate_unnormalised_softmax_weights():
    args = margs(score_func="softmax", norm_topk_prob=False, route_scale=1.0, n_activated_experts=2)
    g = Gate(args)
    g.reset_parameters()
    x = torch.randn(10, 16)
    w, ids = g(x)
    torch.testing.assert_close(w, (x @ g.weight.T).softmax(-1).gather(1, ids))
    assert (w.sum(-1) < 1).all()


def test_update_bias_and_load_reset():
    g = Gate(margs(n_routed_experts=4, bias_update_speed=0.01))
    g.reset_parameters()
    g.expert_load.copy_(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    g.update_bias(g.expert_load.clone())
    torch.testing.assert_close(g.bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    assert g.expert_load.abs().sum() == 0
    g.update_bias(torch.tensor([1.0, 1.0, 1.0, 5.0]))
    torch.testing.assert_close(g.bias, torch.tensor([0.0, 0.02, 0.01, -0.01]))
    off = Gate(margs(n_routed_experts=4, bias_update_speed=0.0))
    off.reset_parameters()
    off.expert_load.fill_(3)
    off.update_bias(torch.tensor([9.0, 0.0, 0.0, 0.0]))
    assert off.bias.abs().sum() == 0 and off.expert_load.abs().sum() == 0


def test_expert_load_accumulates_in_training_only():
    m = build_moe(margs())
    m.train()
    x1, x2 = torch.randn(2, 5, 16), torch.randn(3, 4, 16)
    m(x1)
    m(x2)
    _, i1 = m.gate(x1.view(-1, 16))   # also counted (gate forward in training mode)
    _, i2 = m.gate(x2.view(-1, 16))
    exp = torch.bincount(torch.cat([i1.flatten(), i2.flatten()]), minlength=8).float()
    torch.testing.assert_close(m.gate.expert_load, 2 * exp)
    before = m.gate.expert_load.clone()
    with torch.no_grad():
        m(x1)
    m.eval()
    m(x1)
    torch.testing.assert_close(m.gate.expert_load, before)


def test_all_tokens_to_one_expert_and_empty_experts():
    args = margs(n_activated_experts=1)
    m = build_moe(args)
    with torch.no_grad():
        m.gate.bias[5] = 1e4
    x = torch.randn(2, 6, 16, requires_grad=True)
    y = m(x)
    ref, ids = ref_moe(m, x)
    assert (ids == 5).all()
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    y.sum().backward()
    assert m.experts.w1.grad[5].abs().sum() > 0 and m.experts.w1.grad[:5].abs().sum() == 0
    torch.testing.assert_close(m.gate.expert_load, torch.eye(8)[5] * 12)
    # top-2 forced onto experts {0, 7}
    m2 = build_moe(margs(n_activated_experts=2))
    with torch.no_grad():
        m2.gate.bias[0] = m2.gate.bias[7] = 1e4
    y2 = m2(x)
    ref2, ids2 = ref_moe(m2, x)
    assert set(ids2.flatten().tolist()) == {0, 7}
    torch.testing.assert_close(y2, ref2, atol=1e-5, rtol=1e-4)


def test_local_dispatcher_roundtrip():
    d = LocalDispatcher(5)
    x = torch.randn(6, 3)
    ids = torch.tensor([[4, 0], [0, 2], [2, 4], [0, 1], [3, 4], [4, 2]])
    w = torch.rand(6, 2)
    state = d.dispatch(x, ids, w)
    ex, tpe = d.wait(state)
    assert tpe.tolist() == [3, 1, 3, 1, 4] and tpe.dtype == torch.int64
    sorted_ids = ids.flatten()[state.sorted_idx]
    assert torch.equal(sorted_ids, sorted_ids.sort()[0])
    y = d.combine(ex * 2, state)  # "expert" doubles its input
    torch.testing.assert_close(y, 2 * x * w.sum(-1, keepdim=True))
    assert d.combine(ex.double(), state).dtype == x.dtype


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_local_dispatcher_prefetches_host_counts(device):
    """prefetch_host_counts: wait() attaches the counts as host ints (on CUDA from the copy queued in dispatch);
    off by default (nothing attached)."""
    from moetrain.model.dispatch import host_counts
    ids = torch.tensor([[4, 0], [0, 2], [2, 4], [0, 1], [3, 4], [4, 2]], device=device)
    x, w = torch.randn(6, 3, device=device), torch.rand(6, 2, device=device)
    d = LocalDispatcher(5)
    assert host_counts(d.wait(d.dispatch(x, ids, w))[1]) is None
    d.prefetch_host_counts = True
    state = d.dispatch(x, ids, w)
    assert (state.host_copy is not None) == (device == "cuda")
    _, tpe = d.wait(state)
    assert host_counts(tpe) == [3, 1, 3, 1, 4] == tpe.tolist()


# ---- balance losses ------------------------------------------------------------------------

def test_balance_losses_values_and_grads():
    # perfectly balanced: uniform scores, every expert chosen equally -> loss 1
    B, T, E, K = 2, 4, 4, 2
    scores = torch.full((B, T, E), 0.25)
    ids = torch.tensor([[0, 1], [2, 3]] * 4).view(B, T, K)
    assert sequence_balance_loss(scores, ids, K).item() == pytest.approx(1.0)
    assert switch_balance_loss(scores.view(-1, E), ids.view(-1, K)).item() == pytest.approx(1.0)
    # all on expert 0 and 1 with all probability mass there -> E/K
    s = torch.zeros(B, T, E)
    s[..., :2] = 0.5
    ids = torch.tensor([0, 1]).expand(B, T, K)
    assert sequence_balance_loss(s, ids, K).item() == pytest.approx(E / K)
    logits = torch.zeros(3, 4)
    assert router_z_loss(logits).item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)

    args = margs(seq_aux_alpha=0.1, switch_aux_alpha=0.01, router_z_loss_coef=0.001,
                 score_func="sigmoid")
    m = build_moe(args)
    m(torch.randn(2, 5, 16))
    assert m.aux_loss.ndim == 0 and m.aux_loss > 0
    m.aux_loss.backward()
    assert m.gate.weight.grad.abs().sum() > 0
    m.eval()
    m(torch.randn(2, 5, 16))
    assert m.aux_loss.item() == 0
    off = build_moe(margs(seq_aux_alpha=0.0))
    off(torch.randn(1, 3, 16))
    assert off.aux_loss.item() == 0


def test_sequence_loss_is_per_sequence():
    # two sequences each using one expert only: imbalanced per sequence even though the batch
    # as a whole is balanced -> sequence-wise loss > switch (batch-wise) loss
    E, K, T = 2, 1, 4
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat_interleave(T, 0).view(2, T, E)
    ids = s.argmax(-1, keepdim=True)
    assert sequence_balance_loss(s, ids, K).item() == pytest.approx(2.0)
    assert switch_balance_loss(s.view(-1, E), ids.view(-1, K)).item() == pytest.approx(1.0)
