"""moetrain/precision/fp8_experts_cublas.py: blockwise routed experts with one cuBLAS block-scaled GEMM per expert.

On CPU the cuBLAS call is stood in for by test_fp8_cublas's ``_contract_mm`` (it accepts only the layouts cuBLAS
documents and computes in fp32), installed as the "passed" result of fp8_cublas's one-time check; the quantisers
and the Triton grouped path it is compared with run under the interpreter. On a GPU (``gpu`` marker) the real
cuBLAS path is compared with the grouped Triton kernels at real sizes.
"""
import copy
import os

import pytest
import torch

os.environ.setdefault("MOETRAIN_FP8_AUTOTUNE", "0")

from kernels import fp8_quant  # noqa: E402
from moetrain.model.moe import GroupedExperts  # noqa: E402
from moetrain.precision import fp8_cublas, fp8_experts_cublas as pe  # noqa: E402
from moetrain.precision.fp8 import Fp8Config, Fp8GroupedExperts  # noqa: E402
from tests.precision.test_fp8_cublas import _contract_mm  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
interpreted = pytest.mark.skipif(not fp8_quant.INTERPRETED, reason="CPU tests: need TRITON_INTERPRET=1 (the CPU suite)")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _experts(E, D, inter, seed, device="cpu", dtype=torch.float32):
    torch.manual_seed(seed)
    m = GroupedExperts(E, D, inter, init_std=0.05).to(device, dtype)
    m.reset_parameters()
    return m


@pytest.fixture
def contract_cublas(monkeypatch):
    """fp8_cublas's check 'passed' on the CPU with the documented-layout stand-in (partial blocks allowed)."""
    monkeypatch.setitem(fp8_cublas._STATUS, "cpu", (("contract", _contract_mm, True), True, "test stand-in"))


def test_expert_plan_layout():
    counts = torch.tensor([0, 130, 3, 1, 200, 0])
    plan = pe.expert_plan(counts, 334)
    assert plan.counts == [0, 130, 3, 1, 200, 0]
    assert plan.tile_off == [0, 0, 2, 3, 4, 6, 6] == plan.tiles.group_tile_start.tolist()
    assert plan.row_off == [0, 0, 130, 133, 134, 334, 334]
    with pytest.raises(ValueError, match="sum to the 333 rows"):
        pe.expert_plan(counts, 333)


def test_expert_plan_takes_the_dispatchers_host_counts(monkeypatch):
    """Counts attached by the dispatcher are used as they are (no read of the tensor), and still checked."""
    from moetrain.model.dispatch import attach_host_counts
    counts = torch.tensor([2, 0, 3])

    def no_read(*a, **k):
        raise AssertionError("read the device tensor")
    attach_host_counts(counts, [2, 0, 3])
    monkeypatch.setattr(torch.Tensor, "tolist", no_read)
    assert pe.expert_plan(counts, 5).row_off == [0, 2, 2, 5]
    monkeypatch.undo()
    attach_host_counts(counts, [2, 0, 4])
    with pytest.raises(ValueError, match="sum to the 5 rows"):
        pe.expert_plan(counts, 5)


def test_not_usable_without_the_check():
    assert not pe.usable(torch.device("cpu"), (256, 128))          # no CUDA: fp8_cublas's check did not pass


@interpreted
def test_usable_dims(contract_cublas):
    assert pe.usable(torch.device("cpu"), (256, 128)) and pe.usable(torch.device("cpu"), (272, 48))
    assert not pe.usable(torch.device("cpu"), (256, 40))             # 40: not a multiple of 16


@interpreted
@pytest.mark.parametrize("counts", [[0, 130, 3, 1, 200, 0], [257], [5, 0, 0]])
def test_per_expert_matches_grouped_kernels(contract_cublas, counts):
    """Output and every gradient equal the grouped Triton path's (same quantisation, fp32 accumulation: only the
    order differs), at odd and zero per-expert counts; the stand-in rejects any layout cuBLAS would not take."""
    c = torch.tensor(counts)
    M = sum(counts)
    base = _experts(len(counts), 256, 144, seed=3)   # D = 256, I = 144 (a partial 128-block), 2I = 288
    x = torch.randn(M, 256)
    res = []
    for cfg in (Fp8Config("blockwise", backend="scaled_mm", expert_gemm="per_expert"),
                Fp8Config("blockwise", backend="triton")):
        m = Fp8GroupedExperts.convert(copy.deepcopy(base), cfg, "ex")
        assert m._per_expert_cublas_ok(x, cfg.backend) == (cfg.expert_gemm == "per_expert")
        xi = x.clone().requires_grad_()
        y = m(xi, c)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        res.append((y, xi.grad, m.w1.grad, m.w2.grad, m.w3.grad))
    for name, a, b in zip(("y", "dx", "dw1", "dw2", "dw3"), *res):
        assert a.shape == b.shape and torch.isfinite(a).all(), name
        assert _rel(a, b) < 1e-3, (name, _rel(a, b))   # the requantised hidden: rare 1-ulp fp8 flips
    for e, n in enumerate(counts):
        if n == 0:
            assert (res[0][2][e] == 0).all() and (res[0][3][e] == 0).all()


