"""GPU energy from NVML: kWh used by this rank's GPU since the meter started.

Two sources, best first:

* the GPU's energy counter (``nvmlDeviceGetTotalEnergyConsumption``, millijoules since the driver
  loaded; Volta and newer): exact, read on demand, no thread;
* power readings (``nvmlDeviceGetPowerUsage``, milliwatts): a daemon thread samples every
  ``interval_s`` and integrates power over time (trapezoid rule).

``pynvml`` (the ``nvidia-ml-py`` package) is imported lazily. On a CPU run, without the package, or when
NVML cannot be initialised, :func:`open_energy_meter` returns None: energy is then omitted from the
metrics, never estimated from a TDP.
"""
from __future__ import annotations

import threading
import time
import warnings
from typing import Any, Callable, Optional

J_PER_KWH = 3.6e6


class _CounterSource:
    """Cumulative energy counter of one GPU (joules)."""

    def __init__(self, nvml: Any, handle: Any):
        self.nvml, self.handle = nvml, handle

    def joules(self) -> float:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3


class _PowerSource:
    """Instantaneous board power of one GPU (watts)."""

    def __init__(self, nvml: Any, handle: Any):
        self.nvml, self.handle = nvml, handle

    def watts(self) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3


class EnergyMeter:
    """Energy used since construction, from a counter (``joules()``) or a power reading (``watts()``).

    Args:
        source: an object with ``joules()`` (cumulative counter) or ``watts()`` (instantaneous power).
        clock: monotonic seconds (injectable for tests).
        interval_s: sampling period of the power thread; ``None`` starts no thread (call
            :meth:`sample` yourself, as the tests do).
        label: where the numbers come from, for logs.
    """

    def __init__(self, source: Any, clock: Callable[[], float] = time.monotonic,
                 interval_s: Optional[float] = 0.5, label: str = "nvml"):
        self.source, self.clock, self.label = source, clock, label
        self.counter = hasattr(source, "joules")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if self.counter:
            self._start_j = source.joules()
            self._last_j = 0.0
        else:
            self._joules = 0.0
            self._t = clock()
            self._w = source.watts()
            if interval_s is not None:
                self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True,
                                                name="moetrain-energy")
                self._thread.start()

    def sample(self) -> None:
        """Reads the power once and integrates since the previous reading (power source only)."""
        if self.counter:
            return
        w = self.source.watts()
        with self._lock:
            t = self.clock()
            self._joules += 0.5 * (w + self._w) * (t - self._t)
            self._t, self._w = t, w

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.sample()
            except Exception:  # a transient NVML error must not kill training; keep the last reading
                pass

    def joules(self) -> float:
        """Energy since the start (J). Power source: integrated samples plus the time since the last
        sample at the last power reading."""
        if self.counter:
            try:
                self._last_j = max(self.source.joules() - self._start_j, 0.0)
            except Exception:  # a transient NVML error must not stop training: keep the last value
                pass
            return self._last_j
        with self._lock:
            return self._joules + self._w * max(self.clock() - self._t, 0.0)

    def kwh(self) -> float:
        return self.joules() / J_PER_KWH

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None


def _import_nvml() -> Any:
    with warnings.catch_warnings():  # the old 'pynvml' shim warns on import; nvidia-ml-py does not
        warnings.simplefilter("ignore")
        import pynvml
    return pynvml


def _nvml_index(device: Any) -> int:
    """NVML index of a torch CUDA device (CUDA_VISIBLE_DEVICES renumbers devices; NVML does not)."""
    import torch
    try:
        return int(torch.cuda._get_nvml_device_index(device))
    except Exception:
        return int(device.index or 0)


def open_energy_meter(device: Any, interval_s: float = 0.5) -> Optional[EnergyMeter]:
    """An :class:`EnergyMeter` for a torch CUDA ``device``; None on CPU or without a working NVML."""
    if getattr(device, "type", "cpu") != "cuda":
        return None
    try:
        nvml = _import_nvml()
        nvml.nvmlInit()
        handle = nvml.nvmlDeviceGetHandleByIndex(_nvml_index(device))
    except Exception:
        return None
    try:
        source: Any = _CounterSource(nvml, handle)
        source.joules()
        return EnergyMeter(source, label="nvml energy counter")
    except Exception:
        pass
    try:
        source = _PowerSource(nvml, handle)
        source.watts()
        return EnergyMeter(source, interval_s=interval_s, label="nvml power sampling")
    except Exception:
        return None
