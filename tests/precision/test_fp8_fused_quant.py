"""The fused tensorwise / rowwise quantisation kernels (kernels/fp8_rowwise.py) wired into moetrain.precision.fp8 and
fp8_grouped: the kernel path (``fp8.FUSED_QUANT = "always"``; on CPU it runs in Triton's interpreter, set up by
tests/conftest.py) must give bit-identical quantised operands, scales, outputs and gradients to the eager path
(``"never"``), and must actually be taken (call counts). The `gpu` tests check the same on CUDA, where "auto"
selects the kernels, at real sizes."""
import os

import pytest
import torch

os.environ.setdefault("MOETRAIN_FP8_AUTOTUNE", "0")

from kernels import fp8_rowwise as fr  # noqa: E402
from moetrain.precision import fp8  # noqa: E402
from moetrain.precision import fp8_grouped as fg  # noqa: E402
from moetrain.precision.fp8 import Fp8Config, fp8_linear  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = pytest.mark.skipif(DEVICE.type == "cpu" and not fr.INTERPRETED,
                                reason="kernels were imported without TRITON_INTERPRET=1")

KERNELS = ("quant_rows", "quant_cols", "quant_tensor", "quant_rows_grouped_tensorwise", "quant_cols_grouped_t")


@pytest.fixture
def calls(monkeypatch):
    """Count the kernel launchers' calls."""
    n = dict.fromkeys(KERNELS, 0)

    def wrap(name, fn):
        def f(*a, **k):
            n[name] += 1
            return fn(*a, **k)
        return f

    for name in KERNELS:
        monkeypatch.setattr(fr, name, wrap(name, getattr(fr, name)))
    return n


def _bits(t):
    if t.dtype.itemsize == 1:
        return t.view(torch.uint8)
    if t.dtype == torch.float32:
        return t.contiguous().view(torch.int32)
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.contiguous().view(torch.int16)
    return t


def _same(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    assert torch.equal(_bits(a), _bits(b)), what


def _both(monkeypatch, fn):
    monkeypatch.setattr(fp8, "FUSED_QUANT", "never")
    want = fn()
    monkeypatch.setattr(fp8, "FUSED_QUANT", "always")
    got = fn()
    return got, want


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16])
def test_quant_functions_identical(dt, monkeypatch, calls):
    torch.manual_seed(0)
    x = (torch.randn(37, 48, device=DEVICE) * torch.logspace(-6, 2, 48, device=DEVICE)).to(dt)
    x[3] = 0
    x[5, 1] = float("nan")
    w = torch.randn(2, 33, 48, device=DEVICE).to(dt)
    cases = [
        ("rowwise x", lambda od: fp8._quant_rowwise(x, od)),
        ("rowwise x^T", lambda od: fp8._quant_rowwise(x.t(), od)),
        ("tensorwise x", lambda od: fp8._quant_tensorwise(x, od)),
        ("weight rows", lambda od: fg._quant_weight(w, "rowwise")),
        ("weight cols", lambda od: fg._quant_weight(w.transpose(1, 2), "rowwise")),
        ("weight tensor", lambda od: fg._quant_weight(w, "tensorwise")),
        ("weight tensor T", lambda od: fg._quant_weight(w.transpose(1, 2), "tensorwise")),
    ]
    for od in fr.DTYPES:
        for name, f in cases:
            got, want = _both(monkeypatch, lambda: f(od))
            for a, b in zip(got, want):
                _same(a, b, f"{name} {od}")
    assert calls["quant_rows"] and calls["quant_cols"] and calls["quant_tensor"]


@pytest.mark.parametrize("cfg", [Fp8Config("tensorwise", "e4m3", backend="emulate"),
                                 Fp8Config("tensorwise", "e5m2", backend="emulate"),
                                 Fp8Config("rowwise", "e4m3", backend="emulate"),
                                 Fp8Config("rowwise", "e5m2", backend="emulate")],
                         ids=lambda c: f"{c.recipe}-{c.grad_dtype}")
def test_fp8_linear_identical(cfg, monkeypatch, calls):
    torch.manual_seed(1)
    x0 = torch.randn(3, 11, 48, device=DEVICE)
    w0 = torch.randn(32, 48, device=DEVICE) * 0.1
    g = torch.randn(3, 11, 32, device=DEVICE)

    def run():
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fp8_linear(x, w, None, cfg)
        return (y, *torch.autograd.grad(y, (x, w), g))

    got, want = _both(monkeypatch, run)
    for a, b, n in zip(got, want, ("y", "dx", "dw")):
        _same(a, b, n)
    if cfg.recipe == "rowwise":  # forward x, W; backward g, W^T (cols), g^T (cols), x^T (cols)
        assert calls["quant_rows"] == 3 and calls["quant_cols"] == 3
    else:                        # forward x, W; backward g
        assert calls["quant_tensor"] == 3


