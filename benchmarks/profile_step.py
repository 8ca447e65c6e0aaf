"""Where a training step's time goes: torch.profiler over a few steps of each training variant, one GPU.

    python3 benchmarks/profile_step.py --out $OUT                          # GPU-filling config, every variant
    python3 benchmarks/profile_step.py --variants bf16 fp8-blockwise --steps 5 --warmup 3
    python3 benchmarks/profile_step.py --config configs/tinyshakespeare.yaml --variants bf16 kernels
    python3 benchmarks/profile_step.py --smoke                             # tiny CPU check (~10 s)

Variants are benchmarks/train_step.py's (``bf16``, ``kernels``, ``fp8-tensorwise``, ``fp8-rowwise``,
``fp8-blockwise``, ``fp8-blockwise+kernels``), applied the same way (its ``plan()``: the same overrides, fp32
instead of bf16 on CPU). The default config is train_step.py's GPU-filling one, as gpu_batch.sh's ``train_big``
job runs it: ``configs/scale-ep8.yaml`` with ``DEFAULT_SET`` (3.3B params, 16 experts top-8 on one GPU,
2 x 4096 tokens a step); an explicit ``--config`` drops those defaults, ``--set`` adds overrides either way.
``--smoke`` (automatic on a machine without a GPU unless --config is given) is train_step.py's tiny CPU config
(configs/debug.yaml, batch 2 x 32 tokens), 1 warm-up + 1 profiled step.

Per variant, in a fresh process of its own (``--in-process`` runs them all in this one): the trainer of
``moetrain.train`` is built exactly as ``python -m moetrain.train`` builds it (model, parallelize, engine,
optimizer, data), ``--warmup`` optimizer steps run (Triton autotuning, allocator warm-up), then ``--timed``
steps without the profiler (their wall time is the step time without profiler overhead), then ``--steps``
steps under ``torch.profiler`` (CPU + CUDA activity on a GPU, CPU only otherwise), each ended by a device
synchronisation. From the profile, per step:

    top ops         the ``--top`` (25) kernels by self device time (on CPU: aten ops by self CPU time):
                    calls, ms per step, % of the step's wall time, category
    categories      device time by CATEGORIES (substring rules, first match wins, edit the table below):
                    GEMM, attention, FP8 quantisation, our Triton kernels (rmsnorm, rope, swiglu, router,
                    permute), NCCL/communication, optimizer, memcpy/memset, elementwise/other; and
                    idle/host gaps = step wall time - device busy time (the union of the kernels' intervals,
                    so kernels that overlap on several streams count once; on CPU the sum of op self
                    times: Python, autograd-engine and dispatcher overhead and the Triton interpreter land
                    in the gaps)
    step wall ms    mean over the profiled steps (and over the timed steps without the profiler)

A variant that fails (exception, crash, out of memory, ``--variant-timeout-s``) prints its error and the others
still run. ``--deadline-s`` skips the variants that would start after it. The exit code is 1 unless every variant
was profiled.

Outputs under --out: ``profile_<stamp>.json`` (every number, the category rules, the overrides of each variant),
``profile_<stamp>.md`` (what is printed), ``profile_<stamp>_<variant>.trace.json.gz`` (Chrome trace of the
profiled steps: chrome://tracing or https://ui.perfetto.dev). Not part of CI (tests/test_profile_step.py runs
``--smoke`` on CPU).
"""
from __future__ import annotations

import argparse
import collections
import datetime as _dt
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402
from scale import ROOT, _device_info, _gpu_count, _stop_group  # noqa: E402

if str(ROOT) not in sys.path:  # moetrain and kernels from this working tree when run in-process
    sys.path.insert(0, str(ROOT))

DEFAULT_CONFIG = "configs/scale-ep8.yaml"
# gpu_batch.sh's train_big: the ep=8 model's per-GPU work on one GPU (see configs/scale-ep8.yaml)
DEFAULT_SET = ("parallel.ep=1", "model.n_routed_experts=16", "model.n_expert_groups=1", "model.n_limited_groups=1",
               "train.batch_size=2")
