"""FP8 GEMM benchmark (GPU only): block-scaled Triton GEMM vs torch._scaled_mm (rowwise, tensorwise) vs bf16.

    python benchmarks/bench_fp8.py --out results/            # all shapes
    python benchmarks/bench_fp8.py --shapes 4096x7168x2048    # M x N x K (C[M, N] = A[M, K] B[N, K]^T)

For every shape, each method is first checked against an fp32 reference (the dequantised operands for the FP8
methods), then timed with triton.testing.do_bench (median). TFLOP/s = 2 M N K / time. Methods:

  bf16            torch.matmul in bf16 (the ceiling to beat)
  fp8_tensorwise  torch._scaled_mm, one scale per tensor, fast accumulation
  fp8_rowwise     torch._scaled_mm, per-row / per-column scales
  fp8_blockwise   kernels.fp8_gemm.fp8_gemm_blockwise (1x128 x 128x128, DeepSeek-V3 §3.3), GEMM only
  fp8_block_q     the same plus quantising both operands (quant_1x128 + quant_128x128): the forward's cost
  fp8_wgrad       kernels.fp8_gemm.fp8_gemm_1x128_1x128 (both 1x128 per row), fp32 out
  fp8_block_cublas / fp8_block_q_cublas / fp8_wgrad_cublas
                  the same GEMMs on cuBLAS's block-scaled torch._scaled_mm (moetrain.precision.fp8_cublas;
                  skipped, with the reason printed, where its one-time check did not pass); the 1x128 scales in
                  cuBLAS's layout as the recipe's quantisers write them, fp8_block_cublas includes padding the
                  weight scales (one small launch)
  fp8_block_cublas_raw  the cuBLAS call alone (weight scales laid out beforehand)
  grouped_*       ("G" shapes: E experts over M rows, odd per-expert counts) bf16 torch._grouped_mm vs
                  kernels.fp8_gemm.fp8_gemm_grouped (no host sync), its wgrad, and the blockwise GEMM looped
                  over experts

Prints a table and writes <out>/bench_fp8_<date>.json (date, device, versions, rows). Not part of CI.

    python benchmarks/bench_fp8.py --sweep                     # + per-config table of the blockwise GEMM
    python benchmarks/bench_fp8.py --sweep-grouped             # + per-config table of the grouped GEMM

--sweep-quant: the FP8 quantisation kernels (1x128, 1x128 with the transposed copy, 128x128) on the first shape's
x [M, K] and W [N, K] (bf16 in), for each candidate of kernels.fp8_quant.CFG, each checked bit-exact against the
default config's output first; GB/s = bytes read + written / time, next to a bf16 copy of x in the same run.

--sweep: after the normal table, the forward blockwise GEMM of the FIRST shape (a "G" shape's M x N x K as one
dense GEMM) is run with every candidate tile config explicitly (``config=``: the autotune list
kernels.fp8_gemm._gpu_configs() plus a few extra candidates, including the SPLIT_N / PIPE kernel variants:
"split" / "pipe" in the config column), each checked against the dequantised reference
first, and printed sorted by time (config, ms, TFLOP/s). --sweep-grouped does the same for fp8_gemm_grouped on
the first "G" shape (kernels.fp8_gemm._grouped_gpu_configs() plus extras). Configs that fail to compile or
run are listed as failed. The sweep rows go to the JSON too ("sweep").
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys

DEFAULT_SHAPES = ["4096x7168x16384", "4096x7168x2048", "4096x2048x7168", "G8:16333x2048x7168"]


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES,
                   help="MxNxK, or GE:MxNxK for E grouped experts over M rows (default: %(default)s)")
    p.add_argument("--out", default="results", help="directory for the JSON result (default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=None, help="subset of methods to run (default: all)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition ms")
    p.add_argument("--sweep", action="store_true",
                   help="also time the blockwise GEMM of the first shape for every candidate config")
    p.add_argument("--sweep-grouped", action="store_true",
                   help="also time the grouped GEMM of the first G shape for every candidate config")
    p.add_argument("--sweep-quant", action="store_true",
                   help="also time the quantisation kernels (GB/s vs a copy) for every launch config in "
                        "kernels.fp8_quant.CFG's candidates, on the first shape's x [M, K] and W [N, K], and the "
                        "grouped with-transpose kernel (group_major) on --quant-grouped")
    p.add_argument("--quant-grouped", default="G16:131072x7168",
                   help="GE:MxK of --sweep-quant's grouped kernel: M rows over E experts (random routing counts)")
    return p.parse_args(argv)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main(argv=None):
    args = _parse_args(argv)
    import torch
    import triton
    from triton.testing import do_bench

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kernels.fp8_gemm import (fp8_gemm_1x128_1x128, fp8_gemm_blockwise, fp8_gemm_blockwise_ref, fp8_gemm_grouped,
                                  fp8_gemm_grouped_wgrad)
    from kernels.fp8_quant import (grouped_tiles, quant_128x128, quant_1x128, quant_1x128_with_transpose,
                                   quant_1x128_with_transpose_grouped)

    if not torch.cuda.is_available():
        sys.exit("bench_fp8: needs a CUDA GPU")
    dev = torch.device("cuda")
    from moetrain.precision import fp8_cublas
    cublas_ok, cublas_detail = fp8_cublas.status(dev)
    print(f"cuBLAS block-scaled GEMMs: {'usable' if cublas_ok else 'NOT usable'}: {cublas_detail}", flush=True)
    torch.manual_seed(0)
    e4m3 = torch.float8_e4m3fn
    rows = []

    def bench(fn):
        return do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")

    def want(name):
        return args.methods is None or name in args.methods

    def record(shape, method, ms, flops, err, note=""):
        tf = flops / (ms * 1e-3) / 1e12
        rows.append(dict(shape=shape, method=method, ms=round(ms, 4), tflops=round(tf, 1),
                         rel_err=float(f"{err:.3g}"), note=note))
        print(f"{shape:>22s} {method:>16s} {ms:9.3f} ms {tf:8.1f} TFLOP/s  rel_err {err:.2e} {note}", flush=True)

    print(f"{'shape':>22s} {'method':>16s} {'time':>12s} {'TFLOP/s':>16s}")
    for spec in args.shapes:
        groups = None
        if spec.startswith("G"):
            g, spec = spec[1:].split(":")
            groups = int(g)
        M, N, K = (int(v) for v in spec.lower().split("x"))
        flops = 2.0 * M * N * K
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        ref = x.float() @ w.float().t()
        if groups is None:
            if want("bf16"):
                y = x @ w.t()
                record(spec, "bf16", bench(lambda: x @ w.t()), flops, _rel(y, ref))
            if want("fp8_tensorwise"):
                sx = (x.abs().amax().float() / 448).reshape(())
                sw = (w.abs().amax().float() / 448).reshape(())
                xq = (x.float() / sx).clamp(-448, 448).to(e4m3)
                wq = (w.float() / sw).clamp(-448, 448).to(e4m3)
                f = lambda: torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16,  # noqa
                                             use_fast_accum=True)
                record(spec, "fp8_tensorwise", bench(f), flops, _rel(f(), ref))
            if want("fp8_rowwise"):
                sx = x.abs().amax(1, keepdim=True).float().clamp_min(1e-12) / 448
                sw = w.abs().amax(1, keepdim=True).float().clamp_min(1e-12) / 448
                xq = (x.float() / sx).clamp(-448, 448).to(e4m3)
                wq = (w.float() / sw).clamp(-448, 448).to(e4m3)
                f = lambda: torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw.t().contiguous(),  # noqa
                                             out_dtype=torch.bfloat16, use_fast_accum=True)
                record(spec, "fp8_rowwise", bench(f), flops, _rel(f(), ref))
            if want("fp8_blockwise") or want("fp8_block_q"):
                xq, xs = quant_1x128(x)
                wq, ws = quant_128x128(w)
                y = fp8_gemm_blockwise(xq, xs, wq, ws)
                err_ref = _rel(y, fp8_gemm_blockwise_ref(xq, xs, wq, ws, out_dtype=torch.float32))
                assert err_ref < 1e-2, f"blockwise GEMM wrong vs its reference: {err_ref}"
                if want("fp8_blockwise"):
                    record(spec, "fp8_blockwise", bench(lambda: fp8_gemm_blockwise(xq, xs, wq, ws)), flops,
                           _rel(y, ref), f"vs_dequant_ref {err_ref:.1e}")
                if want("fp8_block_q"):
                    def fq():
                        a, sa = quant_1x128(x)
                        b, sb = quant_128x128(w)
                        return fp8_gemm_blockwise(a, sa, b, sb)
                    record(spec, "fp8_block_q", bench(fq), flops, _rel(fq(), ref), "incl. quantisation")
            if want("fp8_wgrad") or want("fp8_wgrad_cublas"):
                # the wgrad form with the same FLOPs: C[M, N] = A[M, K] B[N, K]^T, both 1x128 per row
                _, _, at, ats = quant_1x128_with_transpose(x.t().contiguous())
                _, _, bt, bts = quant_1x128_with_transpose(w.t().contiguous())
                if want("fp8_wgrad"):
                    f = lambda: fp8_gemm_1x128_1x128(at, ats, bt, bts, out_dtype=torch.bfloat16)  # noqa
                    record(spec, "fp8_wgrad", bench(f), flops, _rel(f(), ref))
                if want("fp8_wgrad_cublas") and cublas_ok:
                    # scales in cuBLAS's layout as the recipe's quantisers write them (col_major_scales)
                    ats, bts = ats.t().contiguous().t(), bts.t().contiguous().t()
                    f = lambda: fp8_cublas.fp8_gemm_1x128_1x128(at, ats, bt, bts, out_dtype=torch.bfloat16)  # noqa
                    record(spec, "fp8_wgrad_cublas", bench(f), flops, _rel(f(), ref), "cuBLAS 1x128 x 1x128")
            if (want("fp8_block_cublas") or want("fp8_block_q_cublas") or want("fp8_block_cublas_raw")) \
                    and cublas_ok:
                # cuBLAS's block-scaled GEMM (torch._scaled_mm, 1x128 x 128x128), checked like the Triton one; the
                # activation scales come in cuBLAS's layout from the quantiser, as in the blockwise recipe
                xq, xs = quant_1x128(x, col_major_scales=True)
                wq, ws = quant_128x128(w)
                y = fp8_cublas.fp8_gemm_blockwise(xq, xs, wq, ws)
                err_ref = _rel(y, fp8_gemm_blockwise_ref(xq, xs, wq, ws, out_dtype=torch.float32))
                assert err_ref < 1e-2, f"cuBLAS blockwise GEMM wrong vs the dequantised reference: {err_ref}"
                if want("fp8_block_cublas"):
                    record(spec, "fp8_block_cublas", bench(lambda: fp8_cublas.fp8_gemm_blockwise(xq, xs, wq, ws)),
                           flops, _rel(y, ref), f"vs_dequant_ref {err_ref:.1e}; + weight-scale pad")
                if want("fp8_block_cublas_raw"):
                    # the cuBLAS call alone, weight scales laid out beforehand: the ceiling of this path
                    form = fp8_cublas._checked(x.device)[0]
                    sb = fp8_cublas.scale_b_block_layout(ws, form[2])
                    f = lambda: form[1](xq, wq.t(), xs, sb, torch.bfloat16, "128x128")  # noqa
                    record(spec, "fp8_block_cublas_raw", bench(f), flops, _rel(f(), ref), "cuBLAS call only")
                if want("fp8_block_q_cublas"):
                    def fqc():
                        a, sa = quant_1x128(x, col_major_scales=True)
                        b, sb = quant_128x128(w)
                        return fp8_cublas.fp8_gemm_blockwise(a, sa, b, sb)
                    record(spec, "fp8_block_q_cublas", bench(fqc), flops, _rel(fqc(), ref), "incl. quantisation")
        else:
            g = torch.Generator().manual_seed(1)
            cuts = torch.sort(torch.randint(0, M + 1, (groups - 1,), generator=g)).values.tolist()
            counts = [b - a for a, b in zip([0] + cuts, cuts + [M])]
            we = torch.randn(groups, N, K, device=dev, dtype=torch.bfloat16) * 0.02
            ref = torch.cat([x[a:b].float() @ we[e].float().t()
                             for e, (a, b) in enumerate(zip([0] + cuts, cuts + [M]))])
            offs = torch.tensor(cuts + [M], device=dev, dtype=torch.int32)
            name = f"G{groups}:{spec}"
            if want("grouped_bf16") and hasattr(torch, "_grouped_mm"):
                f = lambda: torch._grouped_mm(x, we.transpose(-2, -1), offs=offs)  # noqa
                record(name, "grouped_bf16", bench(f), flops, _rel(f(), ref), f"counts={counts}")
            if want("grouped_fp8_block"):
                tiles = grouped_tiles(torch.tensor(counts, device=dev), M)
                xq, xs = quant_1x128(x)
                wq, ws = quant_128x128(we)
                f = lambda: fp8_gemm_grouped(xq, xs, wq, ws, tiles)  # noqa
                record(name, "grouped_fp8_block", bench(f), flops, _rel(f(), ref), "grouped kernel, no sync")
            if want("grouped_fp8_wgrad"):
                # dW[e] = G_e^T X_e with the same FLOPs: G [M, N], X [M, K] -> [E, N, K]
                gg = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
                tiles = grouped_tiles(torch.tensor(counts, device=dev), M)
                _, _, gtq, gts = quant_1x128_with_transpose_grouped(gg, tiles)
                _, _, xtq, xts = quant_1x128_with_transpose_grouped(x, tiles)
                f = lambda: fp8_gemm_grouped_wgrad(gtq, gts, xtq, xts, tiles)  # noqa
                wref = torch.stack([ge.float().t() @ xe.float() for ge, xe in zip(torch.split(gg, counts),
                                                                                 torch.split(x, counts))])
                record(name, "grouped_fp8_wgrad", bench(f), flops, _rel(f(), wref), "grouped kernel")
            if want("grouped_fp8_rowwise") and hasattr(torch, "_scaled_grouped_mm"):
                # the tensorwise/rowwise recipes' grouped path (moetrain.precision.fp8_grouped): rowwise quantisation
                # of x and W, 16-row padding per expert and one torch._scaled_grouped_mm, no host sync
                from moetrain.precision.fp8_grouped import group_plan, scaled_grouped_linear
                plan = group_plan(torch.tensor(counts, device=dev), M)
                f = lambda: scaled_grouped_linear(x, we, plan, "rowwise")  # noqa
                try:
                    record(name, "grouped_fp8_rowwise", bench(f), flops, _rel(f(), ref),
                           "torch._scaled_grouped_mm incl. quantisation + padding")
                except Exception as e:  # noqa: BLE001
                    print(f"{name:>22s} grouped_fp8_rowwise failed: {type(e).__name__}: {str(e)[:200]}")
            if want("grouped_fp8_loop"):
                wq_ws = [quant_128x128(we[e]) for e in range(groups)]
                xs_ = [quant_1x128(xe) for xe in torch.split(x, counts)]

                def f():
                    return torch.cat([fp8_gemm_blockwise(a, sa, b, sb)
                                      for (a, sa), (b, sb) in zip(xs_, wq_ws)])
                record(name, "grouped_fp8_loop", bench(f), flops, _rel(f(), ref), "looped over experts")

    sweep_rows = []
    if args.sweep:
        sweep_rows += _sweep_dense(args, bench, args.shapes[0])
    if args.sweep_grouped:
        gspecs = [s for s in args.shapes if s.startswith("G")]
        if gspecs:
            sweep_rows += _sweep_grouped(args, bench, gspecs[0])
        else:
            print("--sweep-grouped: no G shape given, skipped")
    if args.sweep_quant:
        sweep_rows += _sweep_quant(bench, args.shapes[0], args.quant_grouped)

    os.makedirs(args.out, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"bench_fp8_{stamp}.json")
    info = dict(date=_dt.datetime.now().isoformat(timespec="seconds"), device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, rows=rows,
                cublas_blockwise=dict(usable=cublas_ok, detail=cublas_detail))
    if sweep_rows:
        info["sweep"] = sweep_rows
    with open(path, "w") as fh:
        json.dump(info, fh, indent=1)
    print(f"wrote {path}")
    return info


# extra explicit candidates beyond the autotune lists (bigger warp counts, shallower pipelines), sweep only
# (BLOCK_M, BLOCK_N, num_warps, num_stages, variant): variant "" default, "S" SPLIT_N, "P" PIPE, "SP" both
_EXTRA_DENSE = [(128, 256, 16, 3, ""), (128, 256, 16, 4, ""), (256, 128, 16, 3, ""), (128, 256, 8, 2, ""),
                (256, 128, 8, 2, ""), (256, 128, 8, 4, "S"), (128, 256, 8, 2, "S"), (128, 128, 8, 3, "S"),
                (128, 128, 8, 3, "P"), (128, 128, 8, 5, "P"), (64, 128, 4, 4, "P"), (128, 64, 4, 4, "P"),
                (128, 128, 8, 3, "SP"), (128, 128, 8, 4, "SP")]
_EXTRA_GROUPED = [(128, 256, 16, 3, ""), (128, 256, 8, 2, ""), (128, 256, 8, 2, "S"), (128, 128, 8, 3, "P"),
                  (128, 128, 8, 4, "SP")]


def _cfg_dicts(config_list_fn):
    """The autotune list of ``config_list_fn`` with the SPLIT_N / PIPE variants included (the sweep checks each
    config against the reference, so the variants kept out of the default autotuning are measured here)."""
    old = os.environ.get("MOETRAIN_FP8_VARIANTS")
    os.environ["MOETRAIN_FP8_VARIANTS"] = "1"
    try:
        configs = config_list_fn()
    finally:
        if old is None:
            del os.environ["MOETRAIN_FP8_VARIANTS"]
        else:
            os.environ["MOETRAIN_FP8_VARIANTS"] = old
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]


def _cfg_str(cfg):
    s = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}"
    s += f" g{cfg['GROUP_M']}" if "GROUP_M" in cfg else ""
    return s + (" split" if cfg.get("SPLIT_N") else "") + (" pipe" if cfg.get("PIPE") else "")


def _print_sweep(title, res):
    print(f"\nsweep: {title} (sorted by time)")
    print(f"{'config':>24s} {'ms':>9s} {'TFLOP/s':>9s}  note")
    for r in sorted(res, key=lambda r: (r["ms"] is None, r["ms"] or 0.0)):
        if r["ms"] is None:
            print(f"{r['config']:>24s} {'-':>9s} {'-':>9s}  {r['note']}", flush=True)
        else:
            print(f"{r['config']:>24s} {r['ms']:9.3f} {r['tflops']:9.1f}  {r['note']}", flush=True)


def _time_config(bench, fn, ref, flops, cfg, title):
    """Check ``fn(cfg)`` against ``ref`` (rel < 1e-2), then time it; failures become a row with ms None."""
    import torch
    row = dict(sweep=title, config=_cfg_str(cfg), cfg=cfg, ms=None, tflops=None, note="")
    try:
        y = fn(cfg)
        if y.is_cuda:
            torch.cuda.synchronize()
        err = _rel(y, ref)
        if not err < 1e-2:
            row["note"] = f"WRONG vs reference: rel_err {err:.2e}"
            return row
        ms = bench(lambda: fn(cfg))
        row.update(ms=round(ms, 4), tflops=round(flops / (ms * 1e-3) / 1e12, 1), note=f"rel_err {err:.1e}")
    except Exception as e:  # noqa: BLE001 (a config that does not compile/run is reported, not fatal)
        row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    return row



def _t_schedules(suffix):
    """Launch configs of a with-transpose quantiser (CFG keys ending in ``_t`` / ``_tg``): warps x pass width (ch),
    and the grid order reversed."""
    out = [dict(warps=wp, ch=ch) for wp, ch in ((2, 32), (2, 64), (4, 32), (4, 64), (4, 128), (8, 64), (8, 128),
                                                (16, 128))]
    out += [dict(warps=8, ch=128, k_fastest=0), dict(warps=4, ch=128, k_fastest=0)]
    return [{f"{k}_{suffix}": v for k, v in c.items()} for c in out]


def _sweep_quant(bench, spec, grouped_spec=""):
    """Time each fp8_quant kernel per launch config; the outputs must equal the default config's bit for bit."""
    import itertools

    import torch
    import kernels.fp8_quant as FQ

    M, N, K = (int(v) for v in spec.split(":")[-1].lower().split("x"))
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    copy_ms = bench(lambda: x.clone())
    copy_gbs = 2 * x.numel() * 2 / copy_ms / 1e6
    print(f"\nsweep: fp8 quantisation, x [{M}, {K}], W [{N}, {K}] bf16; bf16 copy of x {copy_gbs:.0f} GB/s")
    print(f"{'kernel':>22s} {'config':>32s} {'us':>9s} {'GB/s':>7s} {'vs copy':>8s}")
    sc = lambda n: 4 * n  # noqa: E731  fp32 scales
    jobs = {
        "quant_1x128": (lambda: FQ.quant_1x128(x), M * K * 3 + sc(M * K // 128),
                        [dict(block_m=bm, warps_1x128=wp) for bm, wp in itertools.product((8, 16, 32, 64), (2, 4, 8))]),
        "quant_1x128_t": (lambda: FQ.quant_1x128_with_transpose(x), M * K * 4 + 2 * sc(M * K // 128),
                          _t_schedules("t")),
        "quant_128x128": (lambda: FQ.quant_128x128(w), N * K * 3, [dict(warps_128=wp) for wp in (4, 8, 16)]),
    }
    if grouped_spec:
        E, (Mg, Kg) = int(grouped_spec.split(":")[0][1:]), (int(v) for v in grouped_spec.split(":")[1].split("x"))
        xg = torch.randn(Mg, Kg, device="cuda", dtype=torch.bfloat16)
        counts = torch.bincount(torch.randint(0, E, (Mg,), device="cuda"), minlength=E)
        tiles = FQ.grouped_tiles(counts, Mg)
        print(f"grouped: x [{Mg}, {Kg}] over {E} experts, {tiles.n_tiles} row tiles (group_major)")
        jobs["quant_1x128_t_grouped"] = (
            lambda: FQ.quant_1x128_with_transpose_grouped(xg, tiles, group_major=True),
            Mg * Kg * 4 + 2 * sc(Mg * Kg // 128),
            _t_schedules("tg"))
    rows = []
    saved = dict(FQ.CFG)
    for name, (fn, nbytes, cands) in jobs.items():
        ref = [t.clone() for t in fn()]
        res = []
        for cfg in cands:
            FQ.CFG.update(saved)
            FQ.CFG.update(cfg)
            try:
                out = fn()
                ok = all(torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                                     b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
                         for a, b in zip(out, ref))
                if not ok:
                    res.append((cfg, None, "MISMATCH vs the default config"))
                    continue
                ms = bench(fn)
                res.append((cfg, ms, ""))
            except Exception as e:  # noqa: BLE001
                res.append((cfg, None, f"failed: {type(e).__name__}: {str(e)[:80]}"))
        FQ.CFG.clear()
        FQ.CFG.update(saved)
        timed = [r for r in res if r[1]]
        if timed:
            best = min(timed, key=lambda r: r[1])[0]
            print(f"BEST {name}: " + ",".join(f"{k}={v}" for k, v in best.items()), flush=True)
        for cfg, ms, note in sorted(res, key=lambda r: (r[1] is None, r[1] or 0)):
            gbs = nbytes / ms / 1e6 if ms else None
            tag = " ".join(f"{k}={v}" for k, v in cfg.items())
            print(f"{name:>22s} {tag:>32s} " + (f"{ms * 1e3:9.1f} {gbs:7.0f} {gbs / copy_gbs:7.0%}" if ms else note),
                  flush=True)
            rows.append(dict(sweep=name, config=cfg, ms=ms, gbps=gbs, copy_gbps=copy_gbs, note=note))
    return rows


def _sweep_dense(args, bench, spec, device="cuda"):
    import torch
    from kernels import fp8_gemm as fg
    from kernels.fp8_quant import quant_128x128, quant_1x128
    if spec.startswith("G"):
        spec = spec.split(":", 1)[1]
    M, N, K = (int(v) for v in spec.lower().split("x"))
    flops = 2.0 * M * N * K
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02
    xq, xs = quant_1x128(x)
    wq, ws = quant_128x128(w)
    ref = fg.fp8_gemm_blockwise_ref(xq, xs, wq, ws, out_dtype=torch.float32)
    cands = _cfg_dicts(fg._gpu_configs)
    cands += [dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, num_warps=w, num_stages=s, **fg._variant(v))
              for bm, bn, w, s, v in _EXTRA_DENSE]
    title = f"fp8_blockwise {spec}"
    res = [_time_config(bench, lambda c: fg.fp8_gemm_blockwise(xq, xs, wq, ws, config=c), ref, flops, c, title)
           for c in cands]
    # what the autotuner picks for this shape (the normal path)
    fg.fp8_gemm_blockwise(xq, xs, wq, ws)
    best = getattr(fg._fp8_gemm_kernel_tuned, "best_config", None)
    _print_sweep(title + (f"; autotune picked {best}" if best is not None else ""), res)
    return res


def _sweep_grouped(args, bench, spec, device="cuda"):
    import torch
    from kernels import fp8_gemm as fg
    from kernels.fp8_quant import grouped_tiles, quant_128x128, quant_1x128
    g, spec = spec[1:].split(":")
    E = int(g)
    M, N, K = (int(v) for v in spec.lower().split("x"))
    flops = 2.0 * M * N * K
    gen = torch.Generator().manual_seed(1)
    cuts = torch.sort(torch.randint(0, M + 1, (E - 1,), generator=gen)).values.tolist()
    counts = [b - a for a, b in zip([0] + cuts, cuts + [M])]
    tiles = grouped_tiles(torch.tensor(counts, device=device), M)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    we = torch.randn(E, N, K, device=device, dtype=torch.bfloat16) * 0.02
    xq, xs = quant_1x128(x)
    wq, ws = quant_128x128(we)
    ref = fg.fp8_gemm_grouped_ref(xq, xs, wq, ws, tiles, out_dtype=torch.float32)
    cands = _cfg_dicts(fg._grouped_gpu_configs)
    cands += [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, **fg._variant(v))
              for bm, bn, w, s, v in _EXTRA_GROUPED]
    title = f"grouped_fp8_block G{E}:{spec}"
    res = [_time_config(bench, lambda c: fg.fp8_gemm_grouped(xq, xs, wq, ws, tiles, config=c), ref, flops, c, title)
           for c in cands]
    fg.fp8_gemm_grouped(xq, xs, wq, ws, tiles)
    best = getattr(fg._fp8_gemm_grouped_tuned, "best_config", None)
    _print_sweep(title + (f"; autotune picked {best}" if best is not None else ""), res)
    return res


if __name__ == "__main__":
    main()
