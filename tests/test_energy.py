"""Energy from NVML (faked here: no GPU in CI) and its place in the cost meter."""
import sys
import time
import types

import pytest
import torch

from moetrain.economics import CostMeter, Pricing, restart_loss
from moetrain.energy import EnergyMeter, open_energy_meter


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeNvml(types.SimpleNamespace):
    """pynvml's functions used by moetrain.energy; energy counter in mJ, power in mW."""

    def __init__(self, counter_supported=True):
        super().__init__(mj=5_000_000.0, mw=300_000.0, inits=0, counter_supported=counter_supported, index=None)

    def nvmlInit(self):
        self.inits += 1

    def nvmlDeviceGetHandleByIndex(self, i):
        self.index = i
        return ("handle", i)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.counter_supported:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return self.mj

    def nvmlDeviceGetPowerUsage(self, handle):
        return self.mw


def test_counter_source_gives_kwh_since_start():
    nvml = FakeNvml()
    from moetrain.energy import _CounterSource
    m = EnergyMeter(_CounterSource(nvml, None))
    assert m.kwh() == 0.0
    nvml.mj += 3.6e9  # 3.6 MJ = 1 kWh
    assert m.kwh() == pytest.approx(1.0)
    assert m.counter and m._thread is None


def test_power_source_integrates_trapezoid_with_fake_clock():
    clock = Clock()
    src = types.SimpleNamespace(w=100.0)
    src.watts = lambda: src.w
    m = EnergyMeter(src, clock=clock, interval_s=None)
    clock.t += 10
    src.w = 300.0
    m.sample()                      # 10 s ramp 100 -> 300 W: 2,000 J
    assert m.joules() == pytest.approx(2000.0)
    clock.t += 5                    # not sampled yet: extrapolates the last reading (300 W x 5 s)
    assert m.joules() == pytest.approx(3500.0)
    m.sample()
    assert m.kwh() == pytest.approx(3500.0 / 3.6e6)


def test_power_thread_samples_and_stops():
    src = types.SimpleNamespace(n=0)

    def watts():
        src.n += 1
        return 200.0
    src.watts = watts
    m = EnergyMeter(src, interval_s=0.01)
    time.sleep(0.1)
    m.close()
    n = src.n
    assert n >= 3 and m._thread is None
    time.sleep(0.03)
    assert src.n == n                       # stopped
    assert m.joules() == pytest.approx(200.0 * 0.1, rel=0.5)


def test_open_energy_meter_cpu_is_none_and_fake_gpu_picks_source(monkeypatch):
    assert open_energy_meter(torch.device("cpu")) is None
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    m = open_energy_meter(torch.device("cuda", 3))
    assert m is not None and m.counter and "counter" in m.label and nvml.inits == 1
    nvml2 = FakeNvml(counter_supported=False)  # pre-Volta: fall back to sampling power
    monkeypatch.setitem(sys.modules, "pynvml", nvml2)
    m2 = open_energy_meter(torch.device("cuda", 0), interval_s=60)
    assert m2 is not None and not m2.counter and "power" in m2.label
    m2.close()
    broken = types.SimpleNamespace(nvmlInit=lambda: (_ for _ in ()).throw(RuntimeError("no driver")))
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert open_energy_meter(torch.device("cuda", 0)) is None   # no NVML: omitted, not invented
    monkeypatch.setitem(sys.modules, "pynvml", None)            # package missing
    assert open_energy_meter(torch.device("cuda", 0)) is None


class FakeEnergy:
    def __init__(self, kwh=0.0):
        self.value, self.closed = kwh, False

    def kwh(self):
        return self.value

    def close(self):
        self.closed = True


def _gpu_meter(clock, **kw):
    return CostMeter(Pricing("gpu", 1.0, 2.0, 1e12, "h800"), kw.pop("world_size", 1), 1e6, clock=clock, **kw)


def test_meter_reports_energy_kwh_and_dollars_separately():
    clock, energy = Clock(), FakeEnergy()
    meter = _gpu_meter(clock, energy=energy, kwh_usd=0.15)
    meter.start_training()
    clock.t += 3600
    energy.value = 0.7
    rep = meter.report()
    assert rep["cost/gpu_hours"] == pytest.approx(1.0) and rep["cost/usd"] == pytest.approx(2.0)
    assert rep["cost/energy_kwh"] == pytest.approx(0.7)
    assert rep["cost/energy_usd"] == pytest.approx(0.105)
    assert rep["cost/total_usd"] == pytest.approx(2.105)
    no_price = _gpu_meter(clock, energy=energy).report()
    assert no_price["cost/energy_kwh"] == pytest.approx(0.7) and no_price["cost/energy_usd"] is None
    meter.close()
    assert energy.closed


def test_cpu_meter_omits_energy():
    rep = CostMeter(Pricing("cpu_core", 2.0, 0.05, None, "cpu"), 1, 1.0, kwh_usd=0.2).report()
    assert rep["cost/energy_kwh"] is None and rep["cost/energy_usd"] is None and "cost/total_usd" not in rep


def test_energy_is_summed_over_ranks_and_none_if_a_rank_lacks_nvml():
    clock = Clock()
    both = _gpu_meter(clock, world_size=2, energy=FakeEnergy(0.5), reduce_sum=lambda xs: [2 * x for x in xs])
    assert both.report()["cost/energy_kwh"] == pytest.approx(1.0)
    one = _gpu_meter(clock, world_size=2, energy=FakeEnergy(0.5), reduce_sum=lambda xs: [xs[0], xs[1]])
    assert one.report()["cost/energy_kwh"] is None
    unreduced = _gpu_meter(clock, world_size=2, energy=FakeEnergy(0.5))
    assert unreduced.report()["cost/energy_kwh"] is None   # one rank's meter is not the job's


def test_energy_survives_resume_and_lost_work_is_added(tmp_path):
    clock = Clock()
    a = _gpu_meter(clock, energy=FakeEnergy(), kwh_usd=0.1)
    a.start_training()
    clock.t += 100
    a.energy.value = 2.0
    state = a.state_dict()                                  # checkpoint: 2 kWh, 100 s
    assert state["energy_kwh"] == pytest.approx(2.0)
    metrics = tmp_path / "metrics.jsonl"                     # ran on to 130 s and 2.5 kWh, then died
    metrics.write_text('{"step": 5, "cost/elapsed_s": 90.0, "cost/energy_kwh": 1.8}\n'
                       '{"step": 9, "cost/elapsed_s": 130.0, "cost/energy_kwh": 2.5}\n{"step": 10, "cost/ela')
    lost = restart_loss(metrics, state)
    assert lost == pytest.approx({"seconds": 30.0, "kwh": 0.5})
    b = _gpu_meter(clock, energy=FakeEnergy(), kwh_usd=0.1)  # new process: its counter starts at 0
    b.load_state_dict(state)
    b.add_restart(lost["seconds"], lost["kwh"])
    b.energy.value = 0.25
    rep = b.report()
    assert rep["cost/energy_kwh"] == pytest.approx(2.75)
    assert rep["cost/energy_usd"] == pytest.approx(0.275)