SMOKE_VARIANTS = ("bf16", "fp8-rowwise")  # the others run Triton's interpreter on CPU: seconds per step

# Categories of kernel (GPU) / op (CPU) names: lower-cased substring rules, first match wins, so the order
# matters (attention before GEMM: cutlass FMHA kernels; GEMM before FP8: FP8 GEMM kernels are GEMMs).
# Unmatched names are OTHER; IDLE is computed (step wall time - device busy time), never matched.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("NCCL/communication", ("nccl", "c10d::", "all_to_all", "alltoall", "all_reduce", "allreduce", "all_gather",
                            "allgather", "reduce_scatter", "reducescatter", "sendrecv", "gloo")),
    ("attention", ("sdpa", "flash", "fmha", "cudnn", "mla_attn", "_attn", "scaled_dot_product", "attention")),
    ("GEMM", ("gemm", "gemv", "cublas", "cutlass", "nvjet", "xmma", "_scaled_mm", "grouped_mm", "splitkreduce",
              "wgrad", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("FP8 quantisation", ("fp8", "float8", "e4m3", "e5m2", "quant")),
    ("Triton rmsnorm", ("_rmsnorm_",)),
    ("Triton rope", ("_rope_",)),
    ("Triton swiglu", ("_swiglu_",)),
    ("Triton router", ("_router_",)),
    ("Triton permute", ("_permute_fwd", "_unpermute_bwd", "_gather_sum")),
    ("optimizer", ("adam", "foreach", "multi_tensor", "multitensor", "lpnorm")),
    ("memcpy/memset", ("memcpy", "memset")),
)
OTHER = "elementwise/other"
IDLE = "idle/host gaps"
CATEGORY_NAMES = tuple(c for c, _ in CATEGORIES) + (OTHER, IDLE)
STEP_MARK = "profile_step/"  # record_function label of each profiled step (excluded from the op tables)
# kineto activities on the device timeline that are not device work (annotations mirrored from record_function,
# synchronisation waits): left out of the kernel tables and of the busy time
NOT_DEVICE_WORK = ("gpu_user_annotation", "user_annotation", "cuda_sync", "overhead")


# --------------------------------------------------------------------------------------------
# categories and summaries (pure functions; tests/test_profile_step.py)
# --------------------------------------------------------------------------------------------

def category_of(name: str) -> str:
    n = name.lower()
    for cat, subs in CATEGORIES:
        if any(s in n for s in subs):
            return cat
    return OTHER


def union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def summarize(ops: list[tuple[str, float]], busy_us: float, wall_ms: float, n_steps: int, top: int = 25) -> dict:
    """Per-step tables from ``ops`` = ``[(name, self_us)]`` (one entry per call) over ``n_steps`` steps of
    ``wall_ms`` mean wall time each, ``busy_us`` of device busy time in all: ``{"top": [...], "categories":
    {name: {"ms", "pct"}}, "busy_ms", "device_ms_sum"}``. Percentages are of the step's wall time."""
    n = max(1, n_steps)
    by_name: dict[str, list[float]] = {}
    for name, us in ops:
        agg = by_name.setdefault(name, [0, 0.0])
        agg[0] += 1
        agg[1] += us

    def pct(ms):
        return 100.0 * ms / wall_ms if wall_ms > 0 else None

    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    top_rows = [{"name": name[:300], "calls": calls / n, "ms": us / 1e3 / n, "pct": pct(us / 1e3 / n),
                 "category": category_of(name)} for name, (calls, us) in rows[:top]]
    cats = {c: 0.0 for c in CATEGORY_NAMES}
    for name, (_, us) in by_name.items():
        cats[category_of(name)] += us / 1e3 / n
    busy_ms = busy_us / 1e3 / n
    cats[IDLE] = max(0.0, wall_ms - busy_ms)
    return {"top": top_rows, "categories": {c: {"ms": v, "pct": pct(v)} for c, v in cats.items()},
            "busy_ms": busy_ms, "busy_pct": pct(busy_ms), "device_ms_sum": sum(us for _, (_, us) in rows) / 1e3 / n,
            "distinct_ops": len(by_name)}


def _cut(s: str, width: int) -> str:
    return s if len(s) <= width else s[:width - 3] + "..."


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:5.1f}%"


