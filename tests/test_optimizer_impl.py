"""train.optimizer_impl: which AdamW implementation build_optimizer picks, and bad values."""
import pytest
import torch

from moetrain.config import ConfigError, load_config
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
