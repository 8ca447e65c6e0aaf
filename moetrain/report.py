"""Plots and a comparison table of training runs, from their ``metrics.jsonl`` alone.

    python -m moetrain.report RUN_DIR [RUN_DIR ...] [--out DIR]

Writes to ``--out`` (default ``RUN_DIR/report`` for one run, ``./report`` for several):

* ``loss_vs_usd.png``    training loss (lines) and validation loss (markers) against dollars spent;
* ``loss_vs_hours.png``  the same against GPU-hours (CPU runs: CPU core-hours, labelled so);
* ``throughput.png``     tokens/s and MFU against optimizer steps (MFU only where the device's peak is known);
* ``expert_load.png``    MoE load imbalance (max/mean expert load, mean over layers) against steps;
* ``summary.md``         one row per run: final train/val loss, $, GPU-hours, kWh, $ per 1M tokens, goodput,
  and the $ at which each run first reached a shared loss level (the best training loss every run
  reached); ``summary.json`` holds the same numbers unformatted.

A missing or empty ``metrics.jsonl`` is reported as one ``error:`` line, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional


class ReportError(Exception):
    """A problem with the input runs; printed as one ``error:`` line (exit code 2)."""


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

class Run:
    """The records of one run: ``train`` (lines with ``loss``) and ``evals`` (lines with ``val/loss``)."""

    def __init__(self, run_dir: Path, records: list[dict], name: str):
        self.dir, self.records, self.name = run_dir, records, name
        self.train = [r for r in records if _num(r.get("loss")) is not None]
        self.evals = [r for r in records if _num(r.get("val/loss")) is not None]
        gpu_hours = max((_num(r.get("cost/gpu_hours")) or 0.0 for r in records), default=0.0)
        self.cpu = gpu_hours == 0.0 and any(_num(r.get("cost/cpu_core_hours")) is not None for r in records)
        self.hours_key = "cost/cpu_core_hours" if self.cpu else "cost/gpu_hours"

    def last(self, key: str) -> Optional[float]:
        """The value of ``key`` on the last record that has it (totals grow monotonically)."""
        for r in reversed(self.records):
            v = _num(r.get(key))
            if v is not None:
                return v
        return None

    def series(self, records: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
        pts = [(_num(r.get(x)), _num(r.get(y))) for r in records]
        pts = [(a, b) for a, b in pts if a is not None and b is not None]
        return [a for a, _ in pts], [b for _, b in pts]


def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def load_run(run_dir: str | Path, name: Optional[str] = None) -> Run:
    """Reads ``run_dir/metrics.jsonl``; skips a line cut short by a kill. Raises ReportError."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path}: not found; give the run.dir of a training run")
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    run = Run(run_dir, records, name or run_dir.resolve().name)
    if not run.train:
        raise ReportError(f"{path}: no training records (empty or not a moetrain metrics file)")
    return run


# ------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------

def shared_loss_level(runs: list[Run]) -> float:
    """The best training loss that every run reached: the largest of the runs' minimum losses."""
    return max(min(_num(r["loss"]) for r in run.train) for run in runs)  # type: ignore[type-var]


def first_reach(run: Run, level: float) -> Optional[dict]:
    """The first training record whose loss is <= ``level`` (None if never)."""
    for r in run.train:
        if _num(r["loss"]) <= level:  # type: ignore[operator]
            return r
    return None


def summarize(runs: list[Run]) -> dict:
    """Numbers of the comparison table (JSON-serialisable)."""
    level = shared_loss_level(runs)
    rows = []
    for run in runs:
        usd, tokens = run.last("cost/usd"), run.last("tokens")
        hit = first_reach(run, level)
        rows.append({
            "run": run.name,
            "dir": str(run.dir),
            "device": "cpu" if run.cpu else "gpu",
            "steps": int(run.last("step") or 0),
            "tokens": int(tokens or 0),
            "train_loss": _num(run.train[-1]["loss"]),
            "val_loss": _num(run.evals[-1]["val/loss"]) if run.evals else None,
            "usd": usd,
            "hours": run.last(run.hours_key),
            "hours_unit": "cpu_core_hours" if run.cpu else "gpu_hours",
            "kwh": run.last("cost/energy_kwh"),
            "usd_per_1m_tokens": usd / tokens * 1e6 if usd is not None and tokens else None,
            "goodput": run.last("time/goodput"),
            "shared_loss_step": int(hit["step"]) if hit else None,
            "usd_to_shared_loss": _num(hit.get("cost/usd")) if hit else None,
            "hours_to_shared_loss": _num(hit.get(run.hours_key)) if hit else None,
        })
    return {"shared_loss": level, "runs": rows}


def _usd(v: Optional[float]) -> str:
    if v is None:
        return "n/a"
    if v >= 100:
        return f"${v:,.0f}"
    if v >= 1:
        return f"${v:,.2f}"
    return f"${v:.3g}"