def format_variant(res: dict, top: int = 25) -> str:
    """The printed report of one variant (also what the .md holds)."""
    v = res["variant"]
    if res.get("status") != "ok":
        return f"== {v}: {res.get('status')}\n{res.get('error') or ''}".rstrip()
    unit = "device" if res.get("device_type") == "cuda" else "CPU"
    un = res.get("step_ms_unprofiled")
    shown = " ".join(res.get("variant_overrides") or []) or "-"
    lines = [f"== {v}: step wall {res['step_ms']:.1f} ms profiled"
             + (f", {un:.1f} ms without the profiler" if un else "")
             + f"; {unit} busy {res['busy_ms']:.1f} ms ({_pct(res['busy_pct']).strip()})"
             + f"; loss {res.get('loss', float('nan')):.4f}"
             + (f"; peak {res['peak_gib']:.1f} GiB" if res.get("peak_gib") else ""),
             f"   {res['warmup']} warm-up + {res['timed']} timed + {res['steps']} profiled step(s) on "
             f"{res.get('device')}; build {res.get('build_s', 0):.1f} s; overrides: {shown}",
             f"   top {top} {'kernels by self device time' if unit == 'device' else 'ops by self CPU time'} "
             f"(per step):",
             f"   {'#':>3}  {'name':<72} {'calls':>7} {'ms':>9} {'% step':>7}  category"]
    for i, r in enumerate(res["top"][:top], 1):
        lines.append(f"   {i:>3}  {_cut(r['name'], 72):<72} {r['calls']:>7.1f} {r['ms']:>9.3f} {_pct(r['pct']):>7}  "
                     f"{r['category']}")
    lines.append("   categories (per step):")
    for c in CATEGORY_NAMES:
        x = res["categories"][c]
        lines.append(f"     {c:<22} {x['ms']:>10.3f} ms {_pct(x['pct']):>7}")
    lines.append(f"     {'step wall':<22} {res['step_ms']:>10.3f} ms")
    if res.get("trace"):
        lines.append(f"   trace: {res['trace']}")
    return "\n".join(lines)


def comparison_table(results: list[dict]) -> str:
    """Markdown: ms per step of every category (rows) by variant (columns)."""
    ok = [r for r in results if r.get("status") == "ok"]
    if not ok:
        return "(no variant finished)"
    head = "| per step | " + " | ".join(r["variant"] for r in ok) + " |"
    out = [head, "|---|" + "---:|" * len(ok)]
    out.append("| step wall ms (profiled) | " + " | ".join(f"{r['step_ms']:.1f}" for r in ok) + " |")
    out.append("| step wall ms (no profiler) | " + " | ".join(ts._fmt(r.get("step_ms_unprofiled"), ".1f")
                                                          for r in ok) + " |")
    out.append("| busy ms | " + " | ".join(f"{r['busy_ms']:.1f}" for r in ok) + " |")
    for c in CATEGORY_NAMES:
        cells = []
        for r in ok:
            x = r["categories"][c]
            cells.append(f"{x['ms']:.1f} ({x['pct']:.0f}%)" if x["pct"] is not None else f"{x['ms']:.1f}")
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# profiling one variant (in this process)
# --------------------------------------------------------------------------------------------

