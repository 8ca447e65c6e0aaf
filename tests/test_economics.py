"""Cost meter v1: GPU-hours, dollars, MFU and phase accounting."""
import time

import pytest

from moetrain.economics import CostMeter, Pricing, detect_gpu_type, resolve_pricing


def test_detect_gpu_type():
    assert detect_gpu_type("NVIDIA H200") == "h200"
    assert detect_gpu_type("NVIDIA H100 80GB HBM3") == "h100"
    assert detect_gpu_type("NVIDIA A100-SXM4-80GB") == "a100"
    assert detect_gpu_type("Some Future GPU") is None


def test_pricing_defaults_and_errors():
    p = resolve_pricing("cuda", "NVIDIA H800", "auto", None, 0.05, 8)
    assert (p.unit, p.usd_per_unit_hour, p.peak_flops_per_rank) == ("gpu", 2.0, 989e12)
    assert resolve_pricing("cuda", "NVIDIA H800", "auto", 1.25, 0.05, 8).usd_per_unit_hour == 1.25
    cpu = resolve_pricing("cpu", "cpu", "auto", None, 0.04, 2)
    assert (cpu.unit, cpu.units_per_rank, cpu.peak_flops_per_rank) == ("cpu_core", 2.0, None)
    with pytest.raises(ValueError, match="cost.gpu_hour_usd"):
        resolve_pricing("cuda", "Mystery GPU", "auto", None, 0.05, 1)
    unknown = resolve_pricing("cuda", "Mystery GPU", "auto", 3.0, 0.05, 1)
    assert unknown.peak_flops_per_rank is None  # MFU omitted, not invented
    with pytest.raises(ValueError, match="cost.gpu_type=tpu"):
        resolve_pricing("cuda", "NVIDIA H100", "tpu", None, 0.05, 1)


def test_meter_hours_dollars_mfu_and_phases():
    pricing = Pricing("gpu", 1.0, 2.0, 1e12, "h800")
    meter = CostMeter(pricing, world_size=4, flops_per_token=1e6)
    meter.start_training()
    time.sleep(0.05)
    meter.add_tokens(1000)
    with meter.phase("eval"):
        time.sleep(0.03)
    rep = meter.report()
    elapsed = rep["cost/elapsed_s"]
    assert rep["cost/gpu_hours"] == pytest.approx(4 * elapsed / 3600, rel=0.05)
    assert rep["cost/usd"] == pytest.approx(2.0 * rep["cost/gpu_hours"], rel=1e-6)
    assert rep["time/eval_s"] >= 0.03 and rep["time/train_s"] >= 0.05
    assert sum(rep[f"time/{p}_s"] for p in ("startup", "train", "eval", "checkpoint")) == pytest.approx(elapsed, rel=0.05)
    assert rep["perf/mfu"] == pytest.approx(rep["perf/tokens_per_s"] * 1e6 / (4 * 1e12))
    assert rep["cost/usd_per_1m_tokens"] == pytest.approx(rep["cost/usd"] / 1000 * 1e6)


def test_meter_state_round_trip_keeps_totals():
    pricing = Pricing("cpu_core", 2.0, 0.05, None, "cpu")
    a = CostMeter(pricing, 1, 1.0)
    a.start_training()
    a.add_tokens(500)
    time.sleep(0.02)
    state = a.state_dict()
    b = CostMeter(pricing, 1, 1.0)
    b.load_state_dict(state)
    assert b.tokens == 500
    rep = b.report()
    assert rep["perf/mfu"] is None
    assert rep["cost/elapsed_s"] >= sum(state["seconds"].values())
    assert rep["cost/cpu_core_hours"] == pytest.approx(2 * rep["cost/elapsed_s"] / 3600, rel=0.05)


def test_resume_on_another_world_size_keeps_earlier_hours():
    """A launch's unit-hours keep its own world size: 4 GPUs for 100 s, then 1 GPU for 50 s = (400 + 50) / 3600."""
    pricing = Pricing("gpu", 1.0, 2.0, 1e12, "h800")
    t = [0.0]
    a = CostMeter(pricing, world_size=4, flops_per_token=1.0, clock=lambda: t[0])
    a.start_training()
    t[0] = 100.0
    state = a.state_dict()
    assert state["unit_hours"] == pytest.approx(400 / 3600)
    b = CostMeter(pricing, world_size=1, flops_per_token=1.0, clock=lambda: t[0])
    b.load_state_dict(state)
    t[0] = 150.0
    assert b.unit_hours() == pytest.approx(450 / 3600)
    assert b.report()["cost/elapsed_s"] == pytest.approx(150.0)
    c = CostMeter(pricing, world_size=2, flops_per_token=1.0, clock=lambda: t[0])  # and once more, at 2
    c.load_state_dict(b.state_dict())
    t[0] = 160.0
    assert c.unit_hours() == pytest.approx((450 + 20) / 3600)
    old = {k: v for k, v in state.items() if k != "unit_hours"}  # a checkpoint from before unit_hours was saved
    d = CostMeter(pricing, world_size=1, flops_per_token=1.0, clock=lambda: t[0])
    d.load_state_dict(old)
    assert d.unit_hours() == pytest.approx(100 / 3600)
