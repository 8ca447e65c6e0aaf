"""Transformer: shapes, gradient flow, init, meta-device flow, bf16, MoE bookkeeping."""
import dataclasses

import pytest
import torch

from moetrain.model import MLP, MoE, RMSNorm, Transformer, get_flavor


def v3_like():
    """Tiny model exercising every branch: q LoRA, sigmoid, groups, 2 MoE layers, 2 shared."""
    return dataclasses.replace(get_flavor("debug"), n_layers=3, q_lora_rank=12, score_func="sigmoid",
                               n_expert_groups=4, n_limited_groups=2, n_shared_experts=2,
                               route_scale=2.5, switch_aux_alpha=0.01, router_z_loss_coef=1e-3,
                               max_seq_len=32, original_seq_len=16, rope_factor=4.0)


@pytest.mark.parametrize("make", [lambda: get_flavor("debug"), v3_like])
def test_forward_shapes_and_grads_reach_every_parameter(make):
    args = make()
    torch.manual_seed(0)
    model = Transformer(args)
    assert isinstance(model.layers, torch.nn.ModuleList) and isinstance(model.output, torch.nn.Linear)
    assert isinstance(model.layers[0].ffn, MLP) and isinstance(model.layers[-1].ffn, MoE)
    assert isinstance(model.layers[0].attn_norm, RMSNorm)
    tokens = torch.randint(0, args.vocab_size, (2, 24))
    logits = model(tokens)
    assert logits.shape == (2, 24, args.vocab_size)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + model.aux_loss()
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert model.aux_loss().item() > 0


def test_causality():
    model = Transformer(v3_like()).eval()
    t = torch.randint(0, 256, (1, 12))
    t2 = t.clone()
    t2[0, 8:] = (t2[0, 8:] + 1) % 256
    torch.testing.assert_close(model(t)[:, :8], model(t2)[:, :8])


def test_init_deterministic_and_meta_flow():
    args = get_flavor("debug")
    torch.manual_seed(3)
    a = Transformer(args)
    torch.manual_seed(3)
    b = Transformer(args)
    with torch.device("meta"):
        c = Transformer(args)
    assert c.embed.weight.is_meta
    c.to_empty(device="cpu")
    torch.manual_seed(3)
    c.init_weights()
    b.gates()[0].expert_load.fill_(7)
    with torch.no_grad():
        b.gates()[0].bias.fill_(1)
    torch.manual_seed(3)
    b.init_weights()
    sa = a.state_dict()
    for m in (b, c):
        sm = m.state_dict()
        assert sa.keys() == sm.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sm[k], msg=k)
        assert m.gates()[0].expert_load.abs().sum() == 0
    torch.testing.assert_close(a.freqs_cos, c.freqs_cos)
    assert any(k.endswith("gate.bias") for k in sa)
    assert not any("expert_load" in k or "freqs" in k for k in sa)
    # residual projections are scaled down
    assert a.layers[0].attn.wo.weight.std() < 0.6 * a.layers[0].attn.wkv_b.weight.std()


def test_bf16_forward_on_cpu():
    torch.manual_seed(0)
    model = Transformer(v3_like()).to(torch.bfloat16)
    assert model.freqs_cos.dtype == torch.float32 and model.gates()[0].bias.dtype == torch.float32
    logits = model(torch.randint(0, 256, (2, 16)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    logits.float().sum().backward()


def test_too_long_sequence_raises():
    model = Transformer(dataclasses.replace(get_flavor("debug"), max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_bias_update_stats_and_reduce():
    args = dataclasses.replace(get_flavor("debug"), n_layers=3, bias_update_speed=0.01)
    model = Transformer(args)
    assert [g is l.ffn.gate for g, l in zip(model.gates(), model.layers[1:])] == [True, True]
    for _ in range(2):  # two micro-batches accumulate
        model(torch.randint(0, 256, (2, 16)))
    loads = [g.expert_load.clone() for g in model.gates()]
    assert all(l.sum() == 2 * 2 * 16 * args.n_activated_experts for l in loads)
    stats = model.moe_stats()
    exp = [(l.max() / l.mean()).item() for l in loads]
    assert stats["moe/load_imbalance/layer_1"] == pytest.approx(exp[0])
    assert stats["moe/load_imbalance"] == pytest.approx(sum(exp) / 2)
    seen = []

    def reduce(t):  # stands in for an all-reduce over 2 identical ranks
        seen.append(t.shape)
        return t * 2

    model.update_expert_biases(reduce=reduce)
    assert seen == [(2, args.n_routed_experts)]
    for g, l in zip(model.gates(), loads):
        torch.testing.assert_close(g.bias, 0.01 * torch.sign(l.mean() - l))
        assert g.expert_load.abs().sum() == 0
    assert Transformer(dataclasses.replace(args, n_dense_layers=3)).moe_stats() == {}


def test_debug_model_learns():
    torch.manual_seed(0)
    args = dataclasses.replace(get_flavor("debug"), vocab_size=16)
    model = Transformer(args)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.arange(33).remainder(16).unsqueeze(0).repeat(4, 1)
    losses = []
    for _ in range(30):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        (loss + model.aux_loss()).backward()
        opt.step()
        opt.zero_grad()
        model.update_expert_biases()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
