"""train.optimizer_impl: which AdamW implementation build_optimizer picks, and bad values; NativeEngine.step's
clipping with torch's fused AdamW (the coefficient handed to the fused step as ``optimizer.grad_scale``)."""
import pytest
import torch

from moetrain.config import ConfigError, load_config
from moetrain.parallel.engine import NativeEngine
from moetrain.parallel.grad_sync import clip_grad_norm
from moetrain.parallel.mesh import DistContext
from moetrain.train import build_optimizer


def _cfg(**train):
    return load_config(None, [f"train.{k}={v}" for k, v in train.items()])


def _flags(opt):
    return {(g["foreach"], g["fused"]) for g in opt.param_groups}


def test_auto_is_foreach_on_cpu():
    model = torch.nn.Linear(4, 3)
    assert _flags(build_optimizer(model, _cfg())) == {(True, None)}


def test_forced_fused_and_foreach():
    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(model, _cfg(optimizer_impl="fused"))  # torch has a fused AdamW on CPU too
    assert _flags(opt) == {(False, True)}
    x = torch.randn(2, 4)
    model(x).sum().backward()
    ref = torch.nn.Linear(4, 3)
    ref.load_state_dict(model.state_dict())
    ref_opt = build_optimizer(ref, _cfg(optimizer_impl="foreach"))
    ref(x).sum().backward()
    opt.step()
    ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bad_value_is_a_config_error():
    with pytest.raises(ConfigError, match="optimizer_impl"):
        _cfg(optimizer_impl="adam8bit")


# --- NativeEngine.step with torch's fused AdamW: the clip coefficient goes in as optimizer.grad_scale -----------

CLIP = 1.0
GRAD_SIZES = (1.0, 0.01, 0.2, 0.005, 3.0, 0.02)  # global norms about 30, 0.3, 6, 0.15, 90, 0.6 (CLIP 1)


def _model_and_opt(impl: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    return model, build_optimizer(model, _cfg(optimizer_impl=impl, weight_decay=0.1, lr=1e-2))


def _set_grads(model, step: int, size: float, poison=None):
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=g) * size
        if poison is not None and i == 0:
            p.grad[0, 0] = poison


def _old_step(model, opt, clip: float):
    """The path before: clip_grad_norm multiplies every gradient, then the optimizer steps."""
    norm = clip_grad_norm(model, clip, DistContext())
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def _assert_same_state(model_a, opt_a, model_b, opt_b, rtol, equal_nan=False):
    """Parameters and Adam moments equal to ``rtol`` of each tensor's largest magnitude (0: bit for bit)."""
    def close(a, b):
        atol = rtol * b.detach().abs().nan_to_num(0, 0, 0).max().item()
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        close(a, b)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            close(opt_a.state[a][k], opt_b.state[b][k])


def _spy_step(opt, seen: list, raise_exc=None):
    """Wraps opt.step: records grad_scale / found_inf and the gradients the step left behind."""
    inner = opt.step

    def step(*a, **k):
        seen.append({"grad_scale": getattr(opt, "grad_scale", None), "found_inf": getattr(opt, "found_inf", None)})
        if raise_exc is not None:
            raise raise_exc
        out = inner(*a, **k)
        seen[-1]["grads"] = [p.grad.clone() for g in opt.param_groups for p in g["params"]]
        return out
    opt.step = step


