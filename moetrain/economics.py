"""Training economics: GPU-hours, dollars, energy, throughput, MFU and forecasts of a run, measured as it
goes; and a cost estimator for planned runs.

The meter charges wall-clock time of every rank (world_size x elapsed), from the meter's start, with no
phase left out: time in training steps, evaluation, checkpointing, start-up and work lost to restarts is
charged and reported separately so that goodput is visible. Dollars are GPU-hours x ``cost.gpu_hour_usd``
(or, on CPU, core-hours x ``cost.cpu_core_hour_usd``). MFU is model FLOP/s (FLOPs per token x tokens/s)
over the device peak x world size; for a device without a known peak it is None (omitted, never
invented). Energy comes from NVML on GPUs (:mod:`moetrain.energy`) and is None on CPU.

Estimator (plans a run from the model's FLOPs per token)::

    python -m moetrain.economics estimate --config configs/deepseek-v3.yaml --tokens 14.8e12 \\
        --gpus 2048 --gpu h800 --mfu 0.39 [--gpu-hour-usd 2.0] [--seq-len 4096] [key=value ...] [--json]

Reference: DeepSeek-V3 report, Table 1 (2.664M H800 GPU-hours of pre-training, 2.788M in total at
$2/GPU-hour = $5.576M).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

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
# 'restart': work lost to a crash or kill (time between the last checkpoint and the failure), charged
# when the run resumes. Goodput = train time / all time.
PHASES = ("startup", "train", "eval", "checkpoint", "restart")
_HISTORY_MAX = 1024          # loss points kept for the target-loss fit (older ones thinned out)


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


# ------------------------------------------------------------------------------------------------
# Loss-curve fit for the target-loss forecast
# ------------------------------------------------------------------------------------------------

def _linear_fit(xs: Sequence[float], ys: Sequence[float]) -> Optional[tuple[float, float, float]]:
    """Least squares y = a + b x; returns (sse, a, b) or None if x is constant."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0.0 or not math.isfinite(sxx):
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    sse = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return sse, a, b


def fit_power_law(steps: Sequence[float], losses: Sequence[float], min_points: int = 8,
                  min_r2: float = 0.5) -> Optional[tuple[float, float, float]]:
    """Fits ``L(t) = a + b * t**-c`` (a >= 0, b > 0, 0 < c <= 3) by least squares; no numpy/scipy.

    For a fixed exponent ``c`` the model is linear in (a, b), solved in closed form; ``c`` is found by a
    log-spaced grid search refined by golden-section search. Returns (a, b, c), or None when the fit is
    not meaningful: fewer than ``min_points`` points, a loss that does not decrease (b <= 0 at every c),
    or R^2 below ``min_r2`` (noise dominates: the curve has flattened).
    """
    pts = [(float(t), float(y)) for t, y in zip(steps, losses) if t > 0 and y is not None and math.isfinite(y)]
    if len(pts) < min_points:
        return None
    ts, ys = [p[0] for p in pts], [p[1] for p in pts]
    my = sum(ys) / len(ys)
    sst = sum((y - my) ** 2 for y in ys)
    if sst <= 0.0:
        return None
    logs = [math.log(t) for t in ts]

    def evaluate(c: float) -> Optional[tuple[float, float, float]]:
        fit = _linear_fit([math.exp(-c * lt) for lt in logs], ys)
        if fit is None or fit[2] <= 0.0 or fit[1] < 0.0:
            return None
        return fit

    lo, hi, n_grid = math.log(0.01), math.log(3.0), 40
    grid = [math.exp(lo + (hi - lo) * i / (n_grid - 1)) for i in range(n_grid)]
    scored = [(evaluate(c), i) for i, c in enumerate(grid)]
    feasible = [(f[0], i) for f, i in scored if f is not None]
    if not feasible:
        return None
    _, best_i = min(feasible)
    left, right = grid[max(best_i - 1, 0)], grid[min(best_i + 1, n_grid - 1)]

    def sse(c: float) -> float:
        f = evaluate(c)
        return f[0] if f is not None else math.inf

    g = (math.sqrt(5) - 1) / 2
    x1, x2 = right - g * (right - left), left + g * (right - left)
    f1, f2 = sse(x1), sse(x2)
    for _ in range(30):
        if f1 <= f2:
            right, x2, f2 = x2, x1, f1
            x1 = right - g * (right - left)
            f1 = sse(x1)
        else:
            left, x1, f1 = x1, x2, f2
            x2 = left + g * (right - left)
            f2 = sse(x2)
    candidates = [(sse(c), c) for c in (x1, x2, grid[best_i])]
    best_sse, c = min(candidates)
    if not math.isfinite(best_sse) or 1.0 - best_sse / sst < min_r2:
        return None
    _, a, b = evaluate(c)  # type: ignore[misc]
    return a, b, c


