"""Routed experts alone, forward + backward, under different routings (GPU; issue 5's expert GEMM choice).

    python benchmarks/bench_experts.py --out results/                   # E=16, D=7168, I=2048, 32768 and 131072 rows
    python benchmarks/bench_experts.py --rows 32768 --routings balanced collapsed

The whole SwiGLU expert module (``w2(silu(w1 x) * w3 x)`` per expert; fp32 master weights, bf16 rows, the Triton
SwiGLU kernel as ``kernels.enabled=true`` installs it) runs forward and backward on M rows sorted by expert, in
three variants:

  bf16           GroupedExperts: torch._grouped_mm on the weights cast to bf16
  fp8-grouped    Fp8GroupedExperts, blockwise, expert_gemm="grouped": the Triton grouped kernels, no host sync
  fp8-per-expert Fp8GroupedExperts, blockwise, expert_gemm="per_expert": one cuBLAS block-scaled GEMM per expert,
                 the counts attached on the host as the ep = 1 dispatcher hands them over (no sync of its own)

and routings of the M rows over the E experts:

  balanced   M / E rows each (what the aux-loss-free balancing aims at)
  collapsed  all rows on E / 2 experts, none on the others (the fp8-v3-layers training runs: load_max = 2 x mean)
  skewed     rows proportional to 1 / (e + 1)

Time per iteration = wall time of forward + backward between two device synchronisations (host launches
included, which is what a per-expert loop costs), median of --reps after --warmup; the FP8 outputs' relative
error against bf16 is printed as a check. Prints a table and writes <out>/bench_experts_<date>.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROUTINGS = ("balanced", "collapsed", "skewed")
VARIANTS = ("bf16", "fp8-grouped", "fp8-per-expert")


def routing_counts(kind: str, rows: int, experts: int) -> list[int]:
    """Rows per expert for a routing (see the module docstring); they sum to ``rows``.

    Raises ValueError for an unknown routing."""
    if kind == "balanced":
        w = [1.0] * experts
    elif kind == "collapsed":
        w = [1.0 if e < max(1, experts // 2) else 0.0 for e in range(experts)]
    elif kind == "skewed":
        w = [1.0 / (e + 1) for e in range(experts)]
    else:
        raise ValueError(f"unknown routing {kind!r}; one of {ROUTINGS}")
    total = sum(w)
    counts = [int(rows * x / total) for x in w]
    counts[0] += rows - sum(counts)
    return counts


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--dim", type=int, default=7168)
    p.add_argument("--inter", type=int, default=2048)
    p.add_argument("--rows", type=int, nargs="+", default=[32768, 131072],
                   help="rows (tokens x top-k) per call: 4096 and 16384 tokens x 8 (default: %(default)s)")
    p.add_argument("--routings", nargs="+", default=list(ROUTINGS), choices=ROUTINGS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default="results")
    return p.parse_args(argv)


def _modules(a, device):
    import torch
    from kernels.swiglu import swiglu, swiglu_packed
    from moetrain.model.moe import GroupedExperts
    from moetrain.precision.fp8 import Fp8Config, Fp8GroupedExperts
    torch.manual_seed(0)
    base = GroupedExperts(a.experts, a.dim, a.inter, init_std=0.02).to(device)
    base.reset_parameters()
    base.act_fn = swiglu
    mods = {"bf16": base}
    for name, gemm in (("fp8-grouped", "grouped"), ("fp8-per-expert", "per_expert")):
        m = Fp8GroupedExperts.convert(copy.deepcopy(base), Fp8Config("blockwise", expert_gemm=gemm), name)
        m.act_packed_fn = swiglu_packed
        mods[name] = m
    return mods


def run(a) -> list[dict]:
    import torch
    from moetrain.model.dispatch import attach_host_counts
    device = torch.device("cuda")
    mods = _modules(a, device)
    rows_out = []
    for M in a.rows:
        x = torch.randn(M, a.dim, device=device, dtype=torch.bfloat16)
        g = torch.randn(M, a.dim, device=device, dtype=torch.bfloat16)
        for routing in a.routings:
            counts = routing_counts(routing, M, a.experts)
            ref = None
            for name in a.variants:
                m = mods[name]

                def step():
                    tpe = torch.tensor(counts, device=device)
                    if name == "fp8-per-expert":
                        attach_host_counts(tpe, list(counts))
                    xi = x.detach().requires_grad_()
                    y = m(xi, tpe)
                    y.backward(g)
                    m.zero_grad(set_to_none=True)
                    return y
                times = []
                for i in range(a.warmup + a.reps):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    y = step()
                    torch.cuda.synchronize()
                    if i >= a.warmup:
                        times.append(time.perf_counter() - t0)
                y = y.detach().float()
                if ref is None:
                    ref = y
                err = ((y - ref).norm() / ref.norm()).item()
                ms = statistics.median(times) * 1e3
                flops = 3 * 2 * 3 * M * a.dim * a.inter   # 3 GEMMs (w1, w3, w2) x fwd + dgrad + wgrad
                rows_out.append({"rows": M, "routing": routing, "variant": name, "ms": ms,
                                 "tflops": flops / ms / 1e9, "rel_err_vs_bf16": err, "counts": counts})
                print(f"  rows {M:7d} {routing:9s} {name:15s} {ms:8.2f} ms  {flops / ms / 1e9:7.0f} TFLOP/s  "
                      f"rel err vs bf16 {err:.1e}", flush=True)
    return rows_out


def table(rows: list[dict]) -> str:
    lines = ["| rows | routing | bf16 ms | fp8-grouped ms (vs bf16) | fp8-per-expert ms (vs bf16) |",
             "|---:|---|---:|---:|---:|"]
    keys = sorted({(r["rows"], r["routing"]) for r in rows}, key=lambda k: (k[0], ROUTINGS.index(k[1])))
    for M, routing in keys:
        by = {r["variant"]: r["ms"] for r in rows if r["rows"] == M and r["routing"] == routing}
        base = by.get("bf16")

        def cell(v):
            if v not in by:
                return "n/a"
            return f"{by[v]:.2f}" + (f" ({base / by[v]:.2f}x)" if base else "")
        lines.append(f"| {M} | {routing} | {cell('bf16')} | {cell('fp8-grouped')} | {cell('fp8-per-expert')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = _parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench_experts: needs a CUDA GPU (the FP8 expert paths run on Hopper)", file=sys.stderr)
        return 2
    os.environ.setdefault("MOETRAIN_FP8_AUTOTUNE", "0")
    info = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "command": " ".join(["python benchmarks/bench_experts.py", *sys.argv[1:]]),
            "args": vars(a)}
    print(f"[bench_experts] {info['device']}; torch {info['torch']}; E={a.experts} D={a.dim} I={a.inter}",
          flush=True)
    rows = run(a)
    text = table(rows)
    print("\n" + text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_experts_{_dt.datetime.now().strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps({**info, "rows": rows, "table": text}, indent=1))
    print(f"[bench_experts] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
