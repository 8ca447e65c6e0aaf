"""Metric sinks: metrics.jsonl (always), console, Weights & Biases and TensorBoard (optional).

Every logged step becomes one JSON object per line in ``<run_dir>/metrics.jsonl`` (keys such as
``step``, ``tokens``, ``loss``, ``lr``, ``grad_norm``, ``perf/tokens_per_s``, ``perf/mfu``,
``cost/gpu_hours``, ``cost/usd``, ``moe/aux_loss``, ``moe/load_imbalance``, ``mem/peak_gib``; eval lines
carry ``val/loss`` and the cost keys, no throughput). The same dict goes to W&B with ``define_metric`` so that every loss can be plotted
against ``cost/usd`` and ``cost/gpu_hours``. Only rank 0 logs.
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import time
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def close(self) -> None:
        self.file.close()


LOSS_KEYS = ("loss", "val/loss", "moe/aux_loss")
# Each loss is also logged under these prefixes, with the cost axis as its W&B step metric, so that the
# automatic charts show loss against dollars and GPU-hours (a W&B metric has one x-axis).
COST_AXES = {"usd": "cost/usd", "gpu_hours": "cost/gpu_hours", "cpu_core_hours": "cost/cpu_core_hours"}


class WandbSink:
    """One W&B run per training job (rank 0 only), resumed under the same id after a restart.

    ``mode`` is 'online' or 'offline'; online without an API key (``WANDB_API_KEY`` or ~/.netrc) falls back
    to offline, and nothing is ever asked interactively. Files go to ``$WANDB_DIR`` if set, else the run
    directory (``<dir>/wandb/offline-run-*``; upload later with ``wandb sync``).

    Charts: every metric is plotted against ``step``; each loss (:data:`LOSS_KEYS`) is also logged as
    ``vs_usd/<loss>`` against ``cost/usd`` and ``vs_gpu_hours/<loss>`` against ``cost/gpu_hours`` (CPU runs:
    ``vs_cpu_core_hours/<loss>`` against ``cost/cpu_core_hours``). Losses keep min and last in the summary;
    :meth:`summary` writes the run's totals (cost, time, goodput, energy) at the end.
    """

    def __init__(self, run_dir: Path, project: str, name: str, config: dict, mode: str,
                 resume_id: Optional[str], hours_key: str = "cost/gpu_hours"):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("logging.wandb: the wandb package is not installed; "
                               "pip install 'moetrain[wandb]' or set logging.wandb=disabled") from None
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
            mode = "offline"
            print("logging.wandb=online: no W&B API key (WANDB_API_KEY or ~/.netrc); logging offline, "
                  "upload later with `wandb sync`", flush=True)
        self.wandb = wandb
        self.axes = {"usd": COST_AXES["usd"],
                     "cpu_core_hours" if hours_key.endswith("cpu_core_hours") else "gpu_hours": hours_key}
        wandb_dir = Path(os.environ.get("WANDB_DIR") or run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        run_id = resume_id or _job_run_id(Path(run_dir))
        config = {**config, "launch": launch_metadata()}
        kwargs = dict(project=project, name=name, config=config, dir=str(wandb_dir), id=run_id,
                      resume="allow", settings=wandb.Settings(silent=True, console="off"))
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as e:
            if mode != "online":
                raise
            print(f"logging.wandb=online: W&B init failed ({str(e).splitlines()[0]}); logging offline", flush=True)
            self.run = wandb.init(mode="offline", **kwargs)
        self.mode = mode
        run = self.run
        run.define_metric("step")
        for axis in self.axes.values():
            run.define_metric(axis, step_metric="step", summary="last")
        for key in LOSS_KEYS:
            run.define_metric(key, step_metric="step", summary="min,last")
            for prefix, axis in self.axes.items():
                run.define_metric(f"vs_{prefix}/{key}", step_metric=axis, summary="min,last")
        run.define_metric("*", step_metric="step")

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, record: dict) -> None:
        data = {k: _clean(v) for k, v in record.items()}
        data = {k: v for k, v in data.items() if isinstance(v, (int, float))}
        for key in LOSS_KEYS:
            if key in data:
                for prefix, axis in self.axes.items():
                    if axis in data:
                        data[f"vs_{prefix}/{key}"] = data[key]
        self.run.log(data)

    def summary(self, totals: dict) -> None:
        """Final totals into the run summary (losses keep their min/last aggregates)."""
        for k, v in totals.items():
            v = _clean(v)
            if v is not None and k not in LOSS_KEYS:
                self.run.summary[k] = v
        if totals.get("val/loss") is not None:
            self.run.summary["final/val_loss"] = _clean(totals["val/loss"])
        if str(totals.get("stopped_by") or "").startswith("SIG"):
            self.run.mark_preempting()  # stopped by a signal: the job is expected to resume

    def close(self) -> None:
        self.run.finish()
        self.wandb.teardown()  # waits until the W&B service has written everything (offline files too)


def _job_run_id(run_dir: Path) -> Optional[str]:
    """Under SLURM, a W&B id fixed by the job, so a requeued job continues the same W&B run even when it
    was stopped before its first checkpoint (which is where the id is otherwise kept)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    name = re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.resolve().name)[:40]
    return f"{name}-slurm{job}"


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


# ------------------------------------------------------------------------------------------------
# Run metadata: who launched this run, where (SLURM job id), and how often it restarted
# ------------------------------------------------------------------------------------------------

_SLURM_VARS = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID",
               "job_name": "SLURM_JOB_NAME", "restart_count": "SLURM_RESTART_COUNT",
               "nodelist": "SLURM_JOB_NODELIST", "nnodes": "SLURM_JOB_NUM_NODES", "partition": "SLURM_JOB_PARTITION"}


def launch_metadata() -> dict:
    """This launch, from the environment: host, time, world size and the SLURM job (id, restart count,
    nodes) when run under SLURM (``slurm`` is None otherwise)."""
    slurm = {k: os.environ[v] for k, v in _SLURM_VARS.items() if os.environ.get(v)}
    if slurm:
        slurm.setdefault("restart_count", "0")
    return {"host": socket.gethostname(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")), "slurm": slurm or None}


def write_run_metadata(run_dir: str | os.PathLike, **extra: Any) -> dict:
    """Appends this launch to ``<run_dir>/run.json`` (atomically) and returns the whole file's content:
    ``{"slurm_job_id": <latest or None>, "launches": [{host, started_at, world_size, slurm, **extra}, ...]}``.
    """
    path = Path(run_dir) / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("launches"), list):
            raise ValueError
    except (OSError, ValueError):
        data = {"launches": []}
    launch = {**launch_metadata(), **{k: _clean(v) for k, v in extra.items()}}
    data["launches"].append(launch)
    data["slurm_job_id"] = (launch["slurm"] or {}).get("job_id", data.get("slurm_job_id"))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return data


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
