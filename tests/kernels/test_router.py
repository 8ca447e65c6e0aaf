"""kernels/router.py: fused DeepSeek-V3 top-k routing vs the reference and a V3 Gate transcription.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before import); with
CUDA the same tests run compiled on the GPU. Random logits (no ties): the ids must match exactly;
weights are fp32 in every case; the logits grad comes back in the logits' dtype.
"""


import pytest
import torch


from tests.kernels.common import DEVICE, assert_close_finite, gpu, poison_outputs  # noqa: E402,F401
from kernels.router import router_topk, router_topk_ref  # noqa: E402


# logits dtype -> (atol, rtol): weights are computed in fp32 from the (exactly upcast) logits, so
# they are tight for both; the bf16 logits grad carries one bf16 rounding.
TOL_W = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-6, 1e-5)}
TOL_GRAD = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-3, 2e-2)}
DTYPES = [torch.float32, torch.bfloat16]

# (N, E, K, n_groups, topk_groups)
CONFIGS = [
    (1, 5, 1, 1, 1),
    (7, 16, 3, 4, 2),
    (33, 16, 2, 1, 1),
    (33, 12, 3, 3, 2),   # 3 groups (not a power of two) of 4
    (7, 6, 2, 6, 3),     # groups of one expert
    (5, 256, 8, 8, 4),   # DeepSeek-V3 layout
]


def _close(got, want, tol, what):
    assert_close_finite(got, want, tol, what)