@interpreted
def test_one_gemm_and_its_gradients_match_grouped_kernels(contract_cublas):
    """One GEMM (no requantised hidden in between): y, dx and dW equal kernels.fp8_gemm's grouped GEMMs on the
    same quantised operands, to fp32 rounding."""
    from kernels import fp8_gemm
    counts = torch.tensor([0, 130, 3, 1, 200, 0])
    M, N, K = 334, 272, 256
    torch.manual_seed(5)
    x = torch.randn(M, K, requires_grad=True)
    w = (torch.randn(6, N, K) * 0.05).requires_grad_()
    g = torch.randn(M, N)
    plan = pe.expert_plan(counts, M)
    y = pe.PerExpertBlockwiseFn.apply(x, w, None, plan, torch.float32)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    tiles = plan.tiles
    xq, xs, xtq, xts = fp8_quant.quant_1x128_with_transpose_grouped(x.detach(), tiles)
    wq, ws = fp8_quant.quant_128x128(w.detach())
    gq, gs, gtq, gts = fp8_quant.quant_1x128_with_transpose_grouped(g, tiles)
    y_ref = fp8_gemm.fp8_gemm_grouped(xq, xs, wq, ws, tiles, torch.float32)
    dx_ref = fp8_gemm.fp8_gemm_grouped(gq, gs, wq.transpose(1, 2).contiguous(), ws.transpose(1, 2).contiguous(),
                                       tiles, torch.float32)
    dw_ref = fp8_gemm.fp8_gemm_grouped_wgrad(gtq, gts, xtq, xts, tiles)
    for name, a, b in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
        assert _rel(a, b) < 1e-6, (name, _rel(a, b))


@interpreted
def test_per_expert_counts_must_sum_to_rows(contract_cublas):
    m = Fp8GroupedExperts.convert(_experts(2, 128, 128, seed=4),
                                  Fp8Config("blockwise", backend="scaled_mm", expert_gemm="per_expert"), "ex")
    with pytest.raises(ValueError, match="sum to the 5 rows"):
        m(torch.randn(5, 128), torch.tensor([2, 2]))


def test_config_rejects_unknown_expert_gemm():
    with pytest.raises(ValueError, match="expert_gemm"):
        Fp8Config("blockwise", expert_gemm="looped")


@pytest.mark.gpu
@gpu
def test_gpu_per_expert_matches_grouped_kernels():
    """The real cuBLAS path at DeepSeek-like widths against the grouped Triton kernels, forward and gradients."""
    counts = torch.tensor([4001, 0, 3, 2999, 1, 5000, 4327, 2], device="cuda")
    base = _experts(8, 2048, 1408, seed=9, device="cuda")
    x = torch.randn(int(counts.sum()), 2048, device="cuda", dtype=torch.bfloat16)
    res = []
    for gemm in ("per_expert", "grouped"):
        m = Fp8GroupedExperts.convert(copy.deepcopy(base), Fp8Config("blockwise", expert_gemm=gemm), "ex")
        assert m._per_expert_cublas_ok(x, "scaled_mm") == (gemm == "per_expert")
        xi = x.clone().requires_grad_()
        y = m(xi, counts)
        g = torch.randn(y.shape, generator=torch.Generator("cuda").manual_seed(0), device="cuda", dtype=y.dtype)
        y.backward(g)
        res.append((y, xi.grad, m.w1.grad, m.w2.grad, m.w3.grad))
    for name, a, b in zip(("y", "dx", "dw1", "dw2", "dw3"), *res):
        assert torch.isfinite(a).all() and _rel(a, b) < 1e-2, (name, _rel(a, b))
    assert (res[0][2][1] == 0).all()


def test_apply_fp8_passes_expert_gemm():
    from moetrain.precision.fp8 import apply_fp8
    model = torch.nn.ModuleDict({"experts": _experts(2, 128, 128, seed=6), "proj": torch.nn.Linear(128, 128)})
    names = apply_fp8(model, "blockwise", expert_gemm="per_expert")
    assert names == ["experts", "proj"]
    assert model["experts"].fp8_config.expert_gemm == "per_expert"


def test_run_log_says_when_per_expert_has_no_effect():
    from moetrain.precision.fp8 import describe_backend
    cpu = torch.device("cpu")
    for recipe, why in (("blockwise", "it needs cuBLAS's block-scaled GEMMs (Hopper)"),
                        ("rowwise", "it applies to the blockwise recipe only")):
        line = describe_backend(Fp8Config(recipe, expert_gemm="per_expert"), cpu)
        assert line.endswith(f"; fp8_expert_gemm=per_expert has no effect here: {why}"), line
    assert "no effect" not in describe_backend(Fp8Config("blockwise"), cpu)


@interpreted
def test_run_log_names_the_per_expert_path(contract_cublas):
    from moetrain.precision.fp8 import describe_backend
    line = describe_backend(Fp8Config("blockwise", backend="scaled_mm", expert_gemm="per_expert"), torch.device("cpu"))
    assert "routed experts on one cuBLAS block-scaled GEMM per expert" in line and "no effect" not in line