def steps_to_loss(fit: tuple[float, float, float], target: float) -> Optional[float]:
    """The step t at which the fitted curve reaches ``target``; None if at or below its asymptote."""
    a, b, c = fit
    if target <= a:
        return None
    return (b / (target - a)) ** (1.0 / c)


# ------------------------------------------------------------------------------------------------
# Restarts
# ------------------------------------------------------------------------------------------------

def restart_loss(metrics_path: str | Path, meter_state: dict) -> dict[str, float]:
    """Work a crashed or killed run lost: what it had charged past its last checkpoint.

    Reads ``metrics.jsonl`` (before the resuming trainer truncates it) and compares the largest
    ``cost/elapsed_s`` (and ``cost/energy_kwh``) logged with the totals saved in the checkpoint's meter
    state. A lower bound: time after the last logged line is not known. Returns
    ``{"seconds": s, "kwh": k}`` (0 when nothing was lost, e.g. after a clean preemption).
    """
    path = Path(metrics_path)
    saved_s = sum(float(v) for v in meter_state.get("seconds", {}).values())
    saved_kwh = float(meter_state.get("energy_kwh") or 0.0)
    max_s, max_kwh = saved_s, saved_kwh
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by the kill
            if isinstance(rec.get("cost/elapsed_s"), (int, float)):
                max_s = max(max_s, float(rec["cost/elapsed_s"]))
            if isinstance(rec.get("cost/energy_kwh"), (int, float)):
                max_kwh = max(max_kwh, float(rec["cost/energy_kwh"]))
    return {"seconds": max_s - saved_s, "kwh": max_kwh - saved_kwh}


# ------------------------------------------------------------------------------------------------
# The live meter
# ------------------------------------------------------------------------------------------------

