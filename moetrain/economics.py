"""Training economics: GPU-hours, dollars, throughput and MFU of a run, measured as it goes.

The meter charges wall-clock time of every rank (world_size x elapsed), from the meter's start, with no
phase left out: time in training steps, evaluation, checkpointing and start-up is charged and reported
separately so that goodput is visible. Dollars are GPU-hours x ``cost.gpu_hour_usd`` (or, on CPU,
core-hours x ``cost.cpu_core_hour_usd``). MFU is model FLOP/s (FLOPs per token x tokens/s) over the
device peak x world size; for a device without a known peak it is None (omitted, never invented).

Reference: DeepSeek-V3 report, Table 1 (2.788M H800 GPU-hours at $2/GPU-hour = $5.576M).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

# Dense BF16 peak (FLOP/s, no sparsity) and a default price per GPU-hour (USD) for each GPU type.
# Peaks are the vendor datasheets' dense figures; prices are illustrative rental rates, not quotes:
# set cost.gpu_hour_usd to what you pay. H800's $2 is the rate DeepSeek-V3's report assumes.
GPU_SPECS: dict[str, dict[str, float]] = {
    "h100": {"bf16_flops": 989e12, "usd_per_hour": 2.50, "tdp_w": 700},
    "h200": {"bf16_flops": 989e12, "usd_per_hour": 3.50, "tdp_w": 700},
    "h800": {"bf16_flops": 989e12, "usd_per_hour": 2.00, "tdp_w": 700},
    "h20": {"bf16_flops": 148e12, "usd_per_hour": 1.00, "tdp_w": 400},
    "a100": {"bf16_flops": 312e12, "usd_per_hour": 1.50, "tdp_w": 400},
    "a800": {"bf16_flops": 312e12, "usd_per_hour": 1.50, "tdp_w": 400},
    "l40s": {"bf16_flops": 362e12, "usd_per_hour": 1.00, "tdp_w": 350},
    "b200": {"bf16_flops": 2250e12, "usd_per_hour": 6.00, "tdp_w": 1000},
}
PHASES = ("startup", "train", "eval", "checkpoint")


def detect_gpu_type(device_name: str) -> Optional[str]:
    """Maps a CUDA device name (e.g. 'NVIDIA H200') to a GPU_SPECS key, or None if unknown."""
    name = device_name.lower().replace(" ", "")
    for key in sorted(GPU_SPECS, key=len, reverse=True):
        if key in name:
            return key
    return None


@dataclass
class Pricing:
    """What one unit of compute costs and how fast it is. ``unit`` is 'gpu' or 'cpu_core'."""
    unit: str
    units_per_rank: float           # GPUs per rank (1) or CPU cores per rank (threads used)
    usd_per_unit_hour: float
    peak_flops_per_rank: Optional[float]
    device_label: str


def resolve_pricing(device_type: str, device_name: str, gpu_type: str, gpu_hour_usd: Optional[float],
                    cpu_core_hour_usd: float, cpu_threads: int) -> Pricing:
    """Pricing for this run's device.

    Args:
        device_type: 'cuda' or 'cpu'. device_name: e.g. torch.cuda.get_device_name().
        gpu_type: 'auto' or a GPU_SPECS key. gpu_hour_usd: explicit price or None for the type's default.
    Raises: ValueError if gpu_type is neither 'auto' nor a known key, or a GPU's price is unknown.
    """
    if device_type != "cuda":
        return Pricing("cpu_core", float(cpu_threads), cpu_core_hour_usd, None, f"cpu x{cpu_threads} threads")
    key = detect_gpu_type(device_name) if gpu_type == "auto" else gpu_type.lower()
    if key is not None and key not in GPU_SPECS:
        raise ValueError(f"cost.gpu_type={gpu_type}: unknown; choose auto or one of {', '.join(GPU_SPECS)}")
    spec = GPU_SPECS.get(key) if key else None
    price = gpu_hour_usd if gpu_hour_usd is not None else (spec["usd_per_hour"] if spec else None)
    if price is None:
        raise ValueError(f"cost.gpu_hour_usd: no default price for GPU '{device_name}'; set cost.gpu_hour_usd")
    return Pricing("gpu", 1.0, float(price), spec["bf16_flops"] if spec else None, key or device_name)


class CostMeter:
    """Accumulates wall-clock time per phase and tokens; reports GPU-hours, $, tokens/s and MFU.

    Use ``with meter.phase("eval"): ...``; time outside any explicit phase since the last mark is charged
    to 'train'. Totals are restored on resume via :meth:`state_dict` / :meth:`load_state_dict`, so a
    resumed run keeps counting from the previous totals (restart time is charged as 'startup').
    """

    def __init__(self, pricing: Pricing, world_size: int, flops_per_token: float):
        self.pricing = pricing
        self.world_size = world_size
        self.flops_per_token = flops_per_token
        self.seconds = {p: 0.0 for p in PHASES}
        self.tokens = 0
        self._mark = time.perf_counter()
        self._phase = "startup"
        self._window = (self._mark, 0)  # (time, tokens) at the last throughput report

    def _charge(self) -> None:
        now = time.perf_counter()
        self.seconds[self._phase] += now - self._mark
        self._mark = now

    def start_training(self) -> None:
        """Ends the start-up phase: everything from here on is 'train' unless in another phase."""
        self._charge()
        self._phase = "train"
        self._window = (self._mark, self.tokens)

    def phase(self, name: str) -> "_Phase":
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; one of {PHASES}")
        return _Phase(self, name)

    def add_tokens(self, n: int) -> None:
        self.tokens += int(n)

    @property
    def elapsed_s(self) -> float:
        return sum(self.seconds.values()) + (time.perf_counter() - self._mark)

    def unit_hours(self) -> float:
        """GPU-hours (or CPU core-hours) charged so far: world x units per rank x elapsed."""
        return self.elapsed_s / 3600.0 * self.world_size * self.pricing.units_per_rank

    def report(self) -> dict[str, float | None]:
        """Metrics for metrics.jsonl: cost/*, perf/* (tokens/s over the window since the last report)."""
        self._charge()
        now, (t0, tok0) = self._mark, self._window
        window_s = max(now - t0 - 0.0, 1e-9)
        tps = (self.tokens - tok0) / window_s
        self._window = (now, self.tokens)
        hours = self.unit_hours()
        usd = hours * self.pricing.usd_per_unit_hour
        achieved = tps * self.flops_per_token
        peak = self.pricing.peak_flops_per_rank
        out: dict[str, float | None] = {
            "perf/tokens_per_s": tps,
            "perf/model_tflops": achieved / 1e12,
            "perf/mfu": achieved / (peak * self.world_size) if peak else None,
            "cost/usd": usd,
            "cost/usd_per_1m_tokens": usd / self.tokens * 1e6 if self.tokens else None,
            "cost/elapsed_s": self.elapsed_s,
        }
        out["cost/gpu_hours" if self.pricing.unit == "gpu" else "cost/cpu_core_hours"] = hours
        if self.pricing.unit != "gpu":
            out["cost/gpu_hours"] = 0.0
        for p in PHASES:
            out[f"time/{p}_s"] = self.seconds[p]
        train = self.seconds["train"]
        out["time/goodput"] = train / max(sum(self.seconds.values()), 1e-9)
        return out

    def state_dict(self) -> dict:
        self._charge()
        return {"seconds": dict(self.seconds), "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        for p in PHASES:
            self.seconds[p] += float(state["seconds"].get(p, 0.0))
        self.tokens = int(state["tokens"])
        self._window = (self._mark, self.tokens)


class _Phase:
    def __init__(self, meter: CostMeter, name: str):
        self.meter, self.name = meter, name

    def __enter__(self):
        self.meter._charge()
        self.prev, self.meter._phase = self.meter._phase, self.name
        return self

    def __exit__(self, *exc):
        self.meter._charge()
        self.meter._phase = self.prev
        return False
