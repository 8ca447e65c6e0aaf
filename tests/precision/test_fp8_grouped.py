"""moetrain/precision/fp8_grouped.py: the torch._scaled_grouped_mm path of Fp8GroupedExperts (tensorwise/rowwise).

torch._scaled_grouped_mm has no CPU kernel, so the CPU tests swap ``fp8_grouped._grouped_op`` (the one
indirection every grouped FP8 GEMM goes through) for ``scaled_grouped_mm_ref``: torch's meta checks on the
arguments, the module's group-padding invariants, then dequantise and matmul per group in fp32; rows outside
every group come back NaN (the real op leaves them uninitialised), so a row that the padding leaves unwritten
and that leaks into a result fails the finiteness checks. The BF16 wgrad goes through the real
``torch._grouped_mm`` (it has a CPU implementation). The `gpu` tests run the real operator on sm90.

Tolerances (relative Frobenius error): one grouped GEMM vs the per-expert loop with the same quantisation scales
differs only by the grouped op's bf16 output rounding (2^-9): < 5e-3. Through the experts' SwiGLU the bf16-rounded
hidden activation is requantised to E4M3, flipping some elements by one FP8 step: grouped vs loop < 3e-2
(measured <= 2.1e-2 at the CPU test sizes); the BF16 wgrad vs the loop's FP8 wgrad < 6e-2 (measured <= 3.9e-2).
Against the fp32 computation on unquantised tensors: two chained E4M3 GEMMs, < 1e-1 (as in test_fp8.py; measured
<= 8e-2). BF16 wgrad vs the exact fp32 product of the same operands: bf16 input rounding, < 1e-2.
"""
import copy
import os

import pytest
import torch

os.environ.setdefault("MOETRAIN_FP8_AUTOTUNE", "0")

from moetrain.model.moe import GroupedExperts  # noqa: E402
from moetrain.precision import fp8_grouped as fg  # noqa: E402
from moetrain.precision.fp8 import Fp8Config, Fp8GroupedExperts, fp8_linear  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

COUNTS = {
    "odd": [0, 1, 17, 33],          # an empty expert, a single row, odd sizes
    "one_expert": [0, 51, 0, 0],    # all tokens to one expert
    "last_empty": [20, 16, 15, 0],  # an aligned group, a trailing empty expert
    "single_row": [1, 0, 0, 0],
}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


class _Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def ref_op(monkeypatch):
    """Route every grouped FP8 GEMM through the pure-torch reference (counting calls)."""
    op = _Counting(fg.scaled_grouped_mm_ref)
    monkeypatch.setattr(fg, "_grouped_op", op)
    return op


def _counts(name):
    return torch.tensor(COUNTS[name], device=DEVICE)


# ------------------------------------------------------------------------------------------------
# padding plan
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("counts", list(COUNTS.values()) + [[4001, 0, 3, 2999, 1, 5000, 4327, 2]],
                         ids=list(COUNTS) + ["16333_rows"])
