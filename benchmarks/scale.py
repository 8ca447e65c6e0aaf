"""Issue 7: the main command at scale -- `torchrun --nproc-per-node 8 -m moetrain.train` with ep=8.

Run it through ``benchmarks/scale.sh`` (which sets the NVLS/multicast switches the lent hosts need):

    NPROC=8 OUT=$OUT bash benchmarks/scale.sh                         # 8 GPUs: phases A and B
    NPROC=4 bash benchmarks/scale.sh --cpu                            # CPU/gloo: phase A only
    NPROC=4 bash benchmarks/scale.sh --cpu --throughput-on-cpu        # + phase B on a tiny config

This script is an orchestrator: it runs ``python -m moetrain.train`` (one process) and
``python -m torch.distributed.run --standalone --nproc-per-node N -m moetrain.train`` as subprocesses, one
fresh job per measurement, and reads each run's ``metrics.jsonl``.

Phase A, equivalence. ``configs/debug.yaml`` with V3-style routing (16 routed experts top-4, sigmoid, 4 groups /
2 limited), ``train.batch_size = 2 x N`` global sequences, same seed, ``--eq-steps`` steps, logged every step: once
in one process (ep=1, every expert local) and once on N ranks with ``parallel.ep=N`` (dp=1). The per-step
training losses must agree within a relative bound:

    fp32 (CPU, and GPU with precision.dtype=fp32: TF32 is off)      --eq-rtol-fp32  1e-4
    bf16 autocast (GPU)                                               --eq-rtol-bf16  2e-2
        ep=1 and ep=N round differently in bf16: the all-to-all path casts tokens to bf16 before the permute
        (LocalDispatcher permutes fp32 rows), and gradient sums run in another order; a bf16 mantissa has
        8 bits (relative step 3.9e-3), and five Adam steps at lr 3e-3 let such differences grow. 2e-2 still
        catches a real mistake (a wrong expert, a missing 1/ep, a dropped token: errors of 5-50%).

A mismatch makes the script exit with code 1 (phase B still runs, unless --stop-on-mismatch).

Phase B, throughput. ``configs/scale-ep8.yaml`` (21.7B params, 128 experts top-8, seq 4096: see its comments),
``--steps`` steps logged every ``train.log_every``, at ep=N on N GPUs in BF16 and each FP8 recipe, and the ep=1
comparison on the same per-GPU work (one GPU, ``n_routed_experts = E / N`` so that it holds the same 16 local
experts per layer, the same micro-batch, ``train.batch_size = micro_batch_size``). From the training lines of
each ``metrics.jsonl``, skipping the first ``--skip-windows`` logging windows (start-up, autotuning):

    tokens/s           sum of tokens / sum of window seconds (window seconds = tokens in it / perf/tokens_per_s)
    step ms            window seconds / optimizer steps in it
    MFU                perf/mfu scaled to that tokens/s (model FLOPs / (989 TFLOP/s x GPUs) on H200)
    a2a share          perf/a2a_ms (rank 0) and perf/a2a_ms_max (slowest rank) per step / step ms
    load               moe/load_imbalance (max/mean expert load) and moe/load_cv, mean over the windows
    $/1M tokens        steady: the job's $/s (cost/usd / cost/elapsed_s) / tokens/s; run: cost/usd_per_1m_tokens of
                       the last line (start-up included)
    peak GiB/GPU       mem/peak_gib_max (largest over ranks), else mem/peak_gib (rank 0)

Targets (issue 7): MFU >= 35% in BF16; a2a < 15% of step time; tokens/s per GPU at ep=N >= 85% of ep=1.

Outputs under --out: ``scale_<stamp>.md`` (the tables printed at the end), ``scale_<stamp>.json`` (everything),
``runs_<stamp>/<name>/{metrics.jsonl, config.yaml, run.json, train.log}`` of every run. A ``--deadline-s`` wall
budget (default 555 s: one 600 s device call, scale.sh's start-up included) skips the runs that would start after
it and cuts a run short at it (SIGKILL, no checkpoint), so the files are always written. Not part of CI
(tests/test_scale_script.py checks the parsing and comparison code).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]

RTOL = {"fp32": 1e-4, "bf16": 2e-2}
TARGETS = {"mfu_bf16": 0.35, "a2a_share": 0.15, "per_gpu_ratio": 0.85}
RECIPES = ("bf16", "fp8-blockwise", "fp8-rowwise", "fp8-tensorwise")

# phase A's model: the debug flavor with V3-style routing (sigmoid, groups) and experts on every rank
EQ_CONFIG = "configs/debug.yaml"
# phase B on CPU (--throughput-on-cpu): a tiny model that only exercises the code and the table
CPU_TP_CONFIG = "configs/debug.yaml"
CPU_TP_SET = ("model.n_activated_experts=2", "model.n_expert_groups=4", "model.n_limited_groups=2",
              "model.score_func=sigmoid", "train.seq_len=64", "train.micro_batch_size=2", "train.log_every=3",
              "train.warmup_steps=2")


# --------------------------------------------------------------------------------------------
# metrics.jsonl: reading, comparing, summarising (pure functions; tested without any run)
# --------------------------------------------------------------------------------------------

def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The JSON lines of ``metrics.jsonl`` (a line cut short by a kill is skipped)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def train_records(recs: list[dict]) -> list[dict]:
    """Training-step lines (they carry ``loss``; evaluation lines carry ``val/loss``), by step, the last line of
    a step winning (a resumed run may repeat one)."""
    by_step = {}
    for r in recs:
        if "loss" in r and "step" in r:
            by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


def step_losses(recs: list[dict], key: str = "loss") -> dict[int, float]:
    """``{step: value}`` of a training-line metric (``loss`` by default; ``grad_norm`` ...)."""
    return {int(r["step"]): float(r[key]) for r in train_records(recs) if _num(r.get(key)) is not None}


def compare_losses(ref: dict[int, float], got: dict[int, float], rtol: float) -> dict:
    """Per-step relative difference of ``got`` against ``ref``.

    Returns ``{"ok", "rtol", "steps", "max_rel_err", "worst_step", "missing", "rows"}``; ``rows`` are
    ``(step, ref, got, rel_err)``. Not ok when a step of either run is missing in the other, when there are no
    steps at all, when a loss is not finite, or when any ``|got - ref| / |ref|`` exceeds ``rtol``.
    """
    steps = sorted(set(ref) & set(got))
    missing = sorted(set(ref) ^ set(got))
    rows, worst, worst_step, finite = [], 0.0, None, True
    for s in steps:
        a, b = ref[s], got[s]
        if not (math.isfinite(a) and math.isfinite(b)):
            finite = False
            rel = math.inf
        else:
            rel = abs(b - a) / max(abs(a), 1e-12)
        rows.append((s, a, b, rel))
        if worst_step is None or rel > worst:
            worst, worst_step = rel, s
    ok = bool(steps) and not missing and finite and worst <= rtol
    return {"ok": ok, "rtol": rtol, "steps": len(steps), "max_rel_err": worst if steps else None,
            "worst_step": worst_step, "missing": missing, "rows": rows}


def _num(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def summarize_throughput(recs: list[dict], world: int, skip_windows: int = 1) -> dict:
    """Steady-state throughput of one run from its ``metrics.jsonl`` records (see the module docstring).

    A logging window is the stretch between two training lines (the first starts at step 0, token 0). The first
    ``skip_windows`` windows are dropped (start-up, autotuning) when more windows than that exist; otherwise only
    the last window is used and ``warm`` is False. Returns a dict of floats (None where the run did not log the
    metric, e.g. MFU and memory on CPU) with ``windows``/``steps`` measured; ``{"steps": 0}`` without any
    training line carrying ``perf/tokens_per_s``.
    """
    train = [r for r in train_records(recs) if _num(r.get("perf/tokens_per_s"))]
    if not train:
        return {"steps": 0, "windows": 0}
    wins = []
    prev_tok, prev_step = 0, 0
    for r in train:
        tok, step = int(r["tokens"]), int(r["step"])
        dtok, dsteps = tok - prev_tok, step - prev_step
        prev_tok, prev_step = tok, step
        if dtok <= 0 or dsteps <= 0:
            continue
        wins.append({"rec": r, "tokens": dtok, "steps": dsteps, "s": dtok / float(r["perf/tokens_per_s"])})
    if not wins:
        return {"steps": 0, "windows": 0}
    warm = len(wins) > skip_windows
    use = wins[skip_windows:] if warm else wins[-1:]
    tok = sum(w["tokens"] for w in use)
    sec = sum(w["s"] for w in use)
    steps = sum(w["steps"] for w in use)
    tps = tok / sec
    step_ms = sec / steps * 1e3

    def step_mean(key: str) -> Optional[float]:  # per-step values, weighted by the steps of each window
        vals = [(_num(w["rec"].get(key)), w["steps"]) for w in use]
        vals = [(v, n) for v, n in vals if v is not None]
        return sum(v * n for v, n in vals) / sum(n for _, n in vals) if vals else None

    mfus = [(_num(w["rec"].get("perf/mfu")), float(w["rec"]["perf/tokens_per_s"])) for w in use]
    mfu = tps * (mfus[-1][0] / mfus[-1][1]) if mfus and mfus[-1][0] is not None else None
    a2a, a2a_max = step_mean("perf/a2a_ms"), step_mean("perf/a2a_ms_max")
    last = train[-1]
    usd, elapsed = _num(last.get("cost/usd")), _num(last.get("cost/elapsed_s"))
    steady_usd = (usd / elapsed) / tps * 1e6 if usd is not None and elapsed else None
    peaks = [_num(r.get("mem/peak_gib_max", r.get("mem/peak_gib"))) for r in train]
    peaks = [p for p in peaks if p is not None]
    return {
        "windows": len(use), "steps": steps, "warm": warm, "world": world,
        "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / world, "step_ms": step_ms, "mfu": mfu,
        "a2a_ms": a2a, "a2a_ms_max": a2a_max,
        "a2a_share": a2a / step_ms if a2a is not None else None,
        "a2a_share_max": a2a_max / step_ms if a2a_max is not None else None,
        "load_imbalance": step_mean("moe/load_imbalance"), "load_cv": step_mean("moe/load_cv"),
        "dropped_frac": step_mean("moe/dropped_frac"),
        "usd_per_1m_tokens": steady_usd, "usd_per_1m_tokens_run": _num(last.get("cost/usd_per_1m_tokens")),
        "peak_gib": max(peaks) if peaks else None, "loss": _num(last.get("loss")),
    }


def _fmt(x, spec: str, scale: float = 1.0, none: str = "n/a") -> str:
    return none if x is None else format(x * scale, spec)


def equivalence_table(rows: list[dict]) -> str:
    """Markdown: one line per phase-A comparison (dtype, ep, steps, worst relative loss difference, bound)."""
    out = ["| precision | ep=N vs ep=1 | steps | loss at step 1 (ep=1) | last loss ep=1 / ep=N | loss max rel diff "
           "(step) | bound | grad-norm max rel diff | result |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        c = r.get("compare") or {}
        rws = c.get("rows") or []
        first = f"{rws[0][1]:.6f}" if rws else "n/a"
        last = f"{rws[-1][1]:.6f} / {rws[-1][2]:.6f}" if rws else "n/a"
        worst = (f"{c['max_rel_err']:.2e} ({c['worst_step']})" if c.get("max_rel_err") is not None else "n/a")
        res = "OK" if c.get("ok") else ("FAIL" + (f" ({r['status']})" if r.get("status") not in (None, "ok") else ""))
        out.append(f"| {r['dtype']} | ep={r['ep']} ({r['nproc']} ranks) vs 1 process | {c.get('steps', 0)} | {first} | "
                   f"{last} | {worst} | {c.get('rtol', float('nan')):.0e} | "
                   f"{_fmt(c.get('grad_norm_max_rel_err'), '.2e')} | {res} |")
    return "\n".join(out)


def throughput_table(rows: list[dict]) -> str:
    """Markdown: one line per phase-B run."""
    out = ["| run | layout | precision | tokens/s | tokens/s/GPU | step ms | MFU | a2a ms/step (max rank) | "
           "a2a share (max rank) | load max/mean | load CV | $/1M tok steady (run) | peak GiB/GPU | steps | status |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        s = r.get("summary") or {}
        a2a = (f"{_fmt(s.get('a2a_ms'), '.1f')} ({_fmt(s.get('a2a_ms_max'), '.1f')})"
               if s.get("a2a_ms") is not None else "-")
        share = (f"{_fmt(s.get('a2a_share'), '.1f', 100)}% ({_fmt(s.get('a2a_share_max'), '.1f', 100)}%)"
                 if s.get("a2a_share") is not None else "-")
        usd = f"{_fmt(s.get('usd_per_1m_tokens'), '.4g')} ({_fmt(s.get('usd_per_1m_tokens_run'), '.4g')})"
        mfu = _fmt(s.get("mfu"), ".1f", 100)
        out.append(f"| {r['name']} | {r['layout']} | {r['precision']} | {_fmt(s.get('tokens_per_s'), ',.0f')} | "
                   f"{_fmt(s.get('tokens_per_s_per_gpu'), ',.0f')} | {_fmt(s.get('step_ms'), '.1f')} | "
                   f"{mfu + '%' if s.get('mfu') is not None else mfu} | {a2a} | {share} | "
                   f"{_fmt(s.get('load_imbalance'), '.3f')} | {_fmt(s.get('load_cv'), '.3f')} | {usd} | "
                   f"{_fmt(s.get('peak_gib'), '.1f')} | {s.get('steps', 0)} | {r.get('status', '?')} |")
    return "\n".join(out)


def check_targets(rows: list[dict]) -> list[dict]:
    """Issue 7's targets against phase B's rows: ``[{"target", "value", "ok"}]`` (``ok`` None = not measured)."""
    by = {r["name"]: (r.get("summary") or {}) for r in rows if r.get("status") == "ok"}
    ep_rows = [r for r in rows if r.get("ep", 1) > 1 and r.get("status") == "ok"]
    out = []
    bf16 = next((by[r["name"]] for r in ep_rows if r["precision"] == "bf16"), None)
    mfu = bf16.get("mfu") if bf16 else None
    out.append({"target": f"MFU >= {TARGETS['mfu_bf16']:.0%} (BF16, ep=N)", "value": mfu,
                "ok": None if mfu is None else mfu >= TARGETS["mfu_bf16"]})
    for r in ep_rows:
        s = by[r["name"]]
        share = s.get("a2a_share_max") if s.get("a2a_share_max") is not None else s.get("a2a_share")
        out.append({"target": f"a2a < {TARGETS['a2a_share']:.0%} of step time ({r['name']}, slowest rank)",
                    "value": share, "ok": None if share is None else share < TARGETS["a2a_share"]})
    base = next((by[r["name"]] for r in rows if r.get("ep", 1) == 1 and r.get("status") == "ok"
                 and r["precision"] == "bf16"), None)
    ratio = (bf16["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
             if bf16 and base and base.get("tokens_per_s_per_gpu") else None)
    out.append({"target": f"tokens/s per GPU at ep=N >= {TARGETS['per_gpu_ratio']:.0%} of ep=1 (BF16, same per-GPU "
                          f"work)", "value": ratio, "ok": None if ratio is None else ratio >= TARGETS["per_gpu_ratio"]})
    return out


def targets_text(targets: list[dict]) -> str:
    lines = []
    for t in targets:
        v = t["value"]
        shown = "n/a" if v is None else (f"{v:.1%}" if "MFU" in t["target"] or "a2a" in t["target"] else f"{v:.2f}x")
        verdict = "not measured" if t["ok"] is None else ("met" if t["ok"] else "NOT met")
        lines.append(f"- {t['target']}: {shown} -> {verdict}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# running the trainer
# --------------------------------------------------------------------------------------------

class Runner:
    """Launches trainer jobs under a shared wall-clock deadline and keeps their outputs (also used by
    benchmarks/train_step.py, which sets ``label``)."""

    label = "scale"

    def __init__(self, a, out: Path, work: Path, stamp: str):
        self.a, self.out, self.work, self.stamp = a, out, work, stamp
        self.t0 = time.monotonic()

    def left(self) -> float:
        return self.a.deadline_s - (time.monotonic() - self.t0)

    def env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK"):
            env.pop(k, None)
        if self.a.cpu:
            env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
        return env

    def run(self, name: str, config: str, nproc: int, overrides: list[str]) -> dict:
        """One trainer job; returns ``{"name", "nproc", "status" (ok|failed rc=..|timeout|skipped), "seconds",
        "run_dir", "records", "cmd"}``. Its metrics, config and log are copied to ``<out>/runs_<stamp>/<name>/``."""
        run_dir = self.work / "runs" / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        args = ["--config", config, f"run.dir={run_dir}", f"data.cache_dir={self.work / 'data'}",
                "logging.progress=false", "resume=never", "checkpoint.at_end=false"]
        if self.a.cpu:
            args.append("parallel.backend=gloo")
        args += list(overrides)
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
        cmd = [self.a.python, *launch, "-m", "moetrain.train", *args]
        res = {"name": name, "nproc": nproc, "cmd": " ".join(cmd), "run_dir": str(run_dir), "records": []}
        budget = min(self.a.run_timeout_s, self.left())
        if budget < self.a.min_run_s:
            res.update(status="skipped (deadline)", seconds=0.0)
            print(f"[{self.label}] {name}: skipped, {self.left():.0f}s left of --deadline-s", flush=True)
            return res
        dest = self.out / f"runs_{self.stamp}" / name
        dest.mkdir(parents=True, exist_ok=True)
        log = dest / "train.log"
        print(f"[{self.label}] {name}: {nproc} process(es), up to {budget:.0f}s ...", flush=True)
        t0 = time.monotonic()
        with open(log, "w") as fh:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=budget)
                status = "ok" if rc == 0 else f"failed rc={rc}"
            except subprocess.TimeoutExpired:
                _stop_group(proc)
                status = "timeout"
        res["seconds"] = time.monotonic() - t0
        res["status"] = status
        for f in ("metrics.jsonl", "config.yaml", "run.json"):
            if (run_dir / f).is_file():
                shutil.copy2(run_dir / f, dest / f)
        res["records"] = read_metrics(run_dir / "metrics.jsonl")
        tail = log.read_text(errors="replace").splitlines()[-3:]
        more = "" if status == "ok" else "\n  " + "\n  ".join(tail)
        print(f"[{self.label}] {name}: {status} in {res['seconds']:.0f}s{more}", flush=True)
        return res


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (children first), from /proc. torchrun starts each worker in a session of its
    own, so signalling torchrun's process group does not reach them."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGKILL a job that ran past its time: its workers (found by pid), then the launcher. Not SIGTERM: the
    trainer answers that with a checkpoint, ~380 GB for configs/scale-ep8.yaml."""
    for pid in reversed(_descendants(proc.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _eq_overrides(n: int, steps: int, dtype: str) -> list[str]:
    E = 16 if 16 % n == 0 else 2 * n
    groups = 4 if E % 4 == 0 and E >= 8 else 1  # 2 of 4 groups hold >= 4 experts for the top-4
    return [f"model.n_routed_experts={E}", "model.n_activated_experts=4", f"model.n_expert_groups={groups}",
            f"model.n_limited_groups={2 if groups == 4 else 1}", "model.score_func=sigmoid", "model.route_scale=2.5",
            f"train.batch_size={2 * n}", f"train.steps={steps}", "train.log_every=1", "train.eval_every=0",
            "train.eval_batches=1", "train.warmup_steps=2", f"precision.dtype={dtype}"]


def phase_a(a, runner: Runner) -> list[dict]:
    rows = []
    n = a.nproc
    for dtype in a.eq_dtypes:
        ov = _eq_overrides(n, a.eq_steps, dtype)
        ref = runner.run(f"eq_{dtype}_ep1", EQ_CONFIG, 1, ov + ["parallel.ep=1"])
        got = runner.run(f"eq_{dtype}_ep{n}", EQ_CONFIG, n, ov + [f"parallel.ep={n}"])
        rtol = a.eq_rtol_fp32 if dtype == "fp32" else a.eq_rtol_bf16
        cmp = compare_losses(step_losses(ref["records"]), step_losses(got["records"]), rtol)
        gn = compare_losses(step_losses(ref["records"], "grad_norm"), step_losses(got["records"], "grad_norm"), rtol)
        cmp["grad_norm_max_rel_err"] = gn["max_rel_err"]  # reported, not gated (the losses are)
        if ref["status"] != "ok" or got["status"] != "ok":
            cmp["ok"] = False
        status = "ok" if ref["status"] == got["status"] == "ok" else f"ep=1 {ref['status']}, ep={n} {got['status']}"
        rows.append({"dtype": dtype, "ep": n, "nproc": n, "compare": cmp, "status": status,
                     "seconds": ref.get("seconds", 0) + got.get("seconds", 0), "overrides": ov,
                     "cmd_ref": ref["cmd"], "cmd_ep": got["cmd"]})
        print(f"[scale] equivalence {dtype} ep={n} vs ep=1: max rel loss diff "
              f"{_fmt(cmp['max_rel_err'], '.2e')} (bound {rtol:.0e}) -> {'OK' if cmp['ok'] else 'FAIL'}", flush=True)
        if not cmp["ok"] and a.stop_on_mismatch:
            break
    return rows


def _tp_config(a) -> tuple[str, list[str]]:
    """(config file, overrides shared by every phase-B run)."""
    if a.config:
        return a.config, list(a.set)
    if a.cpu:
        return CPU_TP_CONFIG, [*CPU_TP_SET, f"model.n_routed_experts={max(16, 2 * a.nproc)}", *a.set]
    return "configs/scale-ep8.yaml", list(a.set)


def phase_b(a, runner: Runner) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from moetrain.config import load_config, model_args

    config, common = _tp_config(a)
    n = a.nproc
    cfg = load_config(str(ROOT / config), common)
    args = model_args(cfg)
    micro = cfg.train.micro_batch_size or max(1, cfg.train.batch_size // n)
    E = args.n_routed_experts
    if E % n:
        raise SystemExit(f"scale: {config}: n_routed_experts={E} is not divisible by NPROC={n}")
    steps = a.steps or cfg.train.steps
    base = [*common, f"train.steps={steps}", f"train.micro_batch_size={micro}", "train.eval_every=0",
            "train.eval_batches=1"]
    plan = []
    for recipe in a.recipes:
        prec = ["precision.dtype=bf16"] + ([f"precision.fp8={recipe.split('-', 1)[1]}"] if recipe != "bf16" else [])
        plan.append({"name": f"ep{n}_{recipe}", "precision": recipe, "ep": n, "nproc": n,
                     "layout": f"{n} x {'GPU' if not a.cpu else 'CPU proc'}, ep={n}",
                     "overrides": base + prec + [f"parallel.ep={n}", f"train.batch_size={n * micro}"]})
        if recipe == "bf16" and not a.no_baseline and n > 1:
            plan.append({"name": "ep1_bf16_same_work", "precision": "bf16", "ep": 1, "nproc": 1,
                         "layout": f"1 x {'GPU' if not a.cpu else 'CPU proc'}, ep=1, {E // n} experts",
                         "overrides": base + prec + ["parallel.ep=1", f"train.batch_size={micro}",
                                                     f"model.n_routed_experts={E // n}", "model.n_expert_groups=1",
                                                     "model.n_limited_groups=1"]})
    rows = []
    for p in plan:
        res = runner.run(p["name"], config, p["nproc"], p["overrides"])
        summ = summarize_throughput(res["records"], p["nproc"], a.skip_windows)
        rows.append({**p, "status": res["status"] if summ.get("steps") else f"{res['status']}, no metrics",
                     "seconds": res.get("seconds", 0.0), "cmd": res["cmd"], "summary": summ})
        if res["status"] != "ok" and summ.get("steps"):
            rows[-1]["status"] = f"{res['status']} (partial)"
    return rows


# --------------------------------------------------------------------------------------------

def _device_info(a) -> dict:
    info = {"python": sys.version.split()[0]}
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        pass
    if a.cpu:
        info["device"] = f"CPU ({os.cpu_count()} cores), gloo, {a.nproc} processes"
        return info
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        names = [ln.strip() for ln in smi.stdout.splitlines() if ln.strip()]
        info["device"] = f"{len(names)} x {names[0]}" if names else "cuda"
        info["gpus"] = names
    except (OSError, subprocess.SubprocessError):
        info["device"] = "cuda"
    return info


def _gpu_count() -> int:
    """GPUs listed by nvidia-smi (0 without it). The orchestrator never initialises CUDA itself."""
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for ln in smi.stdout.splitlines() if ln.startswith("GPU ")) if smi.returncode == 0 else 0


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=int(os.environ.get("NPROC", "0") or 0),
                   help="ranks of the ep=N runs (default: $NPROC, else the GPU count, else 4)")
    p.add_argument("--cpu", action="store_true", help="CPU processes on gloo (automatic without CUDA)")
    p.add_argument("--phases", nargs="+", default=["a", "b"], choices=["a", "b"])
    p.add_argument("--throughput-on-cpu", action="store_true", help="run phase B on CPU too (a tiny config)")
    p.add_argument("--out", default="", help="result directory (default benchmarks/results/scale_<device>_<date>)")
    p.add_argument("--work", default="/tmp/moetrain-scale", help="run directories and the data cache")
    p.add_argument("--python", default=sys.executable, help="interpreter of the trainer jobs")
    p.add_argument("--deadline-s", type=float, default=555.0, help="wall budget of the whole script")
    p.add_argument("--run-timeout-s", type=float, default=300.0, help="wall limit of one trainer job")
    p.add_argument("--min-run-s", type=float, default=20.0, help="do not start a job with less time left than this")
    g = p.add_argument_group("phase A (equivalence)")
    g.add_argument("--eq-steps", type=int, default=5)
    g.add_argument("--eq-dtypes", nargs="+", default=None, choices=["fp32", "bf16"],
                   help="default: fp32 bf16 on GPU, fp32 on CPU")
    g.add_argument("--eq-rtol-fp32", type=float, default=RTOL["fp32"])
    g.add_argument("--eq-rtol-bf16", type=float, default=RTOL["bf16"])
    g.add_argument("--stop-on-mismatch", action="store_true", help="skip phase B when phase A fails")
    g = p.add_argument_group("phase B (throughput)")
    g.add_argument("--config", default="", help="default configs/scale-ep8.yaml (GPU) or a tiny debug model (CPU)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override of every phase-B run, e.g. --set kernels.enabled=true (repeatable)")
    g.add_argument("--steps", type=int, default=0, help="training steps per run (default: the config's)")
    g.add_argument("--recipes", nargs="+", default=["bf16", "fp8-blockwise", "fp8-rowwise"], choices=RECIPES)
    g.add_argument("--no-baseline", action="store_true", help="skip the ep=1 same-per-GPU-work run")
    g.add_argument("--skip-windows", type=int, default=1, help="logging windows dropped as warm-up")
    a = p.parse_args(argv)
    gpus = 0 if a.cpu else _gpu_count()
    a.cpu = a.cpu or gpus == 0
    if a.nproc <= 0:
        a.nproc = gpus or 4
    if a.eq_dtypes is None:
        a.eq_dtypes = ["fp32"] if a.cpu else ["fp32", "bf16"]
    if a.cpu and not a.throughput_on_cpu and "b" in a.phases:
        a.phases = [x for x in a.phases if x != "b"]
        a.skipped_b = "skipped on CPU (pass --throughput-on-cpu for the tiny-config check)"
    if a.cpu and a.steps == 0 and "b" in a.phases:
        a.steps = 12
    return a


def main(argv=None) -> int:
    a = _parse_args(argv)
    stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    info = {"date": _dt.datetime.now().isoformat(timespec="seconds"), **_device_info(a), "nproc": a.nproc,
            "command": os.environ.get("SCALE_SH_CMD") or " ".join(["python benchmarks/scale.py", *sys.argv[1:]]),
            "env": {k: os.environ.get(k) for k in ("NPROC", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                  "NVSHMEM_DISABLE_NVLS", "OMP_NUM_THREADS",
                                                  "PYTORCH_CUDA_ALLOC_CONF")}}
    out = Path(a.out or ROOT / "benchmarks" / "results" /
               f"scale_{'cpu' if a.cpu else 'gpu'}_{_dt.date.today().strftime('%Y%m%d')}")
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(a, out, Path(a.work), stamp)
    print(f"[scale] {info['device']}; torch {info.get('torch')}; N={a.nproc}; phases {' '.join(a.phases)}; "
          f"out {out}", flush=True)
    eq_rows: list[dict] = []
    tp_rows: list[dict] = []
    rc = 0
    try:
        if "a" in a.phases:
            eq_rows = phase_a(a, runner)
            if not all(r["compare"]["ok"] for r in eq_rows):
                rc = 1
        if "b" in a.phases and not (rc and a.stop_on_mismatch):
            tp_rows = phase_b(a, runner)
    finally:
        targets = check_targets(tp_rows) if tp_rows else []
        parts = [f"# moetrain scale check, {info['date']}", "",
                 f"- device: {info['device']}; torch {info.get('torch')}; python {info['python']}",
                 f"- command: `{info['command']}`",
                 f"- wall time: {time.monotonic() - runner.t0:.0f} s", ""]
        if eq_rows:
            parts += [f"## Phase A: equivalence, ep={a.nproc} vs one process ({a.eq_steps} steps, per-step training "
                      "loss)", "", equivalence_table(eq_rows), ""]
        if tp_rows:
            note = (["CPU processes share the machine's cores: these numbers only exercise the script and its table; "
                     "they say nothing about GPU speed (no MFU or memory on CPU).", ""] if a.cpu else [])
            parts += ["## Phase B: throughput", "", *note, throughput_table(tp_rows), "",
                      "Targets (issue 7):", "", targets_text(targets), ""]
        elif getattr(a, "skipped_b", None):
            parts += [f"Phase B: {a.skipped_b}.", ""]
        text = "\n".join(parts)
        md = out / f"scale_{stamp}.md"
        md.write_text(text)
        strip = lambda rows: [{k: v for k, v in r.items() if k != "records"} for r in rows]  # noqa: E731
        (out / f"scale_{stamp}.json").write_text(json.dumps(
            {**info, "args": {k: v for k, v in vars(a).items()}, "equivalence": strip(eq_rows),
             "throughput": strip(tp_rows), "targets": targets, "exit_code": rc}, indent=1, default=str))
        print("\n" + text, flush=True)
        print(f"[scale] wrote {md} and {md.with_suffix('.json')}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
