"""Issues 4 and 5 end to end: the same training run (config, seed, data) in several variants, one GPU.

    python3 benchmarks/train_step.py --out $OUT                           # tinyshakespeare, 300 steps, 6 variants
    python3 benchmarks/train_step.py --variants bf16 fp8-blockwise        # a subset
    # GPU-filling: 3.3B params (16 experts top-8, dim 2048, 20 layers, seq 4096), ~1 s/step -> fewer steps
    python3 benchmarks/train_step.py --config configs/scale-ep8.yaml --steps 30 --log-every 5 \\
        --set parallel.ep=1 model.n_routed_experts=16 model.n_expert_groups=1 model.n_limited_groups=1 \\
        train.batch_size=2
    OMP_NUM_THREADS=1 python benchmarks/train_step.py --cpu               # tiny CPU check of the code path (~3 min)

Variants (each a fresh ``python -m moetrain.train --config CONFIG`` in a new run directory, ``resume=never``,
no checkpoints, evaluation only at the end, ``--steps`` steps logged every ``--log-every``):

    bf16                    precision.dtype=bf16 (baseline; fp32 with --cpu)
    kernels                 + kernels.enabled=true            (issue 4: Triton kernels in the model)
    fp8-tensorwise          + precision.fp8=tensorwise        (issue 5)
    fp8-rowwise             + precision.fp8=rowwise
    fp8-blockwise           + precision.fp8=blockwise         (DeepSeek-V3's 1x128 / 128x128 scaling)
    fp8-blockwise+kernels   + precision.fp8=blockwise kernels.enabled=true
  asked for by name:
    bf16-foreach-adamw      + train.optimizer_impl=foreach    (the optimizer A/B)
    fp8-blockwise+kernels+per-expert   + precision.fp8_expert_gemm=per_expert (routed experts on cuBLAS; the
                            default "auto" picks it at ep = 1 when the experts average >= 1024 rows)
    fp8-blockwise+kernels+grouped      + precision.fp8_expert_gemm=grouped (routed experts on the Triton kernels)
    fp8-rowwise+kernels, fp8-tensorwise+kernels   the other recipes with the kernels

The default order puts the runs issue 5 needs first (bf16, fp8-blockwise), so a deadline cuts the others.

Per variant, from its ``metrics.jsonl`` (the helpers of benchmarks/scale.py):

    tokens/s, step ms, MFU  steady state: the first logging window dropped (start-up, Triton autotuning)
    speed-up                tokens/s / bf16's tokens/s
    final loss              mean training loss over the last 5 logged steps that the variant and bf16 share
    loss vs bf16            (final loss - bf16's final loss) / bf16's final loss, over those same steps
    val loss                the evaluation at the end
    peak GiB                mem/peak_gib (GPU only)

Flags (targets): kernels on vs off give the same loss within 1% relative on a 300-step run (``kernels`` vs
``bf16``, ``fp8-blockwise+kernels`` vs ``fp8-blockwise``; the kernels change rounding, and 300 Adam steps let that
grow, but a wrong gradient shows up as several %); every FP8 variant's final loss within 0.25% relative of bf16's
(DeepSeek-V3's bound for its FP8 training); every FP8 variant >= 1.3x bf16's tokens/s. A failed loss-parity flag
makes the exit code 1; a missed speed target does not.

Outputs under --out: ``train_step_<stamp>.md`` (the table, printed last), ``.json`` (everything),
``train_step_<stamp>_loss.png`` (loss vs step of every variant, and the relative difference to bf16), and
``runs_<stamp>/<variant>/{metrics.jsonl, config.yaml, run.json, train.log}``. A ``--deadline-s`` budget (default
540 s) skips the runs that would start after it and SIGKILLs one still running at it; the files are always written.
Not part of CI (tests/test_train_step_script.py checks the summary, table and flags on synthetic metrics).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import (ROOT, Runner, _device_info, _fmt, _gpu_count, _num, step_losses,  # noqa: E402
                   summarize_throughput)

VARIANTS = {
    "bf16": [],
    "fp8-blockwise": ["precision.fp8=blockwise"],
    "kernels": ["kernels.enabled=true"],
    "fp8-blockwise+kernels": ["precision.fp8=blockwise", "kernels.enabled=true"],
    "fp8-rowwise": ["precision.fp8=rowwise"],
    "fp8-tensorwise": ["precision.fp8=tensorwise"],
    # asked for by name (GPU-sized configs):
    "bf16-foreach-adamw": ["train.optimizer_impl=foreach"],  # bf16 with the foreach AdamW instead of auto's fused
    "fp8-blockwise+kernels+per-expert": ["precision.fp8=blockwise", "kernels.enabled=true",
                                         "precision.fp8_expert_gemm=per_expert"],
    "fp8-blockwise+kernels+grouped": ["precision.fp8=blockwise", "kernels.enabled=true",
                                      "precision.fp8_expert_gemm=grouped"],
    "fp8-rowwise+kernels": ["precision.fp8=rowwise", "kernels.enabled=true"],
    "fp8-tensorwise+kernels": ["precision.fp8=tensorwise", "kernels.enabled=true"],
}
DEFAULT_VARIANTS = ["bf16", "fp8-blockwise", "kernels", "fp8-blockwise+kernels", "fp8-rowwise", "fp8-tensorwise"]
BASELINE = "bf16"
KERNEL_PAIRS = (("kernels", "bf16"), ("fp8-blockwise+kernels", "fp8-blockwise"), ("fp8-rowwise+kernels", "fp8-rowwise"))
TOL = {"kernels_rel": 0.01, "fp8_rel": 0.0025, "fp8_speedup": 1.3}
LAST_N = 5
CPU_CONFIG = "configs/debug.yaml"
# --cpu: the Triton interpreter takes ~6 s a step even at this size, so the CPU check is tiny and short
CPU_SET = ("train.batch_size=2", "train.seq_len=32", "train.eval_batches=1", "train.warmup_steps=2")


# --------------------------------------------------------------------------------------------
# summaries, table, flags (pure functions; tests/test_train_step_script.py)
# --------------------------------------------------------------------------------------------

def final_loss(losses: dict[int, float], ref: Optional[dict[int, float]] = None, last_n: Optional[int] = None) -> dict:
    """Mean training loss over the last ``last_n`` (default ``LAST_N``, ``--last-n``) logged steps (those shared with
    ``ref`` when given) and, with ``ref``, the relative difference ``(mean - ref_mean) / ref_mean`` over them."""
    last_n = LAST_N if last_n is None else last_n
    steps = sorted(set(losses) & set(ref)) if ref is not None else sorted(losses)
    steps = [s for s in steps if math.isfinite(losses[s]) and (ref is None or math.isfinite(ref[s]))][-last_n:]
    if not steps:
        return {"loss": None, "rel_vs_ref": None, "steps": []}
    mean = sum(losses[s] for s in steps) / len(steps)
    out = {"loss": mean, "rel_vs_ref": None, "steps": steps}
    if ref is not None:
        rmean = sum(ref[s] for s in steps) / len(steps)
        out["ref_loss"] = rmean
        out["rel_vs_ref"] = (mean - rmean) / abs(rmean) if rmean else None
    return out


def summarize_variant(recs: list[dict], base_recs: Optional[list[dict]], skip_windows: int = 1) -> dict:
    """One variant's row: scale.py's throughput summary plus the final loss (vs the baseline's) and val loss.
    An unfinished run's last losses may be non-finite (divergence): those make ``diverged`` True."""
    s = summarize_throughput(recs, 1, skip_windows)
    losses = step_losses(recs)
    s["diverged"] = any(not math.isfinite(v) for v in losses.values())
    s["logged_steps"] = len(losses)
    s["last_step"] = max(losses) if losses else None
    own = final_loss(losses)
    s["final_loss"] = own["loss"]
    if base_recs is not None:
        cmp = final_loss(losses, step_losses(base_recs))
        s["final_loss_shared"], s["loss_rel_vs_base"], s["loss_steps"] = cmp["loss"], cmp["rel_vs_ref"], cmp["steps"]
    vals = [r for r in recs if _num(r.get("val/loss")) is not None]
    s["val_loss"] = float(vals[-1]["val/loss"]) if vals else None
    return s


def add_relative(rows: list[dict]) -> None:
    """Speed-up vs the baseline row (in place)."""
    base = next((r for r in rows if r["variant"] == BASELINE), None)
    btps = (base or {}).get("summary", {}).get("tokens_per_s")
    for r in rows:
        tps = r.get("summary", {}).get("tokens_per_s")
        r["summary"]["speedup"] = tps / btps if tps and btps else None


def check_flags(rows: list[dict], tol: dict = TOL) -> list[dict]:
    """``[{"target", "value", "ok"}]``, ``ok`` None where a run is missing or did not finish."""
    by = {r["variant"]: r for r in rows}

    def done(name):
        r = by.get(name)
        return r if r is not None and r.get("status") == "ok" and r["summary"].get("steps") else None

    out = []
    for a, b in KERNEL_PAIRS:
        if a not in by:
            continue
        ra, rb = done(a), done(b)
        val = None
        if ra and rb:
            cmp = final_loss(step_losses(ra["records"]), step_losses(rb["records"]))
            val = cmp["rel_vs_ref"]
        out.append({"target": f"kernels on vs off: {a} vs {b}, final loss |rel diff| <= {tol['kernels_rel']:.2%}",
                    "kind": "loss", "value": val, "ok": None if val is None else abs(val) <= tol["kernels_rel"]})
    base = done(BASELINE)
    for name in by:
        if not name.startswith("fp8"):
            continue
        r = done(name)
        val = r["summary"].get("loss_rel_vs_base") if r and base else None
        out.append({"target": f"FP8 loss: {name} vs {BASELINE}, final loss |rel diff| <= {tol['fp8_rel']:.2%}",
                    "kind": "loss", "value": val, "ok": None if val is None else abs(val) <= tol["fp8_rel"]})
        sp = r["summary"].get("speedup") if r and base else None
        out.append({"target": f"FP8 speed: {name} >= {tol['fp8_speedup']:.1f}x {BASELINE} tokens/s",
                    "kind": "speed", "value": sp, "ok": None if sp is None else sp >= tol["fp8_speedup"]})
    return out


def flags_text(flags: list[dict]) -> str:
    lines = []
    for f in flags:
        v = f["value"]
        shown = "n/a" if v is None else (f"{v:+.3%}" if f["kind"] == "loss" else f"{v:.2f}x")
        verdict = "not measured" if f["ok"] is None else ("met" if f["ok"] else "NOT met")
        lines.append(f"- {f['target']}: {shown} -> {verdict}")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    out = [f"| variant | overrides | tokens/s | vs {BASELINE} | step ms | MFU | final loss (last {LAST_N} logs) | "
           f"loss vs {BASELINE} | val loss | peak GiB | steps | status |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        s = r.get("summary") or {}
        mfu = _fmt(s.get("mfu"), ".1f", 100)
        rel = s.get("loss_rel_vs_base")
        out.append(f"| {r['variant']} | `{' '.join(r.get('overrides_shown', [])) or '-'}` | "
                   f"{_fmt(s.get('tokens_per_s'), ',.0f')} | {_fmt(s.get('speedup'), '.2f')}x | "
                   f"{_fmt(s.get('step_ms'), '.1f')} | {mfu + '%' if s.get('mfu') is not None else mfu} | "
                   f"{_fmt(s.get('final_loss'), '.4f')} | {'n/a' if rel is None else format(rel, '+.3%')} | "
                   f"{_fmt(s.get('val_loss'), '.4f')} | {_fmt(s.get('peak_gib'), '.2f')} | "
                   f"{s.get('last_step') or 0} | {r.get('status', '?')}{' (diverged)' if s.get('diverged') else ''} |")
    return "\n".join(out)


def plot_losses(rows: list[dict], path: Path, title: str = "") -> Optional[Path]:
    """Loss vs step of every variant (top) and the relative difference to the baseline (bottom); None without
    matplotlib or without any logged loss."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    curves = {r["variant"]: step_losses(r.get("records") or []) for r in rows}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    base = curves.get(BASELINE)
    for name, c in curves.items():
        steps = sorted(c)
        (line,) = ax.plot(steps, [c[s] for s in steps], label=name, lw=1.2)
        if base and name != BASELINE:
            sh = [s for s in steps if s in base and base[s]]
            ax2.plot(sh, [100 * (c[s] - base[s]) / abs(base[s]) for s in sh], label=name, lw=1.0,
                     color=line.get_color())
    ax.set_ylabel("training loss")
    ax.set_title(title or "training loss per variant (same config and seed)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax2.axhline(0, color="k", lw=0.6)
    for y in (TOL["fp8_rel"] * 100, -TOL["fp8_rel"] * 100):
        ax2.axhline(y, color="grey", ls="--", lw=0.6)
    ax2.set_ylabel(f"loss vs {BASELINE} (%)")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------

class StepRunner(Runner):
    label = "train_step"

    def env(self) -> dict:
        env = super().env()
        if self.a.cpu:  # the Triton kernels and FP8 GEMMs run in the interpreter on CPU
            env["TRITON_INTERPRET"] = "1"
        return env


def plan(a) -> tuple[str, list[dict]]:
    dtype = "fp32" if a.cpu else "bf16"
    common = [*(CPU_SET if a.cpu else ()), f"train.steps={a.steps}", f"train.log_every={a.log_every}",
              "train.eval_every=0",
              "checkpoint.every=0", "checkpoint.at_end=false", f"precision.dtype={dtype}"]
    config = a.config or (CPU_CONFIG if a.cpu else "configs/tinyshakespeare.yaml")
    runs = []
    for v in a.variants:
        runs.append({"variant": v, "overrides": common + list(a.set) + VARIANTS[v],
                     "overrides_shown": [f"precision.dtype={dtype}"] + VARIANTS[v]})
    return config, runs


def run_all(a, runner: Runner) -> list[dict]:
    """Every variant of ``plan(a)``, one after another, or all at once with ``--concurrent`` (then the speeds
    are of runs sharing the GPU and mean nothing; the losses are unaffected)."""
    config, runs = plan(a)

    def one(p: dict) -> dict:
        res = runner.run(p["variant"].replace("+", "_"), config, 1, p["overrides"])
        return {**p, "status": res["status"], "seconds": res.get("seconds", 0.0), "cmd": res["cmd"],
                "records": res["records"]}

    if a.concurrent:
        with ThreadPoolExecutor(max_workers=len(runs)) as pool:
            rows = list(pool.map(one, runs))
    else:
        rows = [one(p) for p in runs]
    finish(rows, a.skip_windows)
    return rows


def finish(rows: list[dict], skip_windows: int = 1) -> None:
    """Summaries (in place) once every run is done: each against the baseline's records."""
    base = next((r for r in rows if r["variant"] == BASELINE and r.get("records")), None)
    for r in rows:
        r["summary"] = summarize_variant(r.get("records") or [], base["records"] if base else None, skip_windows)
        if r["status"] != "ok" and r["summary"].get("steps"):
            r["status"] = f"{r['status']} (partial)"
    add_relative(rows)


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--config", default="", help="default configs/tinyshakespeare.yaml (configs/debug.yaml with --cpu)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra overrides of every variant")
    p.add_argument("--steps", type=int, default=0, help="default 300 (8 with --cpu)")
    p.add_argument("--log-every", type=int, default=0, help="default 10 (2 with --cpu)")
    p.add_argument("--skip-windows", type=int, default=1, help="logging windows dropped as warm-up")
    p.add_argument("--baseline", default=BASELINE, choices=list(VARIANTS),
                   help="the variant the others are compared with (speed-up, loss difference, flags)")
    p.add_argument("--last-n", type=int, default=LAST_N,
                   help="final loss = mean over this many last logged steps (log every step for a long mean)")
    p.add_argument("--cpu", action="store_true", help="tiny CPU version (automatic without a GPU)")
    p.add_argument("--out", default="", help="default benchmarks/results/train_step_<gpu|cpu>_<date>")
    p.add_argument("--work", default="/tmp/moetrain-train-step", help="run directories and the data cache")
    p.add_argument("--python", default=sys.executable, help="interpreter of the trainer jobs")
    p.add_argument("--deadline-s", type=float, default=540.0, help="wall budget of the whole script")
    p.add_argument("--run-timeout-s", type=float, default=240.0, help="wall limit of one run")
    p.add_argument("--min-run-s", type=float, default=20.0, help="do not start a run with less time left than this")
    p.add_argument("--concurrent", action="store_true",
                   help="start every variant at once (loss studies of small models: the GPU is shared, so the "
                        "tokens/s columns are not speeds of the variants)")
    a = p.parse_args(argv)
    a.cpu = a.cpu or _gpu_count() == 0
    a.steps = a.steps or (8 if a.cpu else 300)
    a.log_every = a.log_every or (2 if a.cpu else 10)
    return a


def main(argv=None) -> int:
    global BASELINE, LAST_N
    a = _parse_args(argv)
    BASELINE, LAST_N = a.baseline, a.last_n
    stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    a.nproc = 1
    info = {"date": _dt.datetime.now().isoformat(timespec="seconds"), **_device_info(a),
            "command": " ".join(["python benchmarks/train_step.py", *sys.argv[1:]])}
    if a.cpu:
        info["device"] = f"CPU ({os.cpu_count()} cores), one process, TRITON_INTERPRET=1"
    out = Path(a.out or ROOT / "benchmarks" / "results" /
               f"train_step_{'cpu' if a.cpu else 'gpu'}_{_dt.date.today().strftime('%Y%m%d')}")
    out.mkdir(parents=True, exist_ok=True)
    runner = StepRunner(a, out, Path(a.work), stamp)
    config = plan(a)[0]
    print(f"[train_step] {info['device']}; torch {info.get('torch')}; {config}, {a.steps} steps; variants "
          f"{' '.join(a.variants)}; out {out}", flush=True)
    rows: list[dict] = []
    try:
        rows = run_all(a, runner)
    finally:
        flags = check_flags(rows) if rows else []
        png = plot_losses(rows, out / f"train_step_{stamp}_loss.png",
                          f"{config}, {a.steps} steps, {info['device']}") if rows else None
        parts = [f"# moetrain training variants, {info['date']}", "",
                 f"- device: {info['device']}; torch {info.get('torch')}; python {info['python']}",
                 f"- command: `{info['command']}`",
                 f"- config: `{config}` {' '.join(a.set)}; {a.steps} steps, logged every {a.log_every}; "
                 f"tokens/s without the first {a.skip_windows} logging window(s)",
                 f"- wall time: {time.monotonic() - runner.t0:.0f} s", ""]
        if a.concurrent:
            parts += ["The variants ran at the same time on one device (`--concurrent`): tokens/s, step ms and "
                      "MFU are of runs sharing it, not the variants' speeds.", ""]
        if a.cpu:
            parts += ["CPU in fp32 with the Triton interpreter: this exercises the script only; the numbers say "
                      "nothing about GPU speed or FP8 numerics.", ""]
        parts += [table(rows), "", "Targets (issues 4 and 5):", "", flags_text(flags), ""]
        if png:
            parts += [f"Loss curves: `{png.name}`", ""]
        text = "\n".join(parts)
        md = out / f"train_step_{stamp}.md"
        md.write_text(text)
        strip = [{k: v for k, v in r.items() if k != "records"} for r in rows]
        md.with_suffix(".json").write_text(json.dumps(
            {**info, "args": vars(a), "tolerances": TOL, "rows": strip, "flags": flags}, indent=1, default=str))
        print("\n" + text, flush=True)
        print(f"[train_step] wrote {md}, {md.with_suffix('.json').name}{', ' + png.name if png else ''}", flush=True)
    return 1 if any(f["kind"] == "loss" and f["ok"] is False for f in flags) else 0


if __name__ == "__main__":
    sys.exit(main())