@pytest.mark.parametrize("gemm,backend,want", [("grouped", "scaled_mm", False), ("per_expert", "scaled_mm", True),
                                                ("auto", "scaled_mm", True), ("auto", "triton", False)])
def test_apply_fp8_prefetches_the_counts_where_per_expert_can_run(contract_cublas, gemm, backend, want):
    """The MoE layers' host-count prefetch is on only where the per-expert cuBLAS path can run."""
    from moetrain.model import MoE, ModelArgs
    from moetrain.precision.fp8 import apply_fp8
    args = ModelArgs(dim=128, moe_inter_dim=128, n_routed_experts=4, n_activated_experts=2, n_shared_experts=1)
    layer = torch.nn.ModuleDict({"moe": MoE(args)})
    apply_fp8(layer, Fp8Config("blockwise", backend=backend, expert_gemm=gemm))
    assert layer["moe"].dispatcher.prefetch_host_counts is want


def test_apply_fp8_prefetch_off_without_cublas():
    from moetrain.model import MoE, ModelArgs
    from moetrain.precision.fp8 import apply_fp8
    args = ModelArgs(dim=128, moe_inter_dim=128, n_routed_experts=4, n_activated_experts=2, n_shared_experts=1)
    layer = torch.nn.ModuleDict({"moe": MoE(args)})
    apply_fp8(layer, "blockwise", expert_gemm="per_expert")       # CPU: no cuBLAS block-scaled GEMMs
    assert layer["moe"].dispatcher.prefetch_host_counts is False


def test_auto_takes_per_expert_only_with_host_counts_and_enough_rows(contract_cublas):
    """expert_gemm="auto": the per-expert path needs the counts attached on the host (no sync of its own) and
    >= AUTO_MIN_ROWS_PER_EXPERT rows per expert on average; "per_expert" needs neither."""
    from moetrain.model.dispatch import attach_host_counts
    from moetrain.precision.fp8 import AUTO_MIN_ROWS_PER_EXPERT as MIN
    auto = Fp8GroupedExperts.convert(_experts(2, 128, 128, seed=7),
                                     Fp8Config("blockwise", backend="scaled_mm", expert_gemm="auto"), "ex")
    forced = Fp8GroupedExperts.convert(_experts(2, 128, 128, seed=7),
                                       Fp8Config("blockwise", backend="scaled_mm", expert_gemm="per_expert"), "ex")
    big, small = torch.empty(2 * MIN, 128), torch.empty(2 * MIN - 1, 128)
    bare = torch.tensor([MIN, MIN])
    attached = attach_host_counts(torch.tensor([MIN, MIN]), [MIN, MIN])
    short = attach_host_counts(torch.tensor([MIN, MIN - 1]), [MIN, MIN - 1])
    assert auto._per_expert_cublas_ok(big, "scaled_mm", attached)
    assert not auto._per_expert_cublas_ok(big, "scaled_mm", bare)          # would need a sync of its own
    assert not auto._per_expert_cublas_ok(small, "scaled_mm", short)       # too few rows per expert
    assert not auto._per_expert_cublas_ok(big, "triton", attached)
    assert forced._per_expert_cublas_ok(small, "scaled_mm", bare)


def test_default_is_auto():
    from moetrain.config import PrecisionConfig
    assert Fp8Config().expert_gemm == "auto" == PrecisionConfig().fp8_expert_gemm


@interpreted
@pytest.mark.parametrize("path", ["per_expert", "grouped"])
def test_w1_w3_pair_equals_their_concatenation(contract_cublas, path):
    """W1 and W3 quantised into the halves of one operand (no fp32 concatenation) give the same output and
    gradients as the concatenated weight, bit for bit (the same 128x128 blocks), on both routed-expert paths; the
    weight gradients come back as the two halves."""
    from moetrain.precision.fp8 import _GroupedBlockwiseFn
    counts = torch.tensor([130, 0, 3])
    M, I, D = 133, 128, 256
    torch.manual_seed(8)
    x = torch.randn(M, D)
    w1, w3 = (torch.randn(3, I, D) * 0.05 for _ in range(2))
    g = torch.randn(M, 2 * I)
    if path == "per_expert":
        plan = pe.expert_plan(counts, M)

        def fn(a, u, v):
            return pe.PerExpertBlockwiseFn.apply(a, u, v, plan, torch.float32)
    else:
        tiles = fp8_quant.grouped_tiles(counts, M)

        def fn(a, u, v):
            return _GroupedBlockwiseFn.apply(a, u, v, tiles, torch.float32)
    res = []
    for pair in (True, False):
        xi, a, b = (t.clone().requires_grad_() for t in (x, w1, w3))
        y = fn(xi, a, b) if pair else fn(xi, torch.cat([a, b], 1), None)
        y.backward(g)
        res.append((y, xi.grad, a.grad, b.grad))
    for name, p, c in zip(("y", "dx", "dw1", "dw3"), *res):
        assert torch.equal(p, c), name
    assert res[0][2].shape == (3, I, D)
