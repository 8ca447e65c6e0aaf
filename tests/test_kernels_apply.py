"""Triton kernels swapped into the model from outside give the same forward and gradients."""
import copy

import pytest
import torch


from omegaconf import OmegaConf  # noqa: E402

from moetrain.kernels_apply import OPS, FusedRMSNorm, apply_kernels, triton_unavailable  # noqa: E402
from moetrain.model.args import ModelArgs  # noqa: E402
from moetrain.model.transformer import Transformer  # noqa: E402

ALL_ON = OmegaConf.create({op: True for op in OPS})
# the kernels on CPU tensors: under the Triton interpreter only (the CPU suite), not on a GPU host
cpu_kernels = pytest.mark.skipif(bool(triton_unavailable(torch.device("cpu"))),
                                 reason="CPU tests: need TRITON_INTERPRET=1 (the CPU suite)")
TOL = {torch.float32: (2e-4, 2e-3)}


def _small(**kw) -> ModelArgs:
    base = dict(vocab_size=37, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=2, n_dense_layers=1, n_heads=2,
                max_seq_len=32, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    base.update(kw)
    return ModelArgs(**base)


@cpu_kernels
@pytest.mark.parametrize("args", [
    _small(),
    _small(score_func="sigmoid", n_expert_groups=4, n_limited_groups=2, q_lora_rank=12, n_activated_experts=3),
    _small(score_func="softmax", n_expert_groups=2, n_limited_groups=1, bias_update_speed=0.0),
], ids=["softmax", "sigmoid-groups-qlora", "softmax-groups-nobias"])
def test_kernels_match_pytorch_forward_and_grads(args):
    torch.manual_seed(0)
    ref = Transformer(args)
    fused = copy.deepcopy(ref)
    changed = apply_kernels(fused, ALL_ON, torch.device("cpu"))
    assert all(changed[op] > 0 for op in OPS), changed
    assert any(isinstance(m, FusedRMSNorm) for m in fused.modules())
    assert ref.state_dict().keys() == fused.state_dict().keys()
    tokens = torch.randint(0, args.vocab_size, (2, 13))
    out_ref, out = ref(tokens), fused(tokens)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=rtol)
    g = torch.randn_like(out_ref)
    (out_ref * g).sum().backward()
    (out * g).sum().backward()
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=atol, rtol=rtol, msg=name)


@cpu_kernels
def test_softmax_groups_with_learned_bias_keep_the_torch_router():
    args = _small(score_func="softmax", n_expert_groups=2, n_limited_groups=1, bias_update_speed=1e-3)
    changed = apply_kernels(Transformer(args), ALL_ON, torch.device("cpu"))
    assert changed["router"] == 0 and changed["attention"] > 0


def test_unavailable_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "GPU" in triton_unavailable(torch.device("cpu"))
    model = Transformer(_small())
    assert apply_kernels(model, ALL_ON, torch.device("cpu")) == {}


@pytest.mark.parametrize("extra", [["kernels.enabled=true"], ["precision.fp8=blockwise"],
                                   ["precision.fp8=rowwise", "kernels.enabled=true"]])
def test_trainer_runs_with_kernels_and_fp8(tmp_path, capsys, extra):
    from moetrain.train import main
    from tests.trainer_runs import train_args
    args = train_args(tmp_path / "run", tmp_path / "cache", "train.steps=2", "train.batch_size=2", "train.seq_len=16",
                      "train.eval_batches=1", "train.log_every=1", "checkpoint.at_end=false", *extra)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "done: step 2/2" in out and "using the PyTorch ops" not in out


@cpu_kernels
def test_fp8_experts_take_the_packed_swiglu():
    """After apply_fp8 + apply_kernels, the FP8 experts run SwiGLU on the packed [M, 2I] GEMM output
    (act_packed_fn: the gradient comes back packed, no slice copies) with the same output and gradients as the
    two-argument kernel on its halves."""
    from kernels.swiglu import swiglu_packed
    from moetrain.model.moe import GroupedExperts
    from moetrain.precision.fp8 import Fp8Config, Fp8GroupedExperts
    torch.manual_seed(0)
    base = GroupedExperts(3, 128, 144, init_std=0.05)
    base.reset_parameters()
    model = torch.nn.ModuleDict({"experts": Fp8GroupedExperts.convert(base, Fp8Config("blockwise", backend="triton"),
                                                                       "experts")})
    apply_kernels(model, ALL_ON, torch.device("cpu"))
    assert model["experts"].act_packed_fn is swiglu_packed
    counts = torch.tensor([5, 0, 9])
    x = torch.randn(14, 128)
    res = []
    for packed in (swiglu_packed, None):
        m = copy.deepcopy(model["experts"])
        m.act_packed_fn = packed
        xi = x.clone().requires_grad_()
        y = m(xi, counts)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        res.append((y, xi.grad, m.w1.grad, m.w2.grad, m.w3.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
