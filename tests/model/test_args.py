"""ModelArgs flavors and the analytic formulas (params, FLOPs, KV cache) vs. built models and papers."""
import dataclasses

import pytest
import torch

from moetrain.model import (FLAVORS, ModelArgs, Transformer, flops_per_token, get_flavor,
                            kv_cache_per_token, param_counts)


def test_flavors_listed_and_copied():
    assert {"debug", "tinyshakespeare", "deepseek-v2-lite", "deepseek-v3"} <= set(FLAVORS)
    a = get_flavor("debug")
    a.dim = 12345
    assert FLAVORS["debug"].dim != 12345
    for name in FLAVORS:
        get_flavor(name).validate()


def test_unknown_flavor_lists_names():
    with pytest.raises(ValueError) as e:
        get_flavor("gpt-5")
    for name in FLAVORS:
        assert name in str(e.value)


@pytest.mark.parametrize("bad", [dict(score_func="relu"), dict(n_activated_experts=9),
                                 dict(n_expert_groups=3), dict(n_expert_groups=4, n_limited_groups=5),
                                 dict(qk_rope_head_dim=7), dict(n_dense_layers=3)])
def test_validate_rejects(bad):
    with pytest.raises(ValueError):
        dataclasses.replace(ModelArgs(), **bad).validate()


@pytest.mark.parametrize("name", list(FLAVORS))
def test_param_counts_match_built_model(name):
    args = get_flavor(name)
    if name in ("debug",):
        model = Transformer(args)
    else:
        with torch.device("meta"):
            model = Transformer(args)
    assert param_counts(args)["total"] == sum(p.numel() for p in model.parameters())
    pc = param_counts(args)
    parts = ("embedding", "head", "attention", "dense_mlp", "routed_experts", "shared_experts",
             "gates", "norms")
    assert sum(pc[k] for k in parts) == pc["total"]


def test_deepseek_v3_published_sizes():
    pc = param_counts(get_flavor("deepseek-v3"))
    assert abs(pc["total"] / 671e9 - 1) < 0.01
    assert abs(pc["activated"] / 37e9 - 1) < 0.03


def test_deepseek_v2_published_sizes():
    pc = param_counts(get_flavor("deepseek-v2-lite"))
    assert abs(pc["total"] / 15.7e9 - 1) < 0.01
    assert abs(pc["activated"] / 2.4e9 - 1) < 0.05
    pc = param_counts(get_flavor("deepseek-v2"))
    assert abs(pc["total"] / 236e9 - 1) < 0.01
    assert abs(pc["activated"] / 21e9 - 1) < 0.03


def test_tinyshakespeare_size():
    # about nanoGPT's baby GPT (10.7M) activated per token, more in total (16 routed experts)
    pc = param_counts(get_flavor("tinyshakespeare"))
    assert 8e6 < pc["activated"] < 13e6
    assert 15e6 < pc["total"] < 20e6


def test_flops_per_token_vs_isca25_table2():
    # "Insights into DeepSeek-V3" (ISCA 2025) Table 2: V3 250, V2 155 GFLOPs/token (4K seqs).
    assert abs(flops_per_token(get_flavor("deepseek-v3"), 4096) / 250e9 - 1) < 0.05
    assert abs(flops_per_token(get_flavor("deepseek-v2"), 4096) / 155e9 - 1) < 0.05


def test_flops_formula_pieces():
    a = get_flavor("debug")
    n = param_counts(a)["activated_matmul"]
    T = 128
    attn = 2 * a.n_layers * a.n_heads * (a.qk_head_dim + a.v_head_dim) * T / 2
    assert flops_per_token(a, T, training=False) == pytest.approx(2 * n + attn)
    assert flops_per_token(a, T) == pytest.approx(3 * (2 * n + attn))
    with pytest.raises(ValueError):
        flops_per_token(a, 0)


@pytest.mark.parametrize("name", ["deepseek-v2-lite", "deepseek-v3"])
def test_kv_cache_mla_smaller(name):
    a = get_flavor(name)
    kv = kv_cache_per_token(a, bytes_per_elem=2)
    assert kv["mla_bytes"] == a.n_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * 2
    assert kv["mha_bytes"] == a.n_layers * a.n_heads * (a.qk_head_dim + a.v_head_dim) * 2
    assert kv["mla_bytes"] < kv["mha_bytes"]
    assert kv["ratio"] == pytest.approx(kv["mla_bytes"] / kv["mha_bytes"])
    if name == "deepseek-v3":
        assert kv["ratio"] == pytest.approx(576 / 40960)