@pytest.fixture
def ref_op(monkeypatch):
    monkeypatch.setattr(fg, "_grouped_op", fg.scaled_grouped_mm_ref)


@pytest.mark.parametrize("counts", [[0, 1, 17, 33], [20, 16, 15, 0], [1, 0, 0, 0]],
                         ids=["odd", "last_empty", "single_row"])
@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_scaled_grouped_linear_identical(recipe, counts, monkeypatch, calls, ref_op):
    torch.manual_seed(2)
    E, K, N, M = len(counts), 64, 48, sum(counts)
    x0 = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
    w0 = torch.randn(E, N, K, device=DEVICE, dtype=torch.bfloat16) * 0.05
    g = torch.randn(M, N, device=DEVICE, dtype=torch.bfloat16)
    plan = fg.group_plan(torch.tensor(counts, device=DEVICE), M)

    def run(mode):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fg.scaled_grouped_linear(x, w, plan, recipe, wgrad=mode)
        return (y, *torch.autograd.grad(y, (x, w), g))

    for mode in fg.WGRAD_MODES:
        got, want = _both(monkeypatch, lambda: run(mode))
        for a, b, n in zip(got, want, ("y", "dx", "dw")):
            _same(a, b, f"{mode} {n}")
    # the padded operands themselves
    for t in (x0, g):
        got, want = _both(monkeypatch, lambda: fg._quant_rows_padded(t, plan, recipe))
        for a, b in zip(got, want):
            _same(a, b, "rows padded")
        got, want = _both(monkeypatch, lambda: fg._quant_cols_padded_t(t, plan, recipe))
        for a, b in zip(got, want):
            _same(a, b, "cols padded t")
    if recipe == "rowwise":
        assert calls["quant_rows"] and calls["quant_cols"]
    else:
        assert calls["quant_rows_grouped_tensorwise"] and calls["quant_tensor"]
    assert calls["quant_cols_grouped_t"]


def test_cpu_default_stays_eager(calls):
    """FUSED_QUANT "auto" never takes the kernels for CPU tensors (the CPU / emulate path stays the reference)."""
    assert fp8.FUSED_QUANT == "auto"
    x = torch.randn(8, 16)
    fp8._quant_rowwise(x)
    fp8._quant_tensorwise(x)
    assert not any(calls.values())
    assert fp8._rowwise_kernels(torch.randn(0, 16, device=DEVICE)) is None


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("grad_dtype", ["e4m3", "e5m2"])
def test_gpu_fp8_linear_uses_kernels_identical(recipe, grad_dtype, monkeypatch, calls):
    torch.manual_seed(3)
    cfg = Fp8Config(recipe, grad_dtype)
    x0 = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    w0 = torch.randn(7168, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    g = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16)

    def run():
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fp8_linear(x, w, None, cfg)
        return (y, *torch.autograd.grad(y, (x, w), g))

    monkeypatch.setattr(fp8, "FUSED_QUANT", "never")
    want = run()
    monkeypatch.setattr(fp8, "FUSED_QUANT", "auto")
    got = run()
    assert sum(calls.values()) == (6 if recipe == "rowwise" else 3)
    for a, b, n in zip(got, want, ("y", "dx", "dw")):
        _same(a, b, n)


@pytest.mark.gpu
@gpu
@pytest.mark.skipif(not _sm90(), reason="torch._scaled_grouped_mm FP8 rowwise kernel is sm90-only")
@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_gpu_scaled_grouped_linear_uses_kernels_identical(recipe, monkeypatch, calls):
    """8 experts x 16333 rows x 2048 -> 7168 (an empty expert): identical to the eager quantisation."""
    cl = [4001, 0, 3, 2999, 1, 5000, 4327, 2]
    M, K, N = sum(cl), 2048, 7168
    torch.manual_seed(4)
    x0 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w0 = torch.randn(8, N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    plan = fg.group_plan(torch.tensor(cl, device="cuda"), M)

    def run(mode):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fg.scaled_grouped_linear(x, w, plan, recipe, wgrad=mode)
        return (y, *torch.autograd.grad(y, (x, w), g))

    for mode in fg.WGRAD_MODES:
        monkeypatch.setattr(fp8, "FUSED_QUANT", "never")
        want = run(mode)
        monkeypatch.setattr(fp8, "FUSED_QUANT", "auto")
        got = run(mode)
        for a, b, n in zip(got, want, ("y", "dx", "dw")):
            _same(a, b, f"{mode} {n}")
    assert calls["quant_cols_grouped_t"] == 2