def plan_variants(a) -> tuple[str, dict[str, list[str]]]:
    """(config, {variant: trainer overrides}) through train_step.plan (same variant overrides and dtype), plus
    what train_step's runner passes to every trainer job (run dir, data cache, no resume/checkpoints)."""
    total = a.warmup + a.timed + a.steps
    tiny = a.smoke or a.cpu
    ns = SimpleNamespace(cpu=tiny, steps=total, log_every=total, config=a.config, variants=a.variants,
                         set=list(a.set))  # cpu=True: train_step's tiny CPU_SET and fp32
    config, runs = ts.plan(ns)
    if a.smoke and not a.cpu:  # smoke on a GPU: the tiny config, but bf16 as on GPU
        for p in runs:
            p["overrides"] = [o for o in p["overrides"] if not o.startswith("precision.dtype=")] + \
                ["precision.dtype=bf16"]
    work = Path(a.work)
    out = {}
    for p in runs:
        extra = [f"run.dir={work / 'profile_runs' / p['variant'].replace('+', '_')}",
                 f"data.cache_dir={work / 'data'}", "logging.progress=false", "resume=never",
                 "checkpoint.at_end=false"]
        if a.cpu:
            extra.append("parallel.backend=gloo")
        out[p["variant"]] = extra + p["overrides"]
    return config, out


def _kineto_cuda_ops(prof) -> tuple[list[tuple[str, float]], float]:
    """_device_ops(..., cuda=True) from the raw kineto events: no FunctionEvent tree of the (many) CPU ops."""
    from torch.autograd import DeviceType
    evs = prof.profiler.kineto_results.events()
    annotations = {e.name() for e in evs if e.device_type() == DeviceType.CPU and e.is_user_annotation()}
    ops, spans = [], []
    for e in evs:
        if e.device_type() != DeviceType.CUDA or e.is_user_annotation():
            continue
        if hasattr(e, "activity_type") and str(e.activity_type()) in NOT_DEVICE_WORK:
            continue
        name = e.name()
        if name in annotations or name.startswith((STEP_MARK, "ProfilerStep")):
            continue
        s, d = e.start_ns(), e.duration_ns()  # integer ns since the epoch: exact, unlike float us
        ops.append((name, d / 1e3))
        spans.append((s, s + d))
    return ops, union_us(spans) / 1e3


def _device_ops(events, cuda: bool) -> tuple[list[tuple[str, float]], float]:
    """(ops, busy_us) from the profiler's events: GPU kernels/memcpys with their durations and the union of their
    intervals, or (CPU) the self times of the aten-level ops and their sum."""
    from torch.autograd import DeviceType
    annotations = {e.name for e in events
                   if e.device_type == DeviceType.CPU and getattr(e, "is_user_annotation", False)}
    ops: list[tuple[str, float]] = []
    if cuda:
        spans = []
        for e in events:
            if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
                continue
            if str(getattr(e, "activity_type", "")) in NOT_DEVICE_WORK:
                continue
            if e.name in annotations or e.name.startswith((STEP_MARK, "ProfilerStep")):
                continue  # record_function ranges mirrored on the GPU timeline
            s, t = e.time_range.start, e.time_range.end
            ops.append((e.name, t - s))
            spans.append((s, t))
        return ops, union_us(spans)
    total = 0.0
    for e in events:
        if e.device_type != DeviceType.CPU or getattr(e, "is_user_annotation", False) or e.name in annotations:
            continue
        if "::" not in e.name or e.name.startswith(("autograd::", STEP_MARK, "ProfilerStep")):
            continue  # Python functions, record_function ranges, autograd-engine wrappers: host time
        us = float(e.self_cpu_time_total)
        ops.append((_in_optimizer(e) + e.name, us))
        total += us
    return ops, total


def _in_optimizer(e) -> str:
    """``"Optimizer.step#AdamW.step > "`` for a CPU op inside the optimizer's step (on CPU its foreach ops run as
    per-tensor aten ops that no name rule could tell from the model's), else ``""``."""
    p = getattr(e, "cpu_parent", None)
    while p is not None:
        if p.name.startswith("Optimizer."):
            return p.name + " > "
        p = getattr(p, "cpu_parent", None)
    return ""