def test_group_plan_offsets_and_dest(counts):
    E, M = len(counts), sum(counts)
    plan = fg.group_plan(torch.tensor(counts, device=DEVICE), M)
    padded = [max(-(-c // 16) * 16, 16) for c in counts]
    ends = torch.tensor(padded).cumsum(0).tolist()
    assert plan.offs.dtype == torch.int32 and plan.offs.tolist() == ends
    assert plan.rows == -(-M // 16) * 16 + 16 * E and plan.rows >= ends[-1] and plan.rows % 16 == 0
    assert plan.n_groups == E
    dest, eid = plan.dest.tolist(), plan.eid.tolist()
    r = 0
    for e, c in enumerate(counts):
        start = ends[e] - padded[e]
        assert start % 16 == 0
        for i in range(c):
            assert eid[r] == e and dest[r] == start + i
            r += 1
    assert len(set(dest)) == M and all(d < ends[-1] for d in dest)
    # src: the inverse of dest over the buffer, -1 on padding rows (what the fused quantisation kernels read)
    assert plan.src.dtype == torch.int32 and plan.src.shape == (plan.rows,)
    expect = [-1] * plan.rows
    for i, d in enumerate(dest):
        expect[d] = i
    assert plan.src.tolist() == expect


@pytest.mark.parametrize("name", list(COUNTS))
def test_pad_unpad_roundtrip(name):
    counts = _counts(name)
    M = int(counts.sum())
    plan = fg.group_plan(counts, M)
    t = torch.randn(M, 32, device=DEVICE)
    p = fg.pad_rows(t, plan)
    assert p.shape == (plan.rows, 32) and p.is_contiguous()
    mask = torch.zeros(plan.rows, dtype=torch.bool, device=DEVICE)
    mask[plan.dest] = True
    assert (p[~mask] == 0).all()
    torch.testing.assert_close(fg.unpad_rows(p, plan), t, rtol=0, atol=0)
    q = t.to(torch.float8_e4m3fn)
    pq = fg.pad_rows(q, plan)
    assert pq.dtype == torch.float8_e4m3fn and (pq.float()[~mask] == 0).all()
    assert torch.equal(fg.unpad_rows(pq, plan).float(), q.float())
    s = fg.pad_rows(torch.full((M,), 3.0, device=DEVICE), plan, fill=1.0)
    assert (s[~mask] == 1).all() and (s[mask] == 3).all()
    with pytest.raises(ValueError, match="zeros"):
        fg.pad_rows(q, plan, fill=1.0)


def test_group_plan_bad_counts_stay_in_bounds():
    """Counts that do not sum to M (a caller bug, not checked: no sync) never index outside the buffer."""
    for counts, M in (([40, 40], 30), ([1, 1], 30)):
        plan = fg.group_plan(torch.tensor(counts, device=DEVICE), M)
        assert int(plan.dest.max()) < plan.rows and int(plan.offs.max()) <= plan.rows


# ------------------------------------------------------------------------------------------------
# the reference operator
# ------------------------------------------------------------------------------------------------
def _fp8(*shape):
    return (torch.randn(*shape, device=DEVICE) * 4).to(torch.float8_e4m3fn)


def test_reference_checks_and_poison():
    E, K, N = 3, 32, 48
    a, b = _fp8(64, K), _fp8(E, N, K).transpose(1, 2)          # a row-major, b [E, K, N] column-major
    sa, sb = torch.rand(64, device=DEVICE) + 0.5, torch.rand(E, N, device=DEVICE) + 0.5
    offs = torch.tensor([16, 16, 48], dtype=torch.int32, device=DEVICE)
    out = fg.scaled_grouped_mm_ref(a, b, sa, sb, offs=offs, out_dtype=torch.bfloat16)
    assert out.shape == (64, N) and out.dtype == torch.bfloat16
    want = (a[16:48].float() * sa[16:48, None]) @ (b[2].float() * sb[2])
    torch.testing.assert_close(out[16:48].float(), want.bfloat16().float())
    assert torch.isnan(out[48:].float()).all()                 # rows in no group: poisoned
    with pytest.raises(RuntimeError, match="E4M3"):            # torch's meta check: E5M2 rejected
        fg.scaled_grouped_mm_ref(a.to(torch.float8_e5m2), b, sa, sb, offs=offs)
    with pytest.raises(RuntimeError, match="column major"):
        fg.scaled_grouped_mm_ref(a, b.contiguous(), sa, sb, offs=offs)
    with pytest.raises(RuntimeError, match="bfloat16"):
        fg.scaled_grouped_mm_ref(a, b, sa, sb, offs=offs, out_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="int32"):
        fg.scaled_grouped_mm_ref(a, b, sa, sb, offs=offs.long())
    with pytest.raises(ValueError, match="bad group"):         # group not a multiple of 16 rows
        fg.scaled_grouped_mm_ref(a, b, sa, sb, offs=torch.tensor([16, 17, 48], dtype=torch.int32,
                                                                 device=DEVICE))
    # 2D x 2D (groups along the reduction dim): scales [G*M], [G*N], output [G, M, N]; empty group rejected
    at, bt = _fp8(N, 64), _fp8(K, 64).t()
    s2a, s2b = torch.rand(E * N, device=DEVICE) + 0.5, torch.rand(E * K, device=DEVICE) + 0.5
    offs2 = torch.tensor([16, 32, 64], dtype=torch.int32, device=DEVICE)
    out2 = fg.scaled_grouped_mm_ref(at, bt, s2a, s2b, offs=offs2, out_dtype=torch.bfloat16)
    want2 = (at[:, 32:].float() * s2a[2 * N:, None]) @ (bt[32:].float() * s2b[None, 2 * K:])
    assert out2.shape == (E, N, K)
    torch.testing.assert_close(out2[2].float(), want2.bfloat16().float())
    with pytest.raises(ValueError, match="bad group"):
        fg.scaled_grouped_mm_ref(at, bt, s2a, s2b, offs=offs)


# ------------------------------------------------------------------------------------------------
# one grouped linear vs the per-expert loop
# ------------------------------------------------------------------------------------------------
def _looped_linear(x, w, counts, cfg):
    outs = [fp8_linear(xe, w[e], None, cfg) for e, xe in enumerate(torch.split(x, counts)) if counts[e]]
    return torch.cat(outs)


@pytest.mark.parametrize("name", list(COUNTS))
@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_grouped_linear_matches_loop(recipe, name, ref_op):
    torch.manual_seed(0)
    counts = _counts(name)
    cl = COUNTS[name]
    E, K, N, M = len(cl), 64, 48, sum(cl)
    x0 = torch.randn(M, K, device=DEVICE)
    w0 = torch.randn(E, N, K, device=DEVICE) * 0.05
    g = torch.randn(M, N, device=DEVICE)
    cfg = Fp8Config(recipe, "e4m3", backend="emulate")
    x1, w1 = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    y_loop = _looped_linear(x1, w1, cl, cfg)
    dx_loop, dw_loop = torch.autograd.grad(y_loop, (x1, w1), g)

    plan = fg.group_plan(counts, M)
    res = {}
    for mode in fg.WGRAD_MODES:
        x2, w2 = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fg.scaled_grouped_linear(x2, w2, plan, recipe, wgrad=mode)
        assert y.shape == (M, N) and y.dtype == torch.float32 and torch.isfinite(y).all()
        res[mode] = (y, *torch.autograd.grad(y, (x2, w2), g))
    assert ref_op.calls == 2 * 2 + 1   # per mode: forward + dgrad; the fp8 wgrad once
    for mode, (y, dx, dw) in res.items():
        assert _rel(y, y_loop) < 5e-3             # same scales; the grouped op rounds its output to bf16
        assert _rel(dx, dx_loop) < 5e-3
        assert dw.shape == w0.shape and dw.dtype == w0.dtype and torch.isfinite(dw).all()
        for e, c in enumerate(cl):
            if c == 0:
                assert (dw[e] == 0).all()
    # fp8 wgrad: the rowwise/tensorwise wgrad scaling of the loop (per expert & channel over tokens)
    assert _rel(res["fp8"][2], dw_loop) < 5e-3
    # bf16 wgrad: the exact per-expert product of the bf16-rounded operands
    exact = torch.zeros_like(w0)
    for e, (ge, xe) in enumerate(zip(torch.split(g, cl), torch.split(x0, cl))):
        exact[e] = ge.bfloat16().float().t() @ xe.bfloat16().float()
    assert _rel(res["bf16"][2], exact) < 1e-2
    assert _rel(res["bf16"][2], dw_loop) < 5e-2  # the loop's wgrad is FP8


def test_grouped_linear_argument_errors(ref_op):
    plan = fg.group_plan(torch.tensor([3, 5], device=DEVICE), 8)
    x, w = torch.randn(8, 32, device=DEVICE), torch.randn(2, 16, 32, device=DEVICE)
    with pytest.raises(ValueError, match="recipe"):
        fg.scaled_grouped_linear(x, w, plan, "blockwise")
    with pytest.raises(ValueError, match="wgrad"):
        fg.scaled_grouped_linear(x, w, plan, "rowwise", wgrad="fp16")
    with pytest.raises(ValueError, match="do not match"):
        fg.scaled_grouped_linear(x, w[:1], plan, "rowwise")
    with pytest.raises(ValueError, match="do not match"):
        fg.scaled_grouped_linear(x[:, :16], w, plan, "rowwise")


# ------------------------------------------------------------------------------------------------
# Fp8GroupedExperts on the grouped path
# ------------------------------------------------------------------------------------------------
def _experts(E, D, inter, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    m = GroupedExperts(E, D, inter, init_std=0.05).to(DEVICE, dtype)
    m.reset_parameters()
    return m


def _run(m, x, counts, g, grouped: bool):
    xi = x.clone().requires_grad_()
    y = m._forward_scaled_grouped(xi, counts) if grouped else m(xi, counts)
    y.backward(g)
    return y.detach(), xi.grad, m.w1.grad, m.w2.grad, m.w3.grad


@pytest.mark.parametrize("name", list(COUNTS))
@pytest.mark.parametrize("wgrad", fg.WGRAD_MODES)
@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_experts_grouped_vs_looped_and_fp32(recipe, wgrad, name, ref_op):
    counts = _counts(name)
    cl = COUNTS[name]
    E, D, inter, M = len(cl), 64, 48, sum(cl)
    base = _experts(E, D, inter, seed=1)
    torch.manual_seed(2)
    x = torch.randn(M, D, device=DEVICE)
    g = torch.randn(M, D, device=DEVICE)
    cfg = Fp8Config(recipe, "e4m3", backend="emulate")
    grouped = Fp8GroupedExperts.convert(copy.deepcopy(base), cfg, "ex")
    grouped.scaled_grouped_wgrad = wgrad
    looped = Fp8GroupedExperts.convert(copy.deepcopy(base), cfg, "ex")
    out_g = _run(grouped, x, counts, g, grouped=True)
    assert ref_op.calls == 4 + (2 if wgrad == "fp8" else 0)
    out_l = _run(looped, x, counts, g, grouped=False)
    assert ref_op.calls == 4 + (2 if wgrad == "fp8" else 0)   # the loop does not use the grouped op
    out_r = _run(copy.deepcopy(base), x, counts, g, grouped=False)   # fp32 GroupedExperts
    names = ("y", "dx", "dw1", "dw2", "dw3")
    busy = [e for e, c in enumerate(cl) if c > 0]
    for n, a, lo, r in zip(names, out_g, out_l, out_r):
        assert a.shape == r.shape and a.dtype == r.dtype and torch.isfinite(a).all(), n
        if n.startswith("dw"):
            for e, c in enumerate(cl):
                if c == 0:
                    assert (a[e] == 0).all(), (n, e)        # an expert without tokens: exactly no gradient
            a, lo, r = a[busy], lo[busy], r[busy]
        tol_loop = 3e-2 if (n in ("y", "dx") or wgrad == "fp8") else 6e-2   # bf16 wgrad vs the loop's FP8 wgrad
        assert _rel(a, lo) < tol_loop, n
        assert _rel(a, r) < 1e-1, n


def test_experts_path_selection(ref_op, monkeypatch):
    """forward() takes the grouped path exactly when the backend is scaled_mm, grouped kernels are on and the
    support check passes (forced here: CPU never supports the real op)."""
    counts = _counts("odd")
    M, D = int(counts.sum()), 64
    m = Fp8GroupedExperts.convert(_experts(4, D, 48, seed=3), Fp8Config("rowwise", "e4m3", backend="emulate"), "ex")
    x = torch.randn(M, D, device=DEVICE)
    if DEVICE.type == "cpu":
        assert not fg.scaled_grouped_mm_supported(x, 4, D, 48)
        assert not m._scaled_grouped_ok(x, "scaled_mm")
    y_loop = m(x, counts)
    assert ref_op.calls == 0                                   # emulate backend: the loop
    monkeypatch.setattr(fg, "scaled_grouped_mm_supported", lambda *a: True)
    m.fp8_config = Fp8Config("rowwise", "e4m3", backend="scaled_mm")
    y = m(x, counts)
    assert ref_op.calls == 2                                   # two grouped forward GEMMs
    assert _rel(y, y_loop) < 2e-2
    m.grouped_kernels = False
    assert not m._scaled_grouped_ok(x, "scaled_mm")
    m.grouped_kernels = True
    assert m._scaled_grouped_ok(x, "scaled_mm") and not m._scaled_grouped_ok(x, "emulate")
    m.fp8_config = Fp8Config("blockwise", backend="emulate")
    assert not m._scaled_grouped_ok(x, "scaled_mm")


def test_support_predicates():
    x = torch.randn(5, 64)
    assert fg._arch_ok((9, 0))
    assert not fg._arch_ok((8, 9)) and not fg._arch_ok((10, 0)) and not fg._arch_ok((12, 0))
    assert fg._shape_ok(x, 8, (64, 1408))
    assert fg._shape_ok(x.bfloat16(), 1, (16,))
    assert not fg._shape_ok(x, 8, (64, 40))                  # a dim not a multiple of 16
    assert not fg._shape_ok(x[:0], 8, (64,))                 # empty input: the loop handles it
    assert not fg._shape_ok(x, 0, (64,)) and not fg._shape_ok(x, 1024, (64,))
    assert not fg._shape_ok(x.to(torch.int32), 8, (64,))
    assert not fg.scaled_grouped_mm_supported(x, 8, 64)        # CPU


def test_experts_empty_input_falls_back(ref_op, monkeypatch):
    m = Fp8GroupedExperts.convert(_experts(4, 64, 48, seed=4), Fp8Config("rowwise", backend="emulate"), "ex")
    y = m(torch.zeros(0, 64, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE))
    assert y.shape == (0, 64) and ref_op.calls == 0


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_experts_bf16_dtypes_and_partial_grads(recipe, ref_op):
    counts = _counts("odd")
    M, D = int(counts.sum()), 64
    base = _experts(4, D, 48, seed=5, dtype=torch.bfloat16)
    m = Fp8GroupedExperts.convert(copy.deepcopy(base), Fp8Config(recipe, backend="emulate"), "ex")
    x = torch.randn(M, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = m._forward_scaled_grouped(x, counts)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and all(w.grad.dtype == torch.bfloat16 for w in (m.w1, m.w2, m.w3))
    assert _rel(y, base(x.detach(), counts)) < 1e-1
    # weights frozen: only dx; input without grad: only weight grads
    for w in (m.w1, m.w2, m.w3):
        w.grad = None
        w.requires_grad_(False)
    x2 = x.detach().clone().requires_grad_()
    m._forward_scaled_grouped(x2, counts).float().sum().backward()
    assert x2.grad is not None and m.w1.grad is None
    for w in (m.w1, m.w2, m.w3):
        w.requires_grad_(True)
    m._forward_scaled_grouped(x.detach(), counts).float().sum().backward()
    assert all(w.grad is not None for w in (m.w1, m.w2, m.w3))


# ------------------------------------------------------------------------------------------------
# GPU: the real torch._scaled_grouped_mm
# ------------------------------------------------------------------------------------------------
def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.gpu
@gpu
@pytest.mark.skipif(not _sm90(), reason="torch._scaled_grouped_mm FP8 rowwise kernel is sm90-only")
@pytest.mark.parametrize("wgrad", fg.WGRAD_MODES)
@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_gpu_scaled_grouped_matches_looped_scaled_mm(recipe, wgrad, monkeypatch):
    """Real sizes: 8 experts, 4093 rows (odd counts, an empty expert), dim 2048, inter 1408, bf16 weights.
    The grouped path (asserted taken) vs the per-expert torch._scaled_mm loop and vs fp32."""
    E, D, inter = 8, 2048, 1408
    cl = [1000, 0, 3, 999, 1, 517, 1570, 3]
    assert sum(cl) == 4093
    counts = torch.tensor(cl, device="cuda")
    op = _Counting(fg._grouped_op)
    monkeypatch.setattr(fg, "_grouped_op", op)
    torch.manual_seed(7)
    base = GroupedExperts(E, D, inter, init_std=0.02).to("cuda", torch.bfloat16)
    base.reset_parameters()
    x = torch.randn(sum(cl), D, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(sum(cl), D, device="cuda", dtype=torch.bfloat16)
    cfg = Fp8Config(recipe, "e4m3")
    grouped = Fp8GroupedExperts.convert(copy.deepcopy(base), cfg, "ex")
    grouped.scaled_grouped_wgrad = wgrad
    assert grouped._scaled_grouped_ok(x, "scaled_mm")
    looped = Fp8GroupedExperts.convert(copy.deepcopy(base), cfg, "ex")
    looped.grouped_kernels = False
    out_g = _run(grouped, x, counts, g, grouped=False)          # plain forward(): must select the grouped path
    assert op.calls == 4 + (2 if wgrad == "fp8" else 0)
    out_l = _run(looped, x, counts, g, grouped=False)
    assert op.calls == 4 + (2 if wgrad == "fp8" else 0)
    ref = copy.deepcopy(base).float()
    out_r = _run(ref, x.float(), counts, g.float(), grouped=False)
    busy = [e for e, c in enumerate(cl) if c > 0]
    for n, a, lo, r in zip(("y", "dx", "dw1", "dw2", "dw3"), out_g, out_l, out_r):
        assert torch.isfinite(a).all() and a.dtype == lo.dtype, n
        if n.startswith("dw"):
            assert (a[1] == 0).all(), n
            a, lo, r = a[busy], lo[busy], r[busy]
        assert _rel(a, lo) < (3e-2 if (n in ("y", "dx") or wgrad == "fp8") else 6e-2), n
        assert _rel(a, r) < 1e-1, n


@pytest.mark.gpu
@gpu
@pytest.mark.skipif(not _sm90(), reason="torch._scaled_grouped_mm FP8 rowwise kernel is sm90-only")
@pytest.mark.parametrize("wgrad", fg.WGRAD_MODES)
def test_gpu_scaled_grouped_no_host_sync(wgrad):
    """Forward and backward of the grouped path issue no device-to-host synchronisation."""
    counts = torch.tensor([300, 0, 17, 195], device="cuda")
    m = Fp8GroupedExperts.convert(_experts(4, 256, 128, seed=8, dtype=torch.bfloat16), "rowwise", "ex")
    m.scaled_grouped_wgrad = wgrad
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    m(x, counts).float().sum().backward()   # warm-up (allocator, kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = m(x, counts)
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all()
