"""configs/fp8-v3-layers.yaml (issue 5's GEMM-heavy training-step benchmark): it loads, and the sizes its comment
states hold (3.345B parameters, 2.114B in routed experts, 12.82 GFLOPs/token, ~54 GB of fp32 training state)."""
from pathlib import Path

import pytest

from moetrain.config import load_config, model_args
from moetrain.model.args import flops_per_token, param_counts

ROOT = Path(__file__).resolve().parents[1]


def test_fp8_v3_layers_config_sizes():
    cfg = load_config(str(ROOT / "configs" / "fp8-v3-layers.yaml"), [])
    a = model_args(cfg)
    assert (a.dim, a.q_lora_rank, a.kv_lora_rank, a.moe_inter_dim, a.inter_dim) == (7168, 1536, 512, 2048, 18432)
    p = param_counts(a)
    assert p["total"] / 1e9 == pytest.approx(3.345, abs=5e-4)
    assert p["routed_experts"] == 3 * 16 * 3 * 7168 * 2048
    assert flops_per_token(a, cfg.train.seq_len, training=True) / 1e9 == pytest.approx(12.82, abs=5e-3)
    assert p["total"] * 16 / 1e9 == pytest.approx(54, abs=0.5)  # fp32 weights, grads, Adam m and v