def profile_variant(a, variant: str, config: str, overrides: list[str], trace_path: Optional[Path]) -> dict:
    """Builds the trainer of one variant, runs warm-up, timed and profiled steps; the variant's result dict."""
    import torch
    from moetrain.config import load_config
    from moetrain.parallel.mesh import init_distributed
    from moetrain.train import STOP_SIGNALS, Trainer

    res = {"variant": variant, "status": "failed", "config": config, "overrides": overrides,
           "variant_overrides": ts.VARIANTS[variant], "warmup": a.warmup, "timed": a.timed, "steps": a.steps}
    t0 = time.perf_counter()
    cfg = load_config(config, overrides)
    ctx = init_distributed(cfg.parallel.backend)
    dev = ctx.device
    cuda = dev.type == "cuda"
    res["device_type"] = dev.type
    res["device"] = torch.cuda.get_device_name(dev) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    trainer = Trainer(cfg, ctx)
    for sig, h in handlers.items():  # the trainer's stop flag would swallow Ctrl-C and `timeout`'s SIGTERM
        signal.signal(sig, h)
    try:
        sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
        trainer.model.train()
        res["build_s"] = time.perf_counter() - t0
        print(f"[profile_step] {variant}: built in {res['build_s']:.1f} s on {res['device']}; "
              f"{a.warmup} warm-up step(s) ...", flush=True)
        out = None
        for _ in range(a.warmup):
            out = trainer.train_step()
        sync()
        timed = []
        for _ in range(a.timed):
            s = time.perf_counter()
            out = trainer.train_step()
            sync()
            timed.append(time.perf_counter() - s)
        res["step_ms_unprofiled"] = 1e3 * sum(timed) / len(timed) if timed else None
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        walls = []
        with torch.profiler.profile(activities=acts, record_shapes=False, with_stack=False) as prof:
            for i in range(a.steps):
                s = time.perf_counter()
                with torch.profiler.record_function(f"{STEP_MARK}{i}"):
                    out = trainer.train_step()
                    sync()
                walls.append(time.perf_counter() - s)
        res["step_ms_each"] = [1e3 * w for w in walls]
        res["step_ms"] = 1e3 * sum(walls) / len(walls)
        if out is not None:
            res["loss"] = float(out["loss_t"])
        if cuda:
            res["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        if trace_path is not None:
            prof.export_chrome_trace(str(trace_path))
            res["trace"] = str(trace_path)
        try:
            ops, busy_us = _kineto_cuda_ops(prof) if cuda else _device_ops(prof.events(), False)
        except AttributeError:  # an older torch without some _KinetoEvent accessor
            ops, busy_us = _device_ops(prof.events(), cuda)
        res.update(summarize(ops, busy_us, res["step_ms"], a.steps, top=max(a.top, 25)))
        res["status"] = "ok"
        return res
    finally:
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def run_in_process(a, variant: str, config: str, overrides: list[str], trace_path: Path) -> dict:
    """profile_variant, with any exception turned into a failed result (printed)."""
    try:
        res = profile_variant(a, variant, config, overrides, trace_path)
    except BaseException as e:  # noqa: BLE001 -- a failing variant must not stop the others
        if isinstance(e, KeyboardInterrupt):
            raise
        tb = traceback.format_exc()
        print(f"[profile_step] {variant}: FAILED\n{tb}", flush=True)
        res = {"variant": variant, "status": "failed", "config": config, "overrides": overrides,
               "variant_overrides": ts.VARIANTS[variant], "error": f"{type(e).__name__}: {e}",
               "traceback": tb[-8000:]}
    print(format_variant(res, a.top), flush=True)
    return res


# --------------------------------------------------------------------------------------------
# one child process per variant
# --------------------------------------------------------------------------------------------

def run_child(a, variant: str, config: str, runner, trace_path: Path) -> dict:
    """This script again with ``--in-process --variants <variant>``; its result JSON, or a failed result with
    the tail of its output when it died (crash, OOM kill, timeout)."""
    fd, tmp = tempfile.mkstemp(prefix=f"profile_{variant.replace('+', '_')}_", suffix=".json")
    os.close(fd)
    os.unlink(tmp)
    cmd = [a.python, str(Path(__file__).resolve()), "--in-process", "--child-json", tmp, "--variants", variant,
           "--config", config, "--warmup", str(a.warmup), "--timed", str(a.timed), "--steps", str(a.steps),
           "--top", str(a.top), "--work", a.work, "--out", str(a.out), "--trace", str(trace_path)]
    if a.set:
        cmd += ["--set", *a.set]
    cmd += ["--smoke"] if a.smoke else []
    cmd += ["--cpu"] if a.cpu else []
    budget = min(a.variant_timeout_s, runner.left())
    base = {"variant": variant, "config": config, "variant_overrides": ts.VARIANTS[variant], "cmd": " ".join(cmd)}
    if runner.left() < a.min_variant_s:
        print(f"[profile_step] {variant}: skipped, {runner.left():.0f}s left of --deadline-s", flush=True)
        return {**base, "status": "skipped (deadline)"}
    print(f"[profile_step] {variant}: own process, up to {budget:.0f} s", flush=True)
    tail: collections.deque = collections.deque(maxlen=25)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=runner.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)

    def pump():
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            sys.stdout.write(line)
            sys.stdout.flush()

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    t0 = time.monotonic()
    status = None
    try:
        rc = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        rc, status = None, f"timeout after {budget:.0f} s"
    finally:
        if proc.poll() is None:
            _stop_group(proc)
        th.join(timeout=10)
    res = None
    if Path(tmp).is_file():
        try:
            res = json.loads(Path(tmp).read_text())
        except ValueError:
            res = None
        Path(tmp).unlink(missing_ok=True)
    if res is None:
        status = status or f"failed rc={rc}"
        res = {**base, "status": status, "error": "\n".join(tail)}
        print(f"[profile_step] {variant}: {status}", flush=True)
    res["seconds"] = time.monotonic() - t0
    res["cmd"] = base["cmd"]
    return res


