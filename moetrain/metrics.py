"""Metric sinks: metrics.jsonl (always), console, Weights & Biases and TensorBoard (optional).

Every logged step becomes one JSON object per line in ``<run_dir>/metrics.jsonl`` (keys such as
``step``, ``tokens``, ``loss``, ``lr``, ``grad_norm``, ``perf/tokens_per_s``, ``perf/mfu``,
``cost/gpu_hours``, ``cost/usd``, ``moe/aux_loss``, ``moe/load_imbalance``, ``mem/peak_gib``; eval lines
carry ``val/loss``). The same dict goes to W&B with ``define_metric`` so that every loss can be plotted
against ``cost/usd`` and ``cost/gpu_hours``. Only rank 0 logs.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional


def _clean(value: Any) -> Any:
    """JSON-safe scalars: tensors to floats, NaN/inf to None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlSink:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = open(self.path, "a", buffering=1)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def close(self) -> None:
        self.file.close()


class WandbSink:
    """One W&B run per training job. ``mode`` is 'online' or 'offline'; online without an API key
    falls back to offline (nothing is asked interactively)."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict, mode: str, resume_id: Optional[str]):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("logging.wandb: the wandb package is not installed; "
                               "pip install 'moetrain[wandb]' or set logging.wandb=disabled") from None
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
            mode = "offline"
        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, config=config, dir=str(run_dir), mode=mode,
                              id=resume_id, resume="allow", settings=wandb.Settings(silent=True))
        for x_axis in ("cost/usd", "cost/gpu_hours", "tokens"):
            self.run.define_metric(x_axis)
        for metric in ("loss", "val/loss"):
            self.run.define_metric(metric, step_metric="step")
        self.run.define_metric("*", step_metric="step")

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, record: dict) -> None:
        self.run.log({k: _clean(v) for k, v in record.items() if _clean(v) is not None})

    def summary(self, totals: dict) -> None:
        for k, v in totals.items():
            if _clean(v) is not None:
                self.run.summary[k] = _clean(v)

    def close(self) -> None:
        self.run.finish()


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class TensorBoardSink:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError("logging.tensorboard: tensorboard is not installed; "
                               "pip install 'moetrain[tensorboard]' or set logging.tensorboard=false") from None
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict) -> None:
        step = record.get("step", 0)
        for k, v in record.items():
            v = _clean(v)
            if isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class MetricLogger:
    """Fans a record out to every sink. On ranks other than 0 it does nothing."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, record: dict) -> None:
        for s in self.sinks:
            s.log(record)

    def summary(self, totals: dict) -> None:
        for s in self.sinks:
            if hasattr(s, "summary"):
                s.summary(totals)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
