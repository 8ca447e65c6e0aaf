"""The cost estimator against DeepSeek-V3's published numbers.

* "Insights into DeepSeek-V3" (ISCA 2025), Table 2: 250 GFLOPs of training compute per token (4K seqs).
* DeepSeek-V3 technical report, Table 1: 2,664K H800 GPU-hours of pre-training on 14.8T tokens;
  2,788K GPU-hours in total with context extension and post-training, $5.576M at $2/GPU-hour.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moetrain.economics import GPU_SPECS, estimate, main

ROOT = Path(__file__).resolve().parents[1]
V3 = str(ROOT / "configs" / "deepseek-v3.yaml")
BASE = ["estimate", "--config", V3, "--tokens", "14.8e12", "--gpus", "2048", "--gpu", "h800"]


def _json(capsys, *extra: str) -> dict:
    assert main([*BASE, *extra, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_v3_flops_per_token_matches_isca_table2(capsys):
    r = _json(capsys, "--mfu", "0.39")
    assert r["flops_per_token"] == pytest.approx(250e9, rel=0.05)
    assert r["seq_len"] == 4096
    assert r["total_flops"] == pytest.approx(r["flops_per_token"] * 14.8e12)
    assert r["params_total"] == pytest.approx(671e9, rel=0.01)
    assert r["params_activated"] == pytest.approx(37e9, rel=0.02)


def test_v3_gpu_hours_and_dollars_match_report_table1(capsys):
    assert GPU_SPECS["h800"]["bf16_flops"] == 989e12
    r = _json(capsys, "--mfu", "0.39")
    assert r["gpu_hours"] == pytest.approx(2.664e6, rel=0.05)
    assert r["usd"] == pytest.approx(2.0 * r["gpu_hours"])           # $2/GPU-hour, the report's rate
    assert r["usd"] == pytest.approx(2 * 2.664e6, rel=0.05)
    assert r["days"] == pytest.approx(r["gpu_hours"] / 2048 / 24)
    assert 50 < r["days"] < 60                                         # "less than two months"
    # Table 1's total: 2.788M GPU-hours at $2 = $5.576M (pre-training + 119K context ext. + 5K post-training)
    total = estimate(1.0, 2.788e6 * 3600, 1, "h800", tokens_per_gpu_s=1.0, gpu_hour_usd=2.0)
    assert total["usd"] == pytest.approx(5.576e6)
    # the same from a measured throughput: 14.8T tokens / 2.664M GPU-hours = 1,543 tokens/s per GPU
    m = _json(capsys, "--tokens-per-gpu-s", "1543", "--gpu-hour-usd", "2.0")
    assert m["gpu_hours"] == pytest.approx(2.664e6, rel=0.005)
    assert m["mfu"] == pytest.approx(0.39, rel=0.01)


def test_text_output_and_overrides(capsys):
    assert main([*BASE, "--mfu", "0.39"]) == 0
    out = capsys.readouterr().out
    for word in ("FLOPs/token", "GPU-hours", "days", "$", "250.5 GFLOPs"):
        assert word in out, word
    # an override changes the model: half the layers, roughly half the FLOPs
    half = _json(capsys, "--mfu", "0.39", "model.n_layers=31", "model.n_dense_layers=3")
    full = _json(capsys, "--mfu", "0.39")
    assert 0.4 < half["flops_per_token"] / full["flops_per_token"] < 0.6
    longer = _json(capsys, "--mfu", "0.39", "--seq-len", "2048")
    assert longer["seq_len"] == 2048 and longer["flops_per_token"] < full["flops_per_token"]


@pytest.mark.parametrize("argv, needle", [
    ([*BASE, "--mfu", "0.39", "--gpu", "h900"], "--gpu h900"),
    ([*BASE, "--mfu", "0.39", "--tokens-per-gpu-s", "1543"], "exactly one"),
    ([*BASE], "exactly one"),
    (["estimate", "--config", "missing.yaml", "--tokens", "1e12", "--gpus", "8", "--gpu", "h800", "--mfu", "0.4"],
     "missing.yaml"),
    ([*BASE, "--mfu", "1.5"], "--mfu"),
    ([*BASE, "--mfu", "0.39", "model.no_such_key=1"], "model.no_such_key"),
    (["estimate", "--gpus", "8", "--gpu", "h800", "--mfu", "0.4"], "--tokens"),
    (["estimat"], "unknown command"),
])
def test_bad_input_is_one_error_line_exit_2(capsys, argv, needle):
    assert main(argv) == 2
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], cap.err
    assert cap.out == ""


def test_module_entry_point():
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "moetrain.economics", *BASE, "--mfu", "0.39", "--json"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert set(json.loads(p.stdout)) >= {"flops_per_token", "total_flops", "gpu_hours", "days", "usd"}
    bad = subprocess.run([sys.executable, "-m", "moetrain.economics", *BASE, "--gpu", "tpu9"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# Live forecasts, goodput and restarts of the cost meter (fake clocks and loss curves)
# ------------------------------------------------------------------------------------------------

from moetrain.economics import CostMeter, Pricing, fit_power_law, restart_loss, steps_to_loss  # noqa: E402


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _curve(t: float) -> float:
    return 2.0 + 5.0 * t ** -0.5


def _noise(i: int) -> float:  # deterministic, zero-mean-ish
    return 0.02 * math.sin(12.9898 * i) * math.cos(78.233 * i)


def test_power_law_fit_recovers_the_curve():
    steps = list(range(5, 200, 3))
    a, b, c = fit_power_law(steps, [_curve(t) for t in steps])
    assert (a, b, c) == pytest.approx((2.0, 5.0, 0.5), rel=1e-3)
    a, b, c = fit_power_law(steps, [_curve(t) + _noise(i) for i, t in enumerate(steps)])
    assert a == pytest.approx(2.0, abs=0.1) and c == pytest.approx(0.5, rel=0.25)
    assert steps_to_loss((2.0, 5.0, 0.5), 2.5) == pytest.approx(100.0)
    assert steps_to_loss((2.0, 5.0, 0.5), 1.9) is None          # below the asymptote: never


@pytest.mark.parametrize("losses", [
    [3.0 + _noise(i) for i in range(50)],                         # flat: noise only
    [2.0 + 0.01 * i for i in range(50)],                          # rising
    [_curve(t) for t in range(1, 6)],                             # too few points
])
def test_power_law_fit_refuses_meaningless_curves(losses):
    assert fit_power_law(list(range(1, len(losses) + 1)), losses) is None


def _meter(clock, **kw):
    # 4 GPUs at $2/GPU-hour
    return CostMeter(Pricing("gpu", 1.0, 2.0, 1e15, "h800"), 4, 1e6, clock=clock, **kw)


def test_forecast_to_the_end_from_the_average_step_time():
    clock = Clock()
    m = _meter(clock, total_steps=100)
    clock.t += 30                       # start-up: charged, but not a per-step cost
    m.start_training()
    for step in range(1, 11):
        clock.t += 1.0
        m.observe(step, None)
    with m.phase("eval"):
        clock.t += 2.0                  # evaluation overhead is spread over the steps
    r = m.report()
    per_step = 12.0 / 10
    assert r["forecast/eta_s"] == pytest.approx(90 * per_step)
    assert r["forecast/gpu_hours_at_end"] == pytest.approx(4 * (42 + 90 * per_step) / 3600)
    assert r["forecast/usd_at_end"] == pytest.approx(2 * r["forecast/gpu_hours_at_end"])
    assert r["cost/gpu_hours"] == pytest.approx(4 * 42 / 3600)
    assert "forecast/usd_to_target" not in r          # no cost.target_loss


def test_forecast_to_target_loss_then_actual_cost_once_reached():
    clock = Clock()
    m = _meter(clock, total_steps=500, target_loss=2.5)
    m.start_training()
    r = None
    for step in range(1, 41):
        clock.t += 1.0
        m.observe(step, _curve(step))
        r = m.report()
    # L(t) = 2 + 5 t^-0.5 reaches 2.5 at t = 100: 60 more steps of 1 s on 4 GPUs
    assert r["forecast/target_step"] == pytest.approx(100, rel=0.01)
    assert r["forecast/gpu_hours_to_target"] == pytest.approx(4 * 100 / 3600, rel=0.01)
    assert r["forecast/usd_to_target"] == pytest.approx(2 * 4 * 100 / 3600, rel=0.01)
    for step in range(41, 121):
        clock.t += 1.0
        m.observe(step, _curve(step))
        r = m.report()
    assert r["forecast/target_step"] == 100                       # reached: the actual step and cost
    assert r["forecast/usd_to_target"] == pytest.approx(2 * 4 * 100 / 3600)
    # not meaningful (flat curve): None, not a number
    flat = _meter(Clock(), target_loss=1.0)
    flat.start_training()
    for step in range(1, 30):
        flat._clock.t += 1
        flat.observe(step, 3.0 + _noise(step))
    assert flat.report()["forecast/usd_to_target"] is None


def test_goodput_counts_restarts_as_lost_work(tmp_path):
    clock = Clock()
    a = _meter(clock)
    clock.t += 10
    a.start_training()
    clock.t += 80
    with a.phase("checkpoint"):
        clock.t += 10
    state = a.state_dict()                        # checkpoint after 100 s (80 s training)
    (tmp_path / "metrics.jsonl").write_text('{"step": 20, "cost/elapsed_s": 140.0}\n')  # died at ~140 s
    lost = restart_loss(tmp_path / "metrics.jsonl", state)
    assert lost["seconds"] == pytest.approx(40.0)
    b = _meter(clock)
    b.load_state_dict(state)
    b.add_restart(lost["seconds"], lost["kwh"])
    clock.t += 5                                  # start-up of the new process
    b.start_training()
    clock.t += 45
    r = b.report()
    assert r["time/restart_s"] == pytest.approx(40.0) and r["time/restarts"] == 1
    assert r["time/startup_s"] == pytest.approx(15.0) and r["time/train_s"] == pytest.approx(125.0)
    assert r["time/goodput"] == pytest.approx(125.0 / 190.0)
    assert r["cost/gpu_hours"] == pytest.approx(4 * 190.0 / 3600)   # lost work is paid for
    # a clean preemption (checkpoint taken at the stop) loses nothing
    assert restart_loss(tmp_path / "none.jsonl", state)["seconds"] == 0.0


def test_loss_history_is_bounded_and_survives_resume():
    clock = Clock()
    m = _meter(clock, target_loss=2.2)
    m.start_training()
    for step in range(1, 5001):
        clock.t += 0.1
        m.observe(step, _curve(step))
    assert len(m.history) <= 1024
    assert m.history[0][0] < 5 and m.history[-1][0] > 4990      # the whole curve, fewer points
    fit = m.loss_fit()
    assert fit is not None and fit[0] == pytest.approx(2.0, abs=0.02)
    n = _meter(clock, target_loss=2.2)
    n.load_state_dict(m.state_dict())
    assert n.step == 5000 and n.history == m.history
    assert n.loss_fit() == pytest.approx(fit)