def _distinct_logits(N, E, dtype):
    """Random logits with no ties in any row, exactly representable in bf16 (integers < 256 times
    a power of two), so that every selection, V3's torch.topk included, is unambiguous."""
    k = max(0, (E - 1).bit_length() - 3)
    rows = [(torch.randperm(E) - E // 2).float() * 2.0 ** -k for _ in range(N)]
    return torch.stack(rows).to(DEVICE).to(dtype)


def _v3_gate(scores_in, bias, k, score_func, n_groups, topk_groups, route_scale, norm):
    """DeepSeek-V3 inference/model.py Gate.forward after the linear (torch.topk, no tie contract)."""
    N = scores_in.size(0)
    scores = scores_in.float().softmax(-1) if score_func == "softmax" else scores_in.float().sigmoid()
    original_scores = scores
    if bias is not None:
        scores = scores + bias
    if n_groups > 1:
        scores = scores.view(N, n_groups, -1)
        if bias is None:
            group_scores = scores.amax(dim=-1)
        else:
            group_scores = scores.topk(min(2, scores.size(-1)), dim=-1)[0].sum(dim=-1)
        indices = group_scores.topk(topk_groups, dim=-1)[1]
        mask = scores.new_ones(N, n_groups, dtype=torch.bool).scatter_(1, indices, False)
        scores = scores.masked_fill_(mask.unsqueeze(-1), float("-inf")).flatten(1)
    indices = torch.topk(scores, k, dim=-1)[1]
    weights = original_scores.gather(1, indices)
    if score_func == "sigmoid" or norm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * route_scale, indices


def _check_invariants(w, ids, N, E, K, n_groups, topk_groups):
    assert w.dtype == torch.float32 and ids.dtype == torch.int64
    assert w.shape == ids.shape == (N, K)
    assert (ids >= 0).all() and (ids < E).all()
    for row in ids.tolist():
        assert len(set(row)) == K, f"duplicate expert ids in a row: {row}"
        groups = {i // (E // n_groups) for i in row}
        assert len(groups) <= topk_groups, f"row {row} uses {len(groups)} > {topk_groups} groups"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("score_func,with_bias,norm,route_scale", [
    ("softmax", False, False, 1.0),
    ("softmax", True, True, 2.5),
    ("sigmoid", False, True, 1.0),
    ("sigmoid", True, True, 2.5),
])
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_router_forward_backward(cfg, score_func, with_bias, norm, route_scale, dtype):
    N, E, K, G, TG = cfg
    torch.manual_seed(N * 1000 + E)
    logits = _distinct_logits(N, E, dtype).requires_grad_(True)
    bias = 0.3 * torch.randn(E, device=DEVICE) if with_bias else None
    w, ids = router_topk(logits, bias, K, score_func, G, TG, route_scale, norm)
    _check_invariants(w, ids, N, E, K, G, TG)

    lr = logits.detach().float().requires_grad_(True)
    wr, idsr = router_topk_ref(lr, bias, K, score_func, G, TG, route_scale, norm)
    assert torch.equal(ids, idsr), "ids differ from the reference"
    _close(w, wr, TOL_W[dtype], "weights")
    if score_func == "sigmoid" or norm:
        _close(w.sum(-1), torch.full((N,), route_scale, device=DEVICE), TOL_W[torch.float32], "sum w")

    # the DeepSeek-V3 Gate (torch.topk) selects the same experts in the same order
    wv3, idsv3 = _v3_gate(logits.detach(), bias, K, score_func, G, TG, route_scale, norm)
    assert torch.equal(ids, idsv3), "ids differ from the V3 Gate transcription"
    _close(w, wv3, TOL_W[dtype], "weights vs V3")

    dw = torch.randn(N, K, device=DEVICE)
    (dl,) = torch.autograd.grad(w, logits, dw)
    (dlr,) = torch.autograd.grad(wr, lr, dw)
    assert dl.dtype == dtype
    _close(dl, dlr, TOL_GRAD[dtype], "dlogits")


def test_ties_lowest_index_wins():
    logits = torch.zeros(3, 8, device=DEVICE)
    logits[1, 5] = 1.0
    w, ids = router_topk(logits, None, 3, "softmax", 1, 1, 1.0, True)
    wr, idsr = router_topk_ref(logits, None, 3, "softmax", 1, 1, 1.0, True)
    assert ids.tolist() == [[0, 1, 2], [5, 0, 1], [0, 1, 2]]
    assert torch.equal(ids, idsr)
    # equal group scores: the lower group wins
    w, ids = router_topk(torch.zeros(2, 8, device=DEVICE), torch.zeros(8, device=DEVICE), 2,
                         "sigmoid", 4, 1, 1.0, True)
    assert ids.tolist() == [[0, 1], [0, 1]]
    _close(w, torch.full((2, 2), 0.5, device=DEVICE), TOL_W[torch.float32], "tied weights")


@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_logits_with_ties_match_ref(with_bias):
    """randn logits rounded to bf16 tie often at E=256; kernel and ref share the tie contract."""
    torch.manual_seed(5)
    logits = torch.randn(9, 256, device=DEVICE).to(torch.bfloat16)
    bias = torch.zeros(256, device=DEVICE) if with_bias else None  # ties survive a zero bias
    w, ids = router_topk(logits, bias, 8, "softmax", 8, 4, 1.0, True)
    wr, idsr = router_topk_ref(logits, bias, 8, "softmax", 8, 4, 1.0, True)
    assert torch.equal(ids, idsr)
    _close(w, wr, TOL_W[torch.bfloat16], "weights")
    _check_invariants(w, ids, 9, 256, 8, 8, 4)


def test_bias_steers_selection_not_weights():
    torch.manual_seed(3)
    logits = torch.randn(4, 8, device=DEVICE)
    bias = torch.zeros(8, device=DEVICE)
    bias[6] = 100.0  # expert 6 is always selected first
    w, ids = router_topk(logits, bias, 2, "sigmoid", 1, 1, 1.0, True)
    assert (ids[:, 0] == 6).all()
    s = logits.sigmoid()
    sel = s.gather(1, ids)
    _close(w, sel / sel.sum(-1, keepdim=True), TOL_W[torch.float32], "unbiased weights")


def test_grad_flows_only_through_weights():
    """With K = E and normalisation, weights = softmax and dL/dlogits = Jacobian^T dw."""
    torch.manual_seed(4)
    E = 5
    logits = torch.randn(3, E, device=DEVICE, requires_grad=True)
    w, ids = router_topk(logits, None, E, "softmax", 1, 1, 1.0, False)
    assert not ids.requires_grad
    dw = torch.randn(3, E, device=DEVICE)
    (dl,) = torch.autograd.grad(w, logits, dw)
    lr = logits.detach().clone().requires_grad_(True)
    s = lr.softmax(-1)
    (dlr,) = torch.autograd.grad(s.gather(1, ids), lr, dw)
    _close(dl, dlr, TOL_GRAD[torch.float32], "dlogits")


def test_errors():
    lg = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="n_groups"):
        router_topk(lg, None, 2, "softmax", 3, 1)
    with pytest.raises(ValueError, match="topk_groups"):
        router_topk(lg, None, 2, "softmax", 4, 5)
    with pytest.raises(ValueError, match="k="):
        router_topk(lg, None, 9, "softmax", 4, 2)
    with pytest.raises(ValueError, match="score_func"):
        router_topk(lg, None, 2, "relu")
    with pytest.raises(ValueError, match="n_experts"):
        router_topk(torch.randn(2, 300, device=DEVICE), None, 2)
    with pytest.raises(TypeError, match="bias must be float32"):
        router_topk(lg, torch.zeros(16, dtype=torch.float64, device=DEVICE), 2)
    with pytest.raises(ValueError, match="bias must be"):
        router_topk(lg, torch.zeros(15, device=DEVICE), 2)


# ---------------------------------------------------------------------------- real sizes (GPU)
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_gpu_real_size(score_func):
    torch.manual_seed(0)
    N, E, K, G, TG = 16384, 256, 8, 8, 4
    logits = torch.randn(N, E, device="cuda", requires_grad=True)
    bias = 0.01 * torch.randn(E, device="cuda")
    w, ids = router_topk(logits, bias, K, score_func, G, TG, 2.5, True)
    lr = logits.detach().clone().requires_grad_(True)
    wr, idsr = router_topk_ref(lr, bias, K, score_func, G, TG, 2.5, True)
    # 4M random fp32 scores: the GPU's sigmoid/exp differ from torch's in the last bit, so a few
    # near-tied rows may pick differently; those picks must be equally good to fp32 precision
    differ = (ids != idsr).any(dim=-1)
    assert differ.float().mean().item() < 1e-3, f"{int(differ.sum())} rows differ"
    if differ.any():
        s = logits.detach().softmax(-1) if score_func == "softmax" else logits.detach().sigmoid()
        sel = s + bias
        torch.testing.assert_close(sel.gather(1, ids)[differ].sum(-1), sel.gather(1, idsr)[differ].sum(-1),
                                   atol=1e-5, rtol=1e-5)
    same = ~differ
    _close(w[same], wr[same], TOL_W[torch.float32], "weights")
    dw = torch.randn(N, K, device="cuda")
    (dl,) = torch.autograd.grad(w, logits, dw)
    (dlr,) = torch.autograd.grad(wr, lr, dw)
    _close(dl[same], dlr[same], (1e-5, 1e-4), "dlogits")
    groups = ids // (E // G)
    n_groups_used = torch.stack([(groups == g).any(-1) for g in range(G)], -1).sum(-1)
    assert (n_groups_used <= TG).all()
    assert (ids.sort(-1)[0].diff(dim=-1) > 0).all()