def _g(v: Optional[float], digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def _hours(v: Optional[float], cpu: bool) -> str:
    return "n/a" if v is None else f"{v:.4g}" + (" core-h" if cpu else "")


def markdown_table(summary: dict) -> str:
    lvl = summary["shared_loss"]
    head = ["run", "steps", "tokens", "train loss", "val loss", "$", "GPU-hours", "kWh", "$ / 1M tokens",
            "goodput", f"$ to loss {lvl:.4f}"]
    lines = ["# Run comparison", "",
             f"Shared loss level: {lvl:.4f} (training loss; the best loss every run reached). "
             "\"$ to loss\" is the cost at which each run first reached it.",
             "CPU runs count CPU core-hours (\"core-h\") in the GPU-hours column; kWh is n/a without NVML.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["runs"]:
        cpu = r["device"] == "cpu"
        cells = [r["run"], str(r["steps"]), f"{r['tokens']:,}", _g(r["train_loss"]), _g(r["val_loss"]),
                 _usd(r["usd"]), _hours(r["hours"], cpu), _g(r["kwh"]), _usd(r["usd_per_1m_tokens"]),
                 "n/a" if r["goodput"] is None else f"{100 * r['goodput']:.1f}%",
                 _usd(r["usd_to_shared_loss"]) + (f" (step {r['shared_loss_step']})" if r["shared_loss_step"] else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("matplotlib is not installed; pip install 'moetrain[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _loss_plot(plt, runs: list[Run], x_of, xlabel: str, title: str, path: Path, level: float) -> None:
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        x_key, label = x_of(run)
        xs, ys = run.series(run.train, x_key, "loss")
        ax.plot(xs, ys, color=color, lw=1.2, label=f"{label} train")
        vx, vy = run.series(run.evals, x_key, "val/loss")
        if vx:
            ax.plot(vx, vy, "o--", color=color, ms=5, lw=0.8, label=f"{label} val")
    ax.axhline(level, color="grey", lw=0.8, ls=":", label=f"shared loss {level:.3f}")
    if x_of(runs[0])[0] == "cost/usd":
        from matplotlib.ticker import FuncFormatter
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: "$0" if v == 0 else _usd(v)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_all(runs: list[Run], out: Path, level: float) -> list[Path]:
    plt = _pyplot()
    paths = [out / "loss_vs_usd.png", out / "loss_vs_hours.png", out / "throughput.png", out / "expert_load.png"]

    _loss_plot(plt, runs, lambda r: ("cost/usd", r.name), "cost (USD)", "Loss vs dollars", paths[0], level)
    kinds = {r.cpu for r in runs}
    hours_label = ("CPU core-hours" if kinds == {True} else "GPU-hours" if kinds == {False}
                   else "GPU-hours (CPU runs: CPU core-hours)")
    _loss_plot(plt, runs, lambda r: (r.hours_key, r.name + (" (core-h)" if r.cpu and len(kinds) > 1 else "")),
               hours_label, f"Loss vs {hours_label}", paths[1], level)

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), dpi=100, sharex=True)
    any_mfu = False
    for i, run in enumerate(runs):
        xs, ys = run.series(run.train, "step", "perf/tokens_per_s")
        ax1.plot(xs, ys, color=f"C{i % 10}", lw=1.2, label=run.name)
        mx, my = run.series(run.train, "step", "perf/mfu")
        if mx:
            any_mfu = True
            ax2.plot(mx, [100 * v for v in my], color=f"C{i % 10}", lw=1.2, label=run.name)
    ax1.set_ylabel("tokens/s (all ranks)")
    ax1.set_title("Throughput")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_ylabel("MFU (%)")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    if not any_mfu:
        ax2.text(0.5, 0.5, "MFU not available\n(no known peak FLOP/s for these devices, e.g. CPU runs)",
                 ha="center", va="center", transform=ax2.transAxes, color="grey")
    else:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[2])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, run in enumerate(runs):
        xs, ys = run.series(run.train, "step", "moe/load_imbalance")
        ax.plot(xs, ys, color=f"C{i % 10}", lw=1.2, label=run.name)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":", label="perfect balance")
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean expert load")
    ax.set_title("Expert load imbalance (mean over MoE layers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[3])
    plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def make_report(run_dirs: list[str | Path], out: Optional[str | Path] = None) -> dict:
    """Loads the runs, writes plots, summary.md and summary.json to ``out``; returns the summary with
    ``files`` (the paths written). Raises ReportError."""
    if not run_dirs:
        raise ReportError("give at least one RUN_DIR")
    names = [Path(d).resolve().name for d in run_dirs]
    runs = [load_run(d, name=(str(d) if names.count(n) > 1 else n)) for d, n in zip(run_dirs, names)]
    out_dir = Path(out) if out else (Path(run_dirs[0]) / "report" if len(runs) == 1 else Path("report"))
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    files = plot_all(runs, out_dir, summary["shared_loss"])
    (out_dir / "summary.md").write_text(markdown_table(summary))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    files += [out_dir / "summary.md", out_dir / "summary.json"]
    return {**summary, "files": [str(f) for f in files]}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moetrain.report", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/report for one run, ./report for several)")
    ns = p.parse_args(argv)
    try:
        result = make_report(ns.run_dirs, ns.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(result), end="")
    print("wrote " + ", ".join(result["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