class CostMeter:
    """Accumulates wall-clock time per phase, tokens and energy; reports GPU-hours, $, kWh, tokens/s,
    MFU, goodput and forecasts.

    Use ``with meter.phase("eval"): ...``; time outside any explicit phase since the last mark is charged
    to 'train'. Totals are restored on resume via :meth:`state_dict` / :meth:`load_state_dict`, so a
    resumed run keeps counting from the previous totals (restart time is charged as 'startup', lost work
    as 'restart' through :meth:`add_restart`).

    Args:
        pricing, world_size, flops_per_token: what a unit costs, how many ranks, model FLOPs per token.
        energy: this rank's energy meter (``kwh()``), or None (CPU / no NVML).
        kwh_usd: price of a kWh; None reports no energy dollars.
        reduce_sum: sums a list of floats over all ranks (an all-reduce); given on multi-GPU runs so that
            energy is the whole job's. Called on every rank by :meth:`report` and :meth:`state_dict`,
            which every rank therefore calls at the same points.
        total_steps: the run's planned optimizer steps (forecast to the end); None disables it.
        target_loss: a training loss to forecast the cost of (power-law fit); None disables it.
        clock: seconds (injectable for tests).
    """

    def __init__(self, pricing: Pricing, world_size: int, flops_per_token: float, *,
                 energy: Any = None, kwh_usd: Optional[float] = None,
                 reduce_sum: Optional[Callable[[list], list]] = None, total_steps: Optional[int] = None,
                 target_loss: Optional[float] = None, clock: Callable[[], float] = time.perf_counter,
                 started_at: Optional[float] = None):
        """``started_at``: the ``clock()`` reading when the job's start-up began (default: now), so
        that data and model set-up before the meter existed is charged as 'startup'."""
        self.pricing = pricing
        self.world_size = world_size
        self.flops_per_token = flops_per_token
        self.energy = energy
        self.kwh_usd = kwh_usd
        self.reduce_sum = reduce_sum
        self.total_steps = total_steps
        self.target_loss = target_loss
        self._clock = clock
        self.seconds = {p: 0.0 for p in PHASES}
        self.tokens = 0
        self.step = 0
        self.restarts = 0
        self._energy_prev_kwh = 0.0       # whole-job kWh before this process (restored + lost work)
        self._prev_seconds = 0.0          # seconds restored from earlier launches (in self.seconds too)
        self._prev_unit_hours = 0.0       # their unit-hours, at the world size each launch had
        self.history: list[list[float]] = []  # [step, loss] for the target-loss fit
        self.target_reached: Optional[dict] = None   # {"step", "usd", "unit_hours"} when first reached
        self._fit_cache: tuple[int, Any] = (-1, None)
        self._mark = clock() if started_at is None else started_at
        self._phase = "startup"
        self._window = (self._mark, 0)  # (time, tokens) at the last throughput report

    # ----- time -----------------------------------------------------------------------------------
    def _charge(self) -> None:
        now = self._clock()
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

    def add_restart(self, lost_s: float, lost_kwh: float = 0.0) -> None:
        """Charges work lost to a failure (see :func:`restart_loss`); counts one restart."""
        self.seconds["restart"] += max(float(lost_s), 0.0)
        self._energy_prev_kwh += max(float(lost_kwh), 0.0)
        self.restarts += 1

    def observe(self, step: int, loss: Optional[float] = None) -> None:
        """Records the optimizer step reached and (optionally) its training loss, for the forecasts."""
        self.step = int(step)
        if loss is None or not math.isfinite(loss):
            return
        self.history.append([float(step), float(loss)])
        if len(self.history) > _HISTORY_MAX:  # thin out: every other point (older ones thinned more)
            self.history = self.history[:-1:2] + [self.history[-1]]
        if self.target_loss is not None and self.target_reached is None and loss <= self.target_loss:
            self.target_reached = {"step": int(step)}  # cost filled in by the next report

    @property
    def elapsed_s(self) -> float:
        return sum(self.seconds.values()) + (self._clock() - self._mark)

    def _hours(self, seconds: float) -> float:
        return seconds / 3600.0 * self.world_size * self.pricing.units_per_rank

    def unit_hours(self) -> float:
        """GPU-hours (or CPU core-hours) charged so far: earlier launches' hours (restored, at their own world
        size) plus world x units per rank x this launch's elapsed time."""
        return self._prev_unit_hours + self._hours(self.elapsed_s - self._prev_seconds)

    # ----- energy ---------------------------------------------------------------------------------
    def energy_kwh(self) -> Optional[float]:
        """The whole job's kWh so far (collective when ``reduce_sum`` is set); None if any rank lacks a
        meter."""
        local = [self.energy.kwh() if self.energy is not None else 0.0, 1.0 if self.energy is not None else 0.0]
        if self.reduce_sum is not None:
            total = list(self.reduce_sum(local))
            missing = total[1] < self.world_size
        else:  # one process (or ranks that cannot be summed): only a single rank's meter is the job's
            total = local
            missing = self.energy is None or self.world_size > 1
        if missing:
            return None
        return self._energy_prev_kwh + float(total[0])

    # ----- reporting ------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Metrics for metrics.jsonl: cost/*, perf/*, time/* (goodput), forecast/*. Tokens/s is over the
        window since the last report."""
        self._charge()
        now, (t0, tok0) = self._mark, self._window
        window_s = max(now - t0, 1e-9)
        tps = (self.tokens - tok0) / window_s
        self._window = (now, self.tokens)
        hours = self.unit_hours()
        usd = hours * self.pricing.usd_per_unit_hour
        achieved = tps * self.flops_per_token
        peak = self.pricing.peak_flops_per_rank
        hours_key = "gpu_hours" if self.pricing.unit == "gpu" else "cpu_core_hours"
        out: dict[str, Any] = {
            "perf/tokens_per_s": tps,
            "perf/model_tflops": achieved / 1e12,
            "perf/mfu": achieved / (peak * self.world_size) if peak else None,
            "cost/usd": usd,
            "cost/usd_per_1m_tokens": usd / self.tokens * 1e6 if self.tokens else None,
            "cost/elapsed_s": self.elapsed_s,
        }
        out[f"cost/{hours_key}"] = hours
        if self.pricing.unit != "gpu":
            out["cost/gpu_hours"] = 0.0
        kwh = self.energy_kwh()
        out["cost/energy_kwh"] = kwh
        out["cost/energy_usd"] = kwh * self.kwh_usd if kwh is not None and self.kwh_usd is not None else None
        if out["cost/energy_usd"] is not None:
            out["cost/total_usd"] = usd + out["cost/energy_usd"]
        for p in PHASES:
            out[f"time/{p}_s"] = self.seconds[p]
        out["time/restarts"] = self.restarts
        out["time/goodput"] = self.seconds["train"] / max(sum(self.seconds.values()), 1e-9)
        out.update(self._forecast(hours_key, hours, usd))
        return out

    def _per_step_s(self) -> Optional[float]:
        """Average wall seconds per optimizer step, evaluation and checkpoint time included."""
        if self.step <= 0:
            return None
        work = self.seconds["train"] + self.seconds["eval"] + self.seconds["checkpoint"]
        return work / self.step if work > 0 else None

    def _forecast(self, hours_key: str, hours: float, usd: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        per_step = self._per_step_s()
        price = self.pricing.usd_per_unit_hour
        if self.total_steps:
            if per_step is None:
                out.update({"forecast/eta_s": None, f"forecast/{hours_key}_at_end": None,
                            "forecast/usd_at_end": None})
            else:
                rest_s = max(self.total_steps - self.step, 0) * per_step
                out["forecast/eta_s"] = rest_s
                out[f"forecast/{hours_key}_at_end"] = hours + self._hours(rest_s)
                out["forecast/usd_at_end"] = (hours + self._hours(rest_s)) * price
        if self.target_loss is not None:
            target_step: Optional[float] = None
            at_hours: Optional[float] = None
            if self.target_reached is not None:
                if "usd" not in self.target_reached:
                    self.target_reached.update(unit_hours=hours, usd=usd)
                target_step = self.target_reached["step"]
                at_hours = self.target_reached["unit_hours"]
            elif per_step is not None:
                fit = self.loss_fit()
                t = steps_to_loss(fit, self.target_loss) if fit is not None else None
                if t is not None and t <= 100 * max(self.step, 1):  # no wild extrapolation
                    target_step = max(t, float(self.step))
                    at_hours = hours + self._hours((target_step - self.step) * per_step)
            out["forecast/target_step"] = target_step
            out[f"forecast/{hours_key}_to_target"] = at_hours
            out["forecast/usd_to_target"] = at_hours * price if at_hours is not None else None
        return out

    def loss_fit(self) -> Optional[tuple[float, float, float]]:
        """Power-law fit of the logged losses, skipping the first 10% of the steps (warm-up transients);
        cached until a new loss arrives."""
        if self._fit_cache[0] != len(self.history):
            if self.history:
                skip = 0.1 * self.history[-1][0]
                pts = [p for p in self.history if p[0] >= skip]
                fit = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
            else:
                fit = None
            self._fit_cache = (len(self.history), fit)
        return self._fit_cache[1]

    # ----- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain JSON totals (collective when ``reduce_sum`` is set: call on every rank)."""
        self._charge()
        return {"seconds": dict(self.seconds), "tokens": self.tokens, "step": self.step,
                "unit_hours": self.unit_hours(),
                "restarts": self.restarts, "energy_kwh": self.energy_kwh(),
                "history": [list(p) for p in self.history], "target_reached": self.target_reached}

    def load_state_dict(self, state: dict) -> None:
        """Adds a checkpoint's totals. Its unit-hours keep the world size they were charged at (a resume on more
        or fewer ranks bills only the new launch at the new size; checkpoints from before ``unit_hours`` was
        saved are billed at this launch's size)."""
        restored = sum(float(state["seconds"].get(p, 0.0)) for p in PHASES)
        for p in PHASES:
            self.seconds[p] += float(state["seconds"].get(p, 0.0))
        self._prev_seconds += restored
        self._prev_unit_hours += float(state["unit_hours"]) if state.get("unit_hours") is not None \
            else self._hours(restored)
        self.tokens = int(state["tokens"])
        self.step = int(state.get("step", 0))
        self.restarts += int(state.get("restarts", 0))
        self._energy_prev_kwh += float(state.get("energy_kwh") or 0.0)
        self.history = [list(p) for p in state.get("history", [])]
        self.target_reached = state.get("target_reached")
        self._window = (self._mark, self.tokens)

    def close(self) -> None:
        if self.energy is not None and hasattr(self.energy, "close"):
            self.energy.close()


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