def test_fused_clip_goes_into_the_fused_step_and_matches_the_multiply_path():
    model, opt = _model_and_opt("fused")
    ref, ref_opt = _model_and_opt("fused")
    assert _flags(opt) == {(False, True)}
    engine = NativeEngine(model, model, opt, lambda: None, DistContext(), accum=1, grad_clip=CLIP)
    seen, ref_seen = [], []
    _spy_step(opt, seen)
    _spy_step(ref_opt, ref_seen)
    norms, ref_norms = [], []
    for step, size in enumerate(GRAD_SIZES):
        _set_grads(model, step, size)
        _set_grads(ref, step, size)
        norms.append(engine.step())
        ref_norms.append(_old_step(ref, ref_opt, CLIP))
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
        assert all(p.grad is None for p in model.parameters())
        _assert_same_state(model, opt, ref, ref_opt, rtol=1e-6)
    assert any(n > CLIP for n in norms) and any(n < CLIP for n in norms)  # clipping active and inactive
    for n, r, s, rs in zip(norms, ref_norms, seen, ref_seen):
        assert torch.equal(n, r)  # the pre-clip norm is the same tensor value
        coef = min(1.0, CLIP / (r.item() + 1e-6))
        assert s["found_inf"] is None and s["grad_scale"].dtype == torch.float32
        torch.testing.assert_close(s["grad_scale"], torch.tensor(1 / coef), rtol=1e-6, atol=0)
        assert rs["grad_scale"] is None  # the old path: no grad_scale, gradients multiplied beforehand
        # the fused kernel writes the divided (= clipped) gradients back to .grad: the old path's values
        for g, rg in zip(s["grads"], rs["grads"]):
            torch.testing.assert_close(g, rg, rtol=1e-6, atol=0)


def test_fused_clip_grad_scale_is_removed_when_the_step_raises():
    model, opt = _model_and_opt("fused")
    engine = NativeEngine(model, model, opt, lambda: None, DistContext(), accum=1, grad_clip=CLIP)
    seen = []
    _spy_step(opt, seen, raise_exc=RuntimeError("boom"))
    _set_grads(model, 0, 30.0)
    with pytest.raises(RuntimeError, match="boom"):
        engine.step()
    assert seen[0]["grad_scale"] is not None and seen[0]["found_inf"] is None
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_fused_clip_non_finite_norm_behaves_as_the_multiply_path(poison):
    """NaN norm: coef NaN, every gradient NaN (params and moments all NaN). inf norm: coef 0, finite gradients
    0 and the inf one NaN (its parameter entry NaN, the others take a step on zero gradients). Both paths."""
    model, opt = _model_and_opt("fused")
    ref, ref_opt = _model_and_opt("fused")
    engine = NativeEngine(model, model, opt, lambda: None, DistContext(), accum=1, grad_clip=CLIP)
    _set_grads(model, 0, 1.0)
    _set_grads(ref, 0, 1.0)
    engine.step()
    _old_step(ref, ref_opt, CLIP)
    _set_grads(model, 1, 1.0, poison=poison)
    _set_grads(ref, 1, 1.0, poison=poison)
    norm = engine.step()
    ref_norm = _old_step(ref, ref_opt, CLIP)
    assert not hasattr(opt, "grad_scale")
    torch.testing.assert_close(norm, ref_norm, equal_nan=True)
    assert not torch.isfinite(norm)
    _assert_same_state(model, opt, ref, ref_opt, rtol=1e-6, equal_nan=True)
    first = next(model.parameters())
    if poison != poison:  # NaN
        assert all(p.isnan().all() for p in model.parameters())
    else:
        assert first[0, 0].isnan() and first.isnan().sum() == 1
        assert all(p.isfinite().all() for p in list(model.parameters())[1:])


@pytest.mark.parametrize("impl,clip", [("foreach", CLIP), ("fused", 0.0)])
def test_non_fused_or_unclipped_step_is_the_multiply_path(impl, clip):
    """foreach AdamW (or grad_clip=0): clip_grad_norm then step, bit for bit, and no grad_scale."""
    model, opt = _model_and_opt(impl)
    ref, ref_opt = _model_and_opt(impl)
    engine = NativeEngine(model, model, opt, lambda: None, DistContext(), accum=1, grad_clip=clip)
    seen = []
    _spy_step(opt, seen)
    for step, size in enumerate(GRAD_SIZES):
        _set_grads(model, step, size)
        _set_grads(ref, step, size)
        assert torch.equal(engine.step(), _old_step(ref, ref_opt, clip if clip > 0 else float("inf")))
        _assert_same_state(model, opt, ref, ref_opt, rtol=0)
    assert all(s["grad_scale"] is None and s["found_inf"] is None for s in seen)
