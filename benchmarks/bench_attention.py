"""Benchmark the MLA attention kernel (kernels/mla_attention.py) against torch SDPA. GPU only.

Times forward and forward+backward, causal, bf16, at DeepSeek MLA head dims (Dqk = 128 nope + 64 rope = 192,
Dv = 128) for each (B, H) at T = 4096:

* ``triton``        mla_attention(q, k, v) (q/k as one [B, H, T, 192] tensor, split 128 + 64 inside)
* ``triton_split``  mla_attention_split(q_nope, q_pe, k_nope, k_pe[B, 1, T, 64], v) (k_pe shared by heads)
* ``sdpa_<backend>`` torch.nn.functional.scaled_dot_product_attention restricted to one backend (cudnn,
  efficient, math, flash -- flash refuses Dqk != Dv and is reported as unsupported), eager and
  torch.compile (``--no-compile`` skips the latter).

Correctness is checked first (output and gradients vs the fp32 reference at a small size, and vs SDPA at the
first benchmark shape). Times are triton.testing.do_bench medians. FLOPs (causal): forward
2 * B * H * T * T * (Dqk + Dv) / 2, backward 2.5 x forward. Prints a table and writes JSON to
``<out-dir>/attention_<device>_<date>.json``.

``--sweep`` also times alternative block configurations of the three kernels at one shape (``--sweep-shape``)
and prints the best of each and the fwd+bwd time of their combination vs the default, to tune
``kernels.mla_attention.get_config``. It is bounded by ``--sweep-budget`` seconds (default 75: short do_bench
runs, later candidates skipped once a kernel's share is spent); ``--sweep-only`` skips the implementation table.
The sweep also covers the opt-in fused backward (``AttentionConfig.bwd_fused``: one kernel for dK, dV and dQ,
dQ by fp32 atomics): its gradients (combined and split / shared k_pe) are first checked against the fp32
reference at the check shape (B=2, H=3, T=300); if they pass, its block candidates (part ``bwd_fused``) are
timed as the whole backward, and the summary compares whole backward and fwd+bwd with bwd_fused off vs on.

Usage: python benchmarks/bench_attention.py [--batch 1 2 4] [--heads 16 32 64 128] [--seq 4096]
                                            [--out-dir benchmarks/results] [--no-compile] [--sweep]
                                            [--sweep-only] [--sweep-budget 75]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--heads", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--nope-dim", type=int, default=128, help="qk_nope_head_dim")
    p.add_argument("--rope-dim", type=int, default=64, help="qk_rope_head_dim")
    p.add_argument("--v-dim", type=int, default=128, help="v_head_dim")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--non-causal", action="store_true", help="benchmark full (non-causal) attention")
    p.add_argument("--impls", nargs="+",
                   default=["triton", "triton_split", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "sdpa_flash"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--no-bwd", action="store_true", help="time the forward only")
    p.add_argument("--math-max-gib", type=float, default=40.0,
                   help="skip sdpa_math when its B*H*T*T score matrices would exceed this many GiB")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--sweep", action="store_true", help="also sweep kernel block configs at one shape")
    p.add_argument("--sweep-shape", type=int, nargs=2, default=[1, 128], metavar=("B", "H"))
    p.add_argument("--sweep-only", action="store_true",
                   help="with --sweep: skip the implementation table (correctness checks and sweep only)")
    p.add_argument("--sweep-budget", type=float, default=75.0,
                   help="seconds for the whole sweep (compiles included); later candidates are skipped")
    p.add_argument("--sweep-warmup", type=int, default=10, help="do_bench warmup in the sweep (ms)")
    p.add_argument("--sweep-rep", type=int, default=50, help="do_bench repetition time in the sweep (ms)")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ helpers
def flops(B, H, T, dqk, dv, causal, bwd):
    f = 2.0 * B * H * T * T * (dqk + dv) / (2 if causal else 1)
    return f * 3.5 if bwd else f


def make_inputs(B, H, T, dn, dr, dv, dtype, requires_grad):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, T, dn + dr, device="cuda", dtype=dtype, generator=g)
    k_nope = torch.randn(B, H, T, dn, device="cuda", dtype=dtype, generator=g)
    k_pe = torch.randn(B, 1, T, dr, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, H, T, dv, device="cuda", dtype=dtype, generator=g)
    do = torch.randn(B, H, T, dv, device="cuda", dtype=dtype, generator=g)
    k = torch.cat([k_nope, k_pe.expand(-1, H, -1, -1)], -1)  # what SDPA and mla_attention need
    leaves = dict(q=q, k=k, v=v, k_nope=k_nope, k_pe=k_pe)
    for t in leaves.values():
        t.requires_grad_(requires_grad)
    return leaves, do


def sdpa_fn(backend_name, causal, compile_):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}[backend_name]

    def f(x):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=causal)

    return torch.compile(f, dynamic=False) if compile_ else f


def triton_fn(kind, causal, dn, compile_):
    from kernels.mla_attention import mla_attention, mla_attention_split

    if kind == "triton":
        def f(x):
            return mla_attention(x["q"], x["k"], x["v"], causal=causal)
    else:
        def f(x):
            q = x["q"]
            return mla_attention_split(q[..., :dn], q[..., dn:], x["k_nope"], x["k_pe"], x["v"], causal=causal)
    return torch.compile(f, dynamic=False) if compile_ else f


def grad_leaves(impl, x):
    return [x["q"], x["k_nope"], x["k_pe"], x["v"]] if impl == "triton_split" else [x["q"], x["k"], x["v"]]


def bench(fn, x, do, bwd, impl, warmup, rep):
    import triton.testing

    if not bwd:
        def run():
            with torch.no_grad():
                fn(x)
        leaves = None
    else:
        leaves = grad_leaves(impl, x)

        def run():
            fn(x).backward(do)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    ms = triton.testing.do_bench(run, warmup=warmup, rep=rep, grad_to_none=leaves, return_mode="median")
    return ms, peak


# ------------------------------------------------------------------------------------------------ checks
def check_correctness(args, dtype, causal):
    """Small-size check vs the fp32 reference; then the benchmark size vs SDPA (efficient or cuDNN)."""
    from kernels.mla_attention import mla_attention, mla_attention_ref, mla_attention_split

    dn, dr, dv = args.nope_dim, args.rope_dim, args.v_dim
    report = {}
    for (B, H, T) in [(2, 3, 300), (args.batch[0], args.heads[0], args.seq)]:
        x, do = make_inputs(B, H, T, dn, dr, dv, dtype, True)
        o = mla_attention(x["q"], x["k"], x["v"], causal=causal)
        o.backward(do)
        got = [o.detach()] + [t.grad.clone() for t in (x["q"], x["k"], x["v"])]
        for t in x.values():
            t.grad = None
        o_s = mla_attention_split(x["q"][..., :dn], x["q"][..., dn:], x["k_nope"], x["k_pe"], x["v"], causal=causal)
        o_s.backward(do)
        split_err = (o_s.float() - o.float()).abs().max().item()
        xf = {k_: t.detach().float().requires_grad_() for k_, t in x.items() if k_ in ("q", "k", "v")}
        if T <= 1024:
            o_ref = mla_attention_ref(xf["q"], xf["k"], xf["v"], causal=causal)
            name = "ref_fp32"
        else:  # T x T fp32 scores of the big shape: use SDPA in fp32 instead
            o_ref = F.scaled_dot_product_attention(xf["q"], xf["k"], xf["v"], is_causal=causal)
            name = "sdpa_fp32"
        o_ref.backward(do.float())
        want = [o_ref.detach()] + [xf[k_].grad for k_ in ("q", "k", "v")]
        errs = {}
        for n, g_, w in zip(("o", "dq", "dk", "dv"), got, want):
            errs[n] = (g_.float() - w).abs().max().item() / max(w.abs().max().item(), 1e-6)
        errs["split_vs_combined_o"] = split_err
        ok = all(v_ < 2e-2 for n, v_ in errs.items() if n != "split_vs_combined_o") and split_err < 2e-2
        report[f"B{B}_H{H}_T{T}_vs_{name}"] = dict(rel_max_err=errs, ok=ok)
        print(f"check B={B} H={H} T={T} vs {name}: " + ", ".join(f"{n} {v_:.2e}" for n, v_ in errs.items())
              + ("  OK" if ok else "  FAIL"))
        del x, xf, o, o_s, o_ref, got, want
        torch.cuda.empty_cache()
    return report


# ------------------------------------------------------------------------------------------------ sweep
# Candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, most promising first; the sweep times the
# get_config default before them and stops a part when its share of --sweep-budget is spent.
# Meant for bf16 (128 + 64, 128) on H100/H200 (227 KB shared memory); configs that do not fit fail and are listed.
# Ordered by an offline sm_90a compile (ptxas, Triton 3.9: register spills) -- e.g. dK/dV with BLOCK_M 64 x
# BLOCK_N 128 spills ~400 B/thread, BLOCK_M 32 or 16 x 128 (almost) none; fwd 128 x 64 with 3 stages uses 214
# registers, 4 stages 234, none spill; dQ 128 x 64 and 128 x 32 with 8 warps do not spill, 4 warps do.
#   fwd:    BLOCK_M query rows per program x BLOCK_N keys per step
#   bwd_kv: BLOCK_M query rows per step x BLOCK_N keys per program (dK/dV kernel)
#   bwd_q:  BLOCK_M query rows per program x BLOCK_N keys per step (dQ kernel)
#   bwd_fused: BLOCK_M query rows per step x BLOCK_N keys per program (fused dK/dV/dQ kernel, bwd_fused=True;
#           offline sm_90a compile: 64 x 64 x 8 warps ~180 B (3 stages) / ~290 B (2) spills, all dots on wgmma;
#           32 x 64 x 8 (2-4 stages) no spills and 16 x 128 x 8 ~44 B, but BLOCK_M < 64 runs the dQ dot on
#           mma.sync; 32 x 128 x 8 ~230 B; 64 x 128 x 3 stages needs ~249 KB of shared memory: does not fit)
SWEEP_CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 64, 8, 2), (64, 128, 4, 2), (64, 64, 4, 3),
            (128, 32, 4, 3), (256, 64, 16, 2), (128, 64, 4, 3)],
    "bwd_kv": [(64, 128, 8, 2), (32, 128, 8, 3), (32, 128, 8, 2), (16, 128, 8, 3), (32, 128, 8, 4),
               (64, 128, 8, 3), (32, 64, 8, 2), (32, 64, 8, 3), (64, 64, 8, 2), (16, 128, 8, 4), (64, 128, 8, 1),
               (32, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2)],
    "bwd_q": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 64, 8, 4), (128, 32, 8, 4), (64, 64, 4, 3),
              (64, 32, 4, 3), (64, 64, 4, 4), (64, 128, 8, 2), (128, 128, 8, 2), (128, 32, 4, 3)],
    "bwd_fused": [(64, 64, 8, 3), (32, 64, 8, 3), (16, 128, 8, 3), (64, 64, 8, 2), (32, 64, 8, 4), (16, 128, 8, 4),
                  (32, 128, 8, 2), (32, 64, 8, 2), (64, 128, 8, 2), (16, 128, 8, 2)],
}
SWEEP_FIELDS = {
    "fwd": ("fwd_block_m", "fwd_block_n", "fwd_warps", "fwd_stages"),
    "bwd_kv": ("kv_block_m", "kv_block_n", "kv_warps", "kv_stages"),
    "bwd_q": ("q_block_m", "q_block_n", "q_warps", "q_stages"),
    "bwd_fused": ("fused_block_m", "fused_block_n", "fused_warps", "fused_stages"),
}


def check_fused(args, dtype, causal, cfg):
    """Gradients of the fused backward (``cfg`` with bwd_fused) vs the fp32 reference at the check shape, for
    mla_attention and mla_attention_split (shared k_pe). Returns (ok, rel_max_err dict)."""
    import kernels.mla_attention as mla

    dn, dr, dv = args.nope_dim, args.rope_dim, args.v_dim
    B, H, T = 2, 3, 300
    x, do = make_inputs(B, H, T, dn, dr, dv, dtype, True)
    xf = {k_: x[k_].detach().float().requires_grad_() for k_ in ("q", "k", "v")}
    o_ref = mla.mla_attention_ref(xf["q"], xf["k"], xf["v"], causal=causal)
    o_ref.backward(do.float())
    dk_ref = xf["k"].grad
    want = dict(o=o_ref.detach(), dq=xf["q"].grad, dk=dk_ref, dv=xf["v"].grad, split_dq=xf["q"].grad,
                split_dk_nope=dk_ref[..., :dn], split_dk_pe=dk_ref[..., dn:].sum(1, keepdim=True),
                split_dv=xf["v"].grad)
    got = {}
    mla.CONFIG_OVERRIDE = cfg
    try:
        o = mla.mla_attention(x["q"], x["k"], x["v"], causal=causal)
        o.backward(do)
        got.update(o=o.detach(), dq=x["q"].grad, dk=x["k"].grad, dv=x["v"].grad)
        for t in x.values():
            t.grad = None
        q = x["q"]
        mla.mla_attention_split(q[..., :dn], q[..., dn:], x["k_nope"], x["k_pe"], x["v"], causal=causal).backward(do)
        got.update(split_dq=x["q"].grad, split_dk_nope=x["k_nope"].grad, split_dk_pe=x["k_pe"].grad,
                   split_dv=x["v"].grad)
    except Exception as e:
        return False, {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}
    finally:
        mla.CONFIG_OVERRIDE = None
    errs = {n: (got[n].float() - w).abs().max().item() / max(w.abs().max().item(), 1e-6) for n, w in want.items()}
    ok = all(e_ < 2e-2 for e_ in errs.values())  # NaN fails too
    return ok, errs


def sweep(args, dtype, causal):
    """Time each candidate of each kernel (the others at the default), within --sweep-budget seconds in all
    (short do_bench: --sweep-warmup / --sweep-rep ms). Each candidate costs one Triton compile plus a few runs;
    a part stops early when its share of the budget is spent. Then times the best combination fwd+bwd."""
    import time

    import triton.testing

    import kernels.mla_attention as mla

    B, H = args.sweep_shape
    T, dn, dr, dv = args.seq, args.nope_dim, args.rope_dim, args.v_dim
    x, do = make_inputs(B, H, T, dn, dr, dv, dtype, True)
    base = mla.get_config(dn + dr, dv, "cuda", dtype, split=(dn, dr))
    fwd_f = flops(B, H, T, dn + dr, dv, causal, False)
    bwd_f = fwd_f * 2.5
    results = []
    t_start = time.perf_counter()

    def bench_ms(run, leaves=None):
        run()  # compile outside the timing
        return triton.testing.do_bench(run, warmup=args.sweep_warmup, rep=args.sweep_rep, grad_to_none=leaves,
                                       return_mode="median")

    def time_cfg(cfg, part):
        mla.CONFIG_OVERRIDE = cfg
        try:
            if part == "fwd":
                def run():
                    with torch.no_grad():
                        mla.mla_attention(x["q"], x["k"], x["v"], causal=causal)
                ms = bench_ms(run)
                return ms, fwd_f / ms / 1e9
            if part == "bwd":
                o = mla.mla_attention(x["q"], x["k"], x["v"], causal=causal)

                def run():
                    o.backward(do, retain_graph=True)
                ms = bench_ms(run, [x["q"], x["k"], x["v"]])
                return ms, bwd_f / ms / 1e9

            def run():  # fwd+bwd
                mla.mla_attention(x["q"], x["k"], x["v"], causal=causal).backward(do)
            ms = bench_ms(run, [x["q"], x["k"], x["v"]])
            return ms, (fwd_f + bwd_f) / ms / 1e9
        except Exception as e:  # out of shared memory / registers
            return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        finally:
            mla.CONFIG_OVERRIDE = None
            for t in x.values():
                t.grad = None

    print(f"\nsweep at B={B} H={H} T={T}, budget {args.sweep_budget:.0f} s (default {base})")
    fused_base = dataclasses.replace(base, bwd_fused=True)
    fused_ok, fused_errs = check_fused(args, dtype, causal, fused_base)
    print("check bwd_fused B=2 H=3 T=300 vs ref_fp32: " + ", ".join(
        f"{n} {v_:.2e}" if isinstance(v_, float) else f"{n} {v_}" for n, v_ in fused_errs.items())
        + ("  OK" if fused_ok else "  FAIL (bwd_fused not timed)"))
    best = {}
    parts = [p for p in SWEEP_CANDIDATES if fused_ok or p != "bwd_fused"]
    for i, part in enumerate(parts):
        now = time.perf_counter()  # this part's share of what is left of the budget
        part_deadline = now + (args.sweep_budget - (now - t_start)) / (len(parts) - i)
        fields = SWEEP_FIELDS[part]
        default = base.fused_launch() if part == "bwd_fused" else tuple(getattr(base, f) for f in fields)
        for j, c in enumerate([default] + [c for c in SWEEP_CANDIDATES[part] if c != default]):
            label = f"{part} BM={c[0]} BN={c[1]} warps={c[2]} stages={c[3]}"
            if j and time.perf_counter() > part_deadline:  # the first (the default) always runs
                print(f"  {label:<44} skipped (sweep budget)")
                results.append(dict(part=part, config=c, ms=None, tflops=None, error="skipped: budget"))
                continue
            cfg = dataclasses.replace(base, **dict(zip(fields, c)), bwd_fused=part == "bwd_fused")
            ms, tf = time_cfg(cfg, "fwd" if part == "fwd" else "bwd")
            if ms is None:
                print(f"  {label:<44} failed: {tf}")
            else:
                print(f"  {label:<44} {ms:8.3f} ms {tf:7.1f} TFLOP/s ({'fwd' if part == 'fwd' else 'whole bwd'})"
                      f"  [{time.perf_counter() - t_start:5.1f} s]")
                if part not in best or ms < best[part][1]:
                    best[part] = (c, ms)
            results.append(dict(part=part, config=c, ms=ms, tflops=tf if ms else None, error=None if ms else tf))
    print("best: " + ", ".join(f"{p}={c} {ms:.3f} ms" for p, (c, ms) in best.items()))
    combo = base
    for part, (c, _) in best.items():
        combo = dataclasses.replace(combo, **dict(zip(SWEEP_FIELDS[part], c)))
    combined = {}
    candidates = [("default", base), ("best", combo)]
    if fused_ok:  # bwd_fused on: the default blocks, and the best fwd + best fused blocks
        candidates += [("fused", fused_base), ("fused_best", dataclasses.replace(combo, bwd_fused=True))]
    for name, cfg in candidates:
        ms, tf = time_cfg(cfg, "fwdbwd")
        combined[name] = dict(config=dataclasses.asdict(cfg), ms=ms, tflops=tf if ms else None)
        print(f"  fwd+bwd {name:<10} " + (f"{ms:8.3f} ms {tf:7.1f} TFLOP/s" if ms else f"failed: {tf}")
              + f"  {cfg}")
    # bwd_fused off vs on at the default blocks: whole backward (first row of each part) and fwd+bwd
    bwd_ms = {p: next((r["ms"] for r in results if r["part"] == p), None) for p in ("bwd_kv", "bwd_fused")}
    fused_cmp = dict(check_ok=fused_ok, check_rel_max_err=fused_errs, bwd_ms_off=bwd_ms["bwd_kv"],
                     bwd_ms_on=bwd_ms["bwd_fused"], fwdbwd_ms_off=combined["default"]["ms"],
                     fwdbwd_ms_on=combined.get("fused", {}).get("ms"))

    def cmp(off, on):
        f = lambda ms: f"{ms:.3f}" if ms else "n/a"  # noqa: E731
        return f"{f(off)} vs {f(on)} ms" + (f" (fused {off / on:.2f}x)" if off and on else "")
    print("bwd_fused off vs on (default blocks): whole bwd " + cmp(fused_cmp["bwd_ms_off"], fused_cmp["bwd_ms_on"])
          + ", fwd+bwd " + cmp(fused_cmp["fwdbwd_ms_off"], fused_cmp["fwdbwd_ms_on"]))
    print(f"sweep took {time.perf_counter() - t_start:.1f} s")
    return dict(shape=dict(B=B, H=H, T=T), results=results, best={p: list(c) for p, (c, _) in best.items()},
                combined=combined, bwd_fused=fused_cmp, seconds=time.perf_counter() - t_start)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU (this script is not run in CI)", file=sys.stderr)
        return 2
    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    causal = not args.non_causal
    dn, dr, dv = args.nope_dim, args.rope_dim, args.v_dim
    dqk = dn + dr
    dev_name = torch.cuda.get_device_name()
    meta = dict(date=_dt.datetime.now().isoformat(timespec="seconds"), device=dev_name,
                torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                T=args.seq, dqk=dqk, nope=dn, rope=dr, dv=dv, dtype=args.dtype, causal=causal,
                flops_formula="fwd 2*B*H*T*T*(Dqk+Dv)/(2 if causal); fwd+bwd 3.5x fwd",
                timer="triton.testing.do_bench median")
    print(f"{dev_name}  torch {torch.__version__}  triton {triton.__version__}  T={args.seq} Dqk={dqk} "
          f"({dn}+{dr}) Dv={dv} {args.dtype} causal={causal}")
    from kernels.mla_attention import get_config
    meta["config"] = dataclasses.asdict(get_config(dqk, dv, "cuda", dtype, split=(dn, dr)))

    checks = check_correctness(args, dtype, causal)

    modes = [False] if args.no_bwd else [False, True]
    variants = [(impl, False) for impl in args.impls]
    if not args.no_compile:
        variants += [(impl, True) for impl in args.impls]
    rows = []
    for B in ([] if args.sweep and args.sweep_only else args.batch):
        for H in args.heads:
            x, do = make_inputs(B, H, args.seq, dn, dr, dv, dtype, True)
            for impl, comp in variants:
                name = impl + (" +compile" if comp else "")
                if impl == "sdpa_math":
                    gib = B * H * args.seq * args.seq * 4 / 2**30
                    if gib > args.math_max_gib:
                        rows.append(dict(impl=name, B=B, H=H, mode="all", ms=None,
                                         error=f"skipped: scores {gib:.0f} GiB > --math-max-gib"))
                        continue
                try:
                    fn = (triton_fn(impl, causal, dn, comp) if impl.startswith("triton")
                          else sdpa_fn(impl.split("_", 1)[1], causal, comp))
                except Exception as e:
                    rows.append(dict(impl=name, B=B, H=H, mode="all", ms=None, error=repr(e)[:200]))
                    continue
                for bwd in modes:
                    mode = "fwd+bwd" if bwd else "fwd"
                    try:
                        ms, peak = bench(fn, x, do, bwd, impl, args.warmup, args.rep)
                        tf = flops(B, H, args.seq, dqk, dv, causal, bwd) / ms / 1e9
                        rows.append(dict(impl=name, B=B, H=H, mode=mode, ms=ms, tflops=tf, peak_gib=peak))
                    except Exception as e:
                        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
                        rows.append(dict(impl=name, B=B, H=H, mode=mode, ms=None, error=msg))
                        if os.environ.get("BENCH_DEBUG"):
                            traceback.print_exc()
                    for t in x.values():
                        t.grad = None
                    torch.cuda.empty_cache()
                print(f"  B={B} H={H:<4} {name:<28} " + "  ".join(
                    f"{rr['mode']}: " + (f"{rr['ms']:.3f} ms {rr['tflops']:.0f} TF/s" if rr["ms"] else rr["error"][:60])
                    for rr in rows if rr["impl"] == name and rr["B"] == B and rr["H"] == H))
            del x, do
            torch.cuda.empty_cache()

    # table
    print(f"\n{'impl':<30}{'B':>3}{'H':>5}  {'mode':<8}{'ms':>10}{'TFLOP/s':>10}{'peak GiB':>10}")
    for r in rows:
        if r["ms"] is None:
            print(f"{r['impl']:<30}{r['B']:>3}{r['H']:>5}  {r['mode']:<8}  {r['error'][:70]}")
        else:
            print(f"{r['impl']:<30}{r['B']:>3}{r['H']:>5}  {r['mode']:<8}{r['ms']:>10.3f}{r['tflops']:>10.1f}"
                  f"{r['peak_gib']:>10.2f}")

    out = dict(meta=meta, checks=checks, results=rows)
    if args.sweep:
        out["sweep"] = sweep(args, dtype, causal)
    os.makedirs(args.out_dir, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in dev_name).strip("_")
    path = os.path.join(args.out_dir, f"attention_{slug}_{_dt.datetime.now():%Y%m%d_%H%M%S}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {path}")
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