# --------------------------------------------------------------------------------------------

def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=None, choices=list(ts.VARIANTS),
                   help=f"default: all but bf16-foreach-adamw (with --smoke: {' '.join(SMOKE_VARIANTS)})")
    p.add_argument("--config", default="", help=f"default {DEFAULT_CONFIG} with {' '.join(DEFAULT_SET)} "
                   f"({ts.CPU_CONFIG} with --smoke); an explicit --config drops those default overrides")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra overrides of every variant")
    p.add_argument("--steps", type=int, default=0, help="profiled steps (default 3; 1 with --smoke)")
    p.add_argument("--warmup", type=int, default=-1, help="warm-up steps (default 2; 1 with --smoke)")
    p.add_argument("--timed", type=int, default=-1,
                   help="steps timed without the profiler, after the warm-up (default 3; 0 with --smoke)")
    p.add_argument("--top", type=int, default=25, help="rows of the top-ops table")
    p.add_argument("--smoke", action="store_true", help="tiny config, 1 warm-up + 1 profiled step (automatic "
                   "without a GPU unless --config is given)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even with a GPU (automatic without one)")
    p.add_argument("--in-process", action="store_true", help="every variant in this process (no isolation)")
    p.add_argument("--out", default="", help="default benchmarks/results/profile_<gpu|cpu>_<date>")
    p.add_argument("--work", default="/tmp/moetrain-train-step", help="data cache (shared with train_step.py)")
    p.add_argument("--python", default=sys.executable, help="interpreter of the per-variant processes")
    p.add_argument("--deadline-s", type=float, default=540.0, help="wall budget of the whole script")
    p.add_argument("--variant-timeout-s", type=float, default=300.0, help="wall limit of one variant's process")
    p.add_argument("--min-variant-s", type=float, default=20.0, help="do not start a variant with less time left")
    p.add_argument("--child-json", default="", help=argparse.SUPPRESS)
    p.add_argument("--trace", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.cpu = a.cpu or _gpu_count() == 0
    a.smoke = a.smoke or (a.cpu and not a.config)
    if not a.config:
        a.config = ts.CPU_CONFIG if a.smoke else DEFAULT_CONFIG
        if not a.smoke:
            a.set = [*DEFAULT_SET, *a.set]
    a.variants = a.variants or list(SMOKE_VARIANTS if a.smoke else ts.DEFAULT_VARIANTS)
    a.steps = a.steps or (1 if a.smoke else 3)
    a.warmup = a.warmup if a.warmup >= 0 else (1 if a.smoke else 2)
    a.timed = a.timed if a.timed >= 0 else (0 if a.smoke else 3)
    return a


def _trace_path(out: Path, stamp: str, variant: str) -> Path:
    return out / f"profile_{stamp}_{variant.replace('+', '_')}.trace.json.gz"


def main(argv=None) -> int:
    a = _parse_args(argv)
    if a.cpu:  # the Triton kernels and FP8 GEMMs run in the interpreter on CPU (before triton is imported)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    out = Path(a.out or ROOT / "benchmarks" / "results" /
               f"profile_{'cpu' if a.cpu else 'gpu'}_{_dt.date.today().strftime('%Y%m%d')}")
    out.mkdir(parents=True, exist_ok=True)
    a.out = str(out)
    config, overrides = plan_variants(a)

    if a.child_json:  # one variant for a parent process: its result as JSON, nothing else written
        (variant,) = a.variants
        res = run_in_process(a, variant, config, overrides[variant], Path(a.trace) if a.trace else None)
        Path(a.child_json).write_text(json.dumps(res, default=str))
        return 0 if res["status"] == "ok" else 1

    def _term(signum, _frame):  # gpu_batch.sh's `timeout`: stop the variant's process, still write the files
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _term)
    a.nproc = 1
    info = {"date": _dt.datetime.now().isoformat(timespec="seconds"), **_device_info(a),
            "command": " ".join(["python benchmarks/profile_step.py", *(sys.argv[1:] if argv is None else argv)])}
    if a.cpu:
        info["device"] = f"CPU ({os.cpu_count()} cores), TRITON_INTERPRET=1"
    runner = ts.StepRunner(a, out, Path(a.work), stamp)
    print(f"[profile_step] {info['device']}; torch {info.get('torch')}; {config} {' '.join(a.set)}; "
          f"{a.warmup} warm-up + {a.timed} timed + {a.steps} profiled step(s); variants {' '.join(a.variants)}; "
          f"out {out}", flush=True)
    results: list[dict] = []
    try:
        for v in a.variants:
            trace = _trace_path(out, stamp, v)
            if a.in_process:
                results.append(run_in_process(a, v, config, overrides[v], trace))
            else:
                results.append(run_child(a, v, config, runner, trace))
    finally:
        failed = [r["variant"] for r in results if r.get("status") != "ok"]
        parts = [f"# moetrain step profile, {info['date']}", "",
                 f"- device: {info['device']}; torch {info.get('torch')}; python {info['python']}",
                 f"- command: `{info['command']}`",
                 f"- config: `{config}` {' '.join(a.set)}; {a.warmup} warm-up + {a.timed} timed + {a.steps} "
                 f"profiled step(s) per variant",
                 f"- wall time: {time.monotonic() - runner.t0:.0f} s", "",
                 "ms per step (% of the profiled step's wall time):", "", comparison_table(results), ""]
        if a.cpu:
            parts += ["CPU (fp32, Triton interpreter): this exercises the script only; the numbers say nothing "
                      "about GPU time.", ""]
        parts += ["```", *(format_variant(r, a.top) for r in results), "```", ""]
        if failed:
            parts += [f"FAILED or skipped: {' '.join(failed)}", ""]
        text = "\n".join(parts)
        md = out / f"profile_{stamp}.md"
        md.write_text(text)
        md.with_suffix(".json").write_text(json.dumps(
            {**info, "args": vars(a), "config": config, "categories": list(CATEGORY_NAMES),
             "category_rules": {c: list(s) for c, s in CATEGORIES}, "other": OTHER, "idle": IDLE,
             "variants": results}, indent=1, default=str))
        print("\n" + comparison_table(results), flush=True)
        if failed:
            print(f"[profile_step] FAILED or skipped: {' '.join(failed)}", flush=True)
        print(f"[profile_step] wrote {md}, {md.with_suffix('.json').name} and "
              f"{sum(1 for r in results if r.get('trace'))} trace(s)", flush=True)
    return 1 if failed or len(results) < len(a.variants) else 0


if __name__ == "__main__":
    sys.exit(main())