# ------------------------------------------------------------------------------------------------
# Estimator CLI
# ------------------------------------------------------------------------------------------------

class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake as one ``error:`` line (exit code 2) instead of the usage text."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(message)


def estimate(flops_per_token: float, tokens: float, gpus: int, gpu: str, mfu: Optional[float] = None,
             tokens_per_gpu_s: Optional[float] = None, gpu_hour_usd: Optional[float] = None) -> dict:
    """GPU-hours, days and dollars to train on ``tokens`` tokens.

    Exactly one of ``mfu`` (fraction of the GPU's dense BF16 peak) or ``tokens_per_gpu_s`` (measured
    throughput per GPU) sets the speed; the other is derived. Raises ValueError on bad input.
    """
    key = gpu.lower()
    if key not in GPU_SPECS:
        raise ValueError(f"--gpu {gpu}: unknown GPU; choose one of {', '.join(GPU_SPECS)}")
    if (mfu is None) == (tokens_per_gpu_s is None):
        raise ValueError("give exactly one of --mfu or --tokens-per-gpu-s")
    if tokens <= 0 or gpus <= 0:
        raise ValueError("--tokens and --gpus must be > 0")
    spec = GPU_SPECS[key]
    peak = spec["bf16_flops"]
    if mfu is not None:
        if not 0.0 < mfu <= 1.0:
            raise ValueError(f"--mfu {mfu}: must be in (0, 1], e.g. 0.39")
        tokens_per_gpu_s = mfu * peak / flops_per_token
    else:
        if tokens_per_gpu_s <= 0:
            raise ValueError(f"--tokens-per-gpu-s {tokens_per_gpu_s}: must be > 0")
        mfu = tokens_per_gpu_s * flops_per_token / peak
    price = gpu_hour_usd if gpu_hour_usd is not None else spec["usd_per_hour"]
    gpu_hours = tokens / tokens_per_gpu_s / 3600.0
    return {
        "flops_per_token": flops_per_token,
        "total_flops": flops_per_token * tokens,
        "gpu_hours": gpu_hours,
        "days": gpu_hours / gpus / 24.0,
        "usd": gpu_hours * price,
        "tokens": tokens,
        "gpus": gpus,
        "gpu": key,
        "peak_flops_per_gpu": peak,
        "mfu": mfu,
        "tokens_per_gpu_s": tokens_per_gpu_s,
        "usd_per_gpu_hour": price,
        # the GPUs alone at their TDP: an upper bound that leaves out hosts, network and cooling
        "kwh_at_tdp": gpu_hours * spec["tdp_w"] / 1000.0,
    }


