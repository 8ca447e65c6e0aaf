"""benchmarks/bench_experts.py without a GPU: the routings' row counts, the table, and the one-line exit-2 refusal
on a machine without CUDA."""
from __future__ import annotations

import pytest
import torch

from tests.trainer_runs import load_benchmark


@pytest.fixture(scope="module")
def be():
    return load_benchmark("bench_experts")


def test_routing_counts(be):
    assert be.routing_counts("balanced", 32768, 16) == [2048] * 16
    assert be.routing_counts("collapsed", 32768, 16) == [4096] * 8 + [0] * 8
    skew = be.routing_counts("skewed", 1000, 4)
    assert sum(skew) == 1000 and skew == sorted(skew, reverse=True) and skew[3] > 0
    with pytest.raises(ValueError, match="unknown routing"):
        be.routing_counts("zipf", 10, 2)


def test_table(be):
    rows = [{"rows": 8, "routing": "balanced", "variant": v, "ms": ms}
            for v, ms in (("bf16", 2.0), ("fp8-grouped", 2.0), ("fp8-per-expert", 1.6))]
    text = be.table(rows)
    assert "| 8 | balanced | 2.00 (1.00x) | 2.00 (1.00x) | 1.60 (1.25x) |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_needs_cuda(be, capsys):
    assert be.main(["--rows", "8"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