def _estimate_cli(argv: list[str]) -> int:
    p = _Parser(prog="python -m moetrain.economics estimate",
                description="Estimate FLOPs, GPU-hours, days and dollars of a training run.")
    p.add_argument("--config", help="YAML config (e.g. configs/deepseek-v3.yaml); the schema defaults if omitted")
    p.add_argument("--tokens", type=float, required=True, help="training tokens, e.g. 14.8e12")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu", required=True, help=f"GPU type: {', '.join(GPU_SPECS)}")
    p.add_argument("--mfu", type=float, help="model FLOPs utilisation of the dense BF16 peak, e.g. 0.39")
    p.add_argument("--tokens-per-gpu-s", type=float, help="measured tokens/s per GPU (instead of --mfu)")
    p.add_argument("--gpu-hour-usd", type=float, help="price per GPU-hour (default: the GPU type's)")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the config's train.seq_len)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. model.n_layers=30")
    ns = p.parse_intermixed_args(argv)
    from moetrain.config import load_config, model_args
    from moetrain.model.args import flops_per_token, param_counts
    overrides = list(ns.overrides) + ([f"train.seq_len={ns.seq_len}"] if ns.seq_len else [])
    cfg = load_config(ns.config, overrides)
    args = model_args(cfg)
    seq = int(cfg.train.seq_len)
    fpt = flops_per_token(args, seq, training=True)
    res = estimate(fpt, ns.tokens, ns.gpus, ns.gpu, mfu=ns.mfu, tokens_per_gpu_s=ns.tokens_per_gpu_s,
                   gpu_hour_usd=ns.gpu_hour_usd)
    counts = param_counts(args)
    res.update(seq_len=seq, flavor=cfg.model.flavor, params_total=counts["total"],
               params_activated=counts["activated"])
    if ns.json:
        print(json.dumps(res))
        return 0
    r = res
    print(f"model        {r['flavor']}: {counts['total'] / 1e9:,.1f}B params, {counts['activated'] / 1e9:,.2f}B "
          f"activated per token")
    print(f"FLOPs/token  {fpt / 1e9:,.1f} GFLOPs (training, seq {seq}: 6 x activated matmul params + attention)")
    print(f"total FLOPs  {r['total_flops']:.3e} over {r['tokens'] / 1e12:,.3g}T tokens")
    print(f"speed        {r['gpus']:,} x {r['gpu']} ({r['peak_flops_per_gpu'] / 1e12:,.0f} TFLOP/s dense BF16): "
          f"MFU {100 * r['mfu']:.1f}%, {r['tokens_per_gpu_s']:,.0f} tokens/s per GPU")
    print(f"GPU-hours    {r['gpu_hours']:,.0f} ({r['gpu_hours'] / 1e6:,.3f}M)")
    print(f"wall-clock   {r['days']:,.1f} days on {r['gpus']:,} GPUs")
    print(f"cost         ${r['usd']:,.0f} at ${r['usd_per_gpu_hour']:.2f}/GPU-hour")
    print(f"energy       <= {r['kwh_at_tdp'] / 1e3:,.0f} MWh (GPUs at TDP; hosts, network, cooling excluded)")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m moetrain.economics estimate --config CONFIG --tokens N --gpus N --gpu TYPE "
              "(--mfu F | --tokens-per-gpu-s N) [--gpu-hour-usd USD] [--seq-len T] [key=value ...] [--json]")
        return 0 if argv else 2
    if argv[0] != "estimate":
        print(f"error: unknown command {argv[0]!r}; the command is 'estimate'", file=sys.stderr)
        return 2
    from moetrain.config import ConfigError
    try:
        return _estimate_cli(argv[1:])
    except (_UsageError, ConfigError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else repr(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
