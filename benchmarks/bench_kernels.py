"""Benchmark the Triton ops of kernels/ against PyTorch eager and torch.compile (GPU only).

For each op, at DeepSeek-V3-like sizes: a correctness check against the op's fp32 reference first
(forward and every gradient), then the median time (``triton.testing.do_bench``) of the forward and
of forward+backward for three implementations:

    triton    the kernel in kernels/<op>.py
    eager     a plain PyTorch implementation, as a model would write it (native dtype where that is
              what the model does; see BASELINES below)
    compile   the same PyTorch implementation under torch.compile

and the achieved bandwidth: the minimum bytes the op must move (each input read once, each output
written once) over the measured time, against the HBM copy bandwidth measured at the start
(device-to-device copy, bytes read + written). Prints a table and writes ``bench_kernels.json``
(and the table as ``bench_kernels.txt``) into ``--out``.

    python benchmarks/bench_kernels.py --out results [--ops rmsnorm,router] [--quick] [--sweep]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import sys
import traceback

OPS = ("rmsnorm", "add_rmsnorm", "rope", "swiglu", "swiglu_packed", "router", "permute", "unpermute")

BASELINES = {
    "rmsnorm": "F.rms_norm(x, (D,), w.to(x.dtype), eps)",
    "add_rmsnorm": "h = x + r; F.rms_norm(h, (D,), w.to(h.dtype), eps)",
    "rope": "rope_ref: fp32 real-arithmetic rotation of interleaved pairs (as V3, without complex)",
    "swiglu": "F.silu(a) * b in bf16",
    "swiglu_packed": "a, b = x.chunk(2, -1); F.silu(a) * b in bf16",
    "router": "DeepSeek-V3 Gate.forward after the linear (softmax/sigmoid, bias, group top-k, torch.topk)",
    "permute": "argsort(ids.flatten(), stable) + x[order // K] + scatter_add counts",
    "unpermute": "inverse scatter + index_select + bmm(w[:, None], [N, K, D]) (bf16, fp32 accumulate)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark kernels/ (Triton) vs PyTorch eager and torch.compile on a CUDA GPU. "
                    "Checks correctness first, then times forward and forward+backward.")
    p.add_argument("--out", default="results",
                   help="output directory for bench_kernels.json / .txt (default: %(default)s)")
    p.add_argument("--ops", default=",".join(OPS),
                   help=f"comma-separated subset of: {', '.join(OPS)} (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="quarter-size problems and shorter timing (a smoke run)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup in ms (default: %(default)s)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms (default: %(default)s)")
    p.add_argument("--sweep", action="store_true",
                   help="instead of the comparison, time the launch tunables (each module's CFG dict) "
                        "of the kernels alone (those of --ops) and write bench_kernels_sweep.json")
    p.add_argument("--also-table", action="store_true", help="with --sweep: run the comparison table afterwards")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# --sweep: launch tunables of each kernel, timed on the launchers alone
# ----------------------------------------------------------------------------------------------
def _sweep(torch, do_bench, out_dir, quick, ops=OPS):
    import kernels._utils as kutils
    import kernels.permute as PM
    import kernels.rmsnorm as RN
    import kernels.rope as RP
    import kernels.router as RT
    import kernels.swiglu as SW

    dev, bf, q = "cuda", torch.bfloat16, 4 if quick else 1
    res = []

    def wanted(name):
        op = {"add": "add_rmsnorm", "rmap": "permute", "routing": "permute"}.get(name.split("_")[0].split("/")[0],
                                                                                name.split("_")[0])
        return op in ops or (op == "permute" and "unpermute" in ops)

    def outputs(out):
        """The tensors of a launcher's result (a tensor or a tuple/list), cloned: launchers may reuse buffers."""
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [t.clone() for t in out if isinstance(t, torch.Tensor)]

    def bench(name, mod, cfg, fn, nbytes, tol=None):
        """Time fn under mod.CFG updated with cfg. With tol = (atol, rtol), or one such pair per output, fn's tensor
        outputs (computed with kernel outputs poisoned: NaN where unwritten) are first compared with those under
        the module's default CFG; a mismatch prints WRONG and is not timed."""
        if not wanted(name):
            return
        saved, poison = dict(mod.CFG), kutils.POISON_OUTPUTS
        try:
            want = outputs(fn()) if tol is not None else None
            mod.CFG.update(cfg)
            kutils.POISON_OUTPUTS = tol is not None
            got = outputs(fn())
            kutils.POISON_OUTPUTS = poison
            if want is not None:
                tols = tol if isinstance(tol[0], (tuple, list)) else [tol] * len(want)
                try:
                    assert len(got) == len(want) == len(tols), f"{len(got)} outputs, default config {len(want)}"
                    for i, (g, w_, (at, rt)) in enumerate(zip(got, want, tols)):
                        torch.testing.assert_close(g.float(), w_.float(), atol=at, rtol=rt,
                                                   msg=lambda m, i=i: f"output {i}: {m}")
                except AssertionError as e:
                    print(f"{name:<16} {json.dumps(cfg):<48} WRONG vs the default config: "
                          f"{' '.join(str(e).split())[:160]}", flush=True)
                    return
            ms = do_bench(fn, warmup=10, rep=40, return_mode="median")
            res.append({"kernel": name, "cfg": dict(cfg), "ms": ms, "GBps": nbytes / ms / 1e6})
            print(f"{name:<16} {json.dumps(cfg):<48} {ms * 1e3:9.1f} us {nbytes / ms / 1e6:7.0f} GB/s",
                  flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{name:<16} {json.dumps(cfg):<48} error {e!r:.120}", flush=True)
        finally:
            kutils.POISON_OUTPUTS = poison
            mod.CFG.clear()
            mod.CFG.update(saved)

    N, D = 16384 // q, 7168
    x = torch.randn(N, D, device=dev, dtype=bf)
    r, dy = torch.randn_like(x), torch.randn_like(x)
    w = torch.randn(D, device=dev)
    _, _, rstd = RN.rmsnorm_fwd(x, w, 1e-6)
    for mw in (8, 16, 32):
        bench("rmsnorm_fwd", RN, {"fwd_max_warps": mw}, lambda: RN.rmsnorm_fwd(x, w, 1e-6), 2 * N * D * 2)
    # backward grid, each config checked first against the default config's dx (bf16: ~1 ulp) and dw (fp32, sum of
    # 16K rows: summation order only; a lost row tile would show):
    #   whole rows, plain loop:           programs/SM x max warps x rows                    12
    #   whole rows, pipelined row loop:   stages x programs/SM x max warps x rows           16
    #   4 rows of 8192 (bwd_max_tile 32K): programs/SM x max warps (32: 1024 threads)          4
    rn_grid = [{"bwd_programs_per_sm": pps, "bwd_max_warps": mw, "bwd_rows": rows, "bwd_stages": 1}
               for pps, mw, rows in itertools.product((1, 2, 4), (8, 16), (1, 2))]
    rn_grid += [{"bwd_programs_per_sm": pps, "bwd_max_warps": mw, "bwd_rows": rows, "bwd_stages": st}
                for st, pps, mw, rows in itertools.product((2, 3), (1, 2), (8, 16), (1, 2))]
    rn_grid += [{"bwd_programs_per_sm": pps, "bwd_max_warps": mw, "bwd_rows": 4, "bwd_max_tile": 32768}
                for pps, mw in itertools.product((1, 2), (16, 32))]
    rn_tol = [(1e-2, 1e-2), (1e-3, 1e-4)]  # dx, dw
    for cfg in rn_grid:
        bench("rmsnorm_bwd", RN, cfg, lambda: RN.rmsnorm_bwd(dy, x, w, rstd, bf), 3 * N * D * 2, tol=rn_tol)
        bench("add_rmsnorm_bwd", RN, cfg,
              lambda: RN.rmsnorm_bwd(dy, x, w, rstd, bf, dh_out2=r), 4 * N * D * 2, tol=rn_tol)
    x = r = dy = None  # free the memory (not `del`: the lambdas above close over these names)

    B, T, H, Dr = max(1, 4 // q), 4096, 128, 64
    xq = torch.randn(B, T, H, Dr, device=dev, dtype=bf)
    ang = torch.randn(T, Dr // 2, device=dev)
    c, s_ = ang.cos(), ang.sin()
    for split in (True, False):
        for be in (1024, 2048, 4096, 8192):
            bench("rope", RP, {"split": split, "block_elems": be},
                  lambda: RP.rope_launch(xq, c, s_), 2 * xq.numel() * 2)
    xq = None

    N2, F = 16384 // q, 2048
    a = torch.randn(N2, F, device=dev, dtype=bf)
    b, g = torch.randn_like(a), torch.randn_like(a)
    xp = torch.randn(N2, 2 * F, device=dev, dtype=bf)
    da, db, dxp = torch.empty_like(a), torch.empty_like(a), torch.empty_like(xp)
    for blk, wp in ((512, 4), (1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16)):
        cfg = {"block": blk, "warps": wp}
        bench("swiglu_fwd", SW, cfg, lambda: SW.swiglu_fwd(a, b), 3 * N2 * F * 2)
        bench("swiglu_bwd", SW, cfg, lambda: SW.swiglu_bwd(g, a, b, da, db), 5 * N2 * F * 2)
        bench("swiglu_pk_fwd", SW, cfg, lambda: SW.swiglu_fwd(xp[:, :F], xp[:, F:]), 3 * N2 * F * 2)
        bench("swiglu_pk_bwd", SW, cfg,
              lambda: SW.swiglu_bwd(g, xp[:, :F], xp[:, F:], dxp[:, :F], dxp[:, F:]), 5 * N2 * F * 2)
    a = b = g = xp = da = db = dxp = None

    N3, E = 16384 // q, 256
    lg = torch.randn(N3, E, device=dev)
    bias = 0.01 * torch.randn(E, device=dev)
    wts, ids = RT.router_fwd(lg, bias, 8, False, 8, 4, 2.5, True)
    for be in (1024, 2048, 4096, 8192):
        for wp in (1, 2, 4, 8):
            cfg = {"block_elems": be, "warps": wp}
            bench("router_fwd", RT, cfg, lambda: RT.router_fwd(lg, bias, 8, False, 8, 4, 2.5, True),
                  N3 * E * 4 + N3 * 8 * 12)
            bench("router_bwd", RT, cfg, lambda: RT.router_bwd(lg, ids, wts, False, 2.5, True),
                  2 * N3 * E * 4 + N3 * 8 * 12)

    N4, D4, E4, K4 = 16384 // q, 7168, 256, 8
    ids4 = torch.rand(N4, E4, device=dev).topk(K4, dim=-1)[1]
    xt = torch.randn(N4, D4, device=dev, dtype=bf)
    _, _, row_of = PM.routing_map(ids4, E4)
    ys = torch.randn(N4 * K4, D4, device=dev, dtype=bf)
    wk = torch.rand(N4, K4, device=dev)
    dyt = torch.randn_like(xt)
    # routing map: the Triton counting sort (its tunables) vs the torch.sort path it replaced
    # (routing_map_ref), bytes = ids read + sorted_index and row_of written (int64)
    for Nr, Kr, Er in ((N4, 6, 64), (N4, 8, 256)):
        idr = torch.rand(Nr, Er, device=dev).topk(Kr, dim=-1)[1]
        tag, nb = f"{Kr}x{Er}", 3 * Nr * Kr * 8
        t = []  # [torch.sort, counting sort with the default CFG] (None on error)
        for name, fn in ((f"rmap_torch/{tag}", lambda: PM.routing_map_ref(idr, Er)),
                         (f"routing_map/{tag}", lambda: PM.routing_map(idr, Er))):
            n0 = len(res)
            bench(name, PM, {}, fn, nb)
            t.append(res[-1]["ms"] if len(res) > n0 else None)
        for ch in (256, 512, 1024, 2048):
            for rb, wp in ((32, 2), (32, 4), (64, 2), (64, 4), (64, 8), (128, 4), (128, 8)):
                bench(f"routing_map/{tag}", PM, {"rm_chunk": ch, "rm_block": rb, "rm_warps": wp},
                      lambda: PM.routing_map(idr, Er), nb)
        t_ref, t_def = t
        t_best = min((r["ms"] for r in res if r["kernel"] == f"routing_map/{tag}"), default=None)
        if t_ref and t_def and t_best:
            print(f"routing_map N={Nr} K={Kr} E={Er}: torch.sort {t_ref * 1e3:.1f} us, counting sort "
                  f"{t_def * 1e3:.1f} us (default CFG; best {t_best * 1e3:.1f} us): "
                  f"{t_ref / t_def:.2f}x ({t_ref / t_best:.2f}x best)", flush=True)
    for bd in (256, 512, 1024, 2048, 4096):
        cfg = {"block_d": bd}
        bench("permute_fwd", PM, cfg, lambda: PM.permute_fwd(xt, row_of, K4), N4 * D4 * 2 * (1 + K4))
        bench("permute_bwd", PM, cfg, lambda: PM.permute_bwd(ys, row_of, N4, K4), N4 * D4 * 2 * (1 + K4))
        bench("unpermute_fwd", PM, cfg, lambda: PM.unpermute_fwd(ys, row_of, wk, N4),
              N4 * D4 * 2 * (1 + K4))
    for te in (2048, 4096, 8192, 16384):
        bench("unpermute_bwd", PM, {"tile_elems": te},
              lambda: PM.unpermute_bwd(dyt, ys, row_of, wk, True), N4 * D4 * 2 * (1 + 2 * K4))

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_kernels_sweep.json"), "w") as f:
        json.dump(res, f, indent=1)
    best = {}
    for row in res:
        if row["kernel"] not in best or row["ms"] < best[row["kernel"]]["ms"]:
            best[row["kernel"]] = row
    print("best per kernel:")
    for k, row in best.items():
        print(f"  {k:<16} {json.dumps(row['cfg']):<48} {row['GBps']:7.0f} GB/s")
    return 0


# ----------------------------------------------------------------------------------------------
# problems: each returns a dict with the callables and the byte counts
# ----------------------------------------------------------------------------------------------
def _problems(torch, F, q):
    """q: size divisor (1 for full sizes, 4 with --quick)."""
    from kernels.permute import (inverse_index, permute, permute_ref, routing_map, unpermute,
                                 unpermute_ref)
    from kernels.rmsnorm import add_rmsnorm, add_rmsnorm_ref, rmsnorm, rmsnorm_ref
    from kernels.rope import rope, rope_ref
    from kernels.router import router_topk, router_topk_ref
    from kernels.swiglu import swiglu, swiglu_packed, swiglu_packed_ref, swiglu_ref

    dev, bf16 = "cuda", torch.bfloat16
    probs = {}

    def leaf(t):
        return t.detach().clone().requires_grad_(True)

    # --- rmsnorm / add_rmsnorm: 16384 x 7168 bf16
    N, D = 16384 // q, 7168
    x = torch.randn(N, D, device=dev, dtype=bf16)
    r = torch.randn(N, D, device=dev, dtype=bf16)
    w = 1 + 0.1 * torch.randn(D, device=dev)
    probs["rmsnorm"] = dict(
        shape=f"[{N}, {D}] bf16, w fp32",
        inputs=lambda: [leaf(x), leaf(w)],
        triton=lambda x, w: rmsnorm(x, w, 1e-6),
        torch=lambda x, w: F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), 1e-6),
        ref=lambda x, w: rmsnorm_ref(x, w, 1e-6),
        bytes_fwd=2 * N * D * 2 + D * 4, bytes_bwd=3 * N * D * 2 + 2 * D * 4,
    )
    probs["add_rmsnorm"] = dict(
        shape=f"[{N}, {D}] bf16 x2, w fp32",
        inputs=lambda: [leaf(x), leaf(r), leaf(w)],
        triton=lambda x, r, w: add_rmsnorm(x, r, w, 1e-6),
        torch=lambda x, r, w: (lambda h: (F.rms_norm(h, (h.shape[-1],), w.to(h.dtype), 1e-6), h))(x + r),
        ref=lambda x, r, w: add_rmsnorm_ref(x, r, w, 1e-6),
        bytes_fwd=4 * N * D * 2 + D * 4, bytes_bwd=4 * N * D * 2 + 2 * D * 4,
    )

    # --- rope: [4, 4096, 128, 64] bf16
    B, T, H, Dr = max(1, 4 // q), 4096, 128, 64
    inv = 1.0 / 10000.0 ** (torch.arange(0, Dr, 2, device=dev, dtype=torch.float32) / Dr)
    ang = torch.outer(torch.arange(T, device=dev, dtype=torch.float32), inv)
    cos, sin = ang.cos(), ang.sin()
    xq = torch.randn(B, T, H, Dr, device=dev, dtype=bf16)
    probs["rope"] = dict(
        shape=f"[{B}, {T}, {H}, {Dr}] bf16",
        inputs=lambda: [leaf(xq)],
        triton=lambda x: rope(x, cos, sin),
        torch=lambda x: rope_ref(x, cos, sin),
        ref=lambda x: rope_ref(x, cos, sin),
        bytes_fwd=2 * xq.numel() * 2, bytes_bwd=2 * xq.numel() * 2,
    )

    # --- swiglu: 16384 x 2048 bf16 (a, b separate) and packed [16384, 4096]
    N2, Fd = 16384 // q, 2048
    a = torch.randn(N2, Fd, device=dev, dtype=bf16)
    b = torch.randn(N2, Fd, device=dev, dtype=bf16)
    xp = torch.randn(N2, 2 * Fd, device=dev, dtype=bf16)
    probs["swiglu"] = dict(
        shape=f"[{N2}, {Fd}] bf16 x2",
        inputs=lambda: [leaf(a), leaf(b)],
        triton=swiglu,
        torch=lambda a, b: F.silu(a) * b,
        ref=swiglu_ref,
        bytes_fwd=3 * N2 * Fd * 2, bytes_bwd=5 * N2 * Fd * 2,
    )
    probs["swiglu_packed"] = dict(
        shape=f"[{N2}, {2 * Fd}] bf16",
        inputs=lambda: [leaf(xp)],
        triton=swiglu_packed,
        torch=lambda x: (lambda ab: F.silu(ab[0]) * ab[1])(x.chunk(2, dim=-1)),
        ref=swiglu_packed_ref,
        bytes_fwd=3 * N2 * Fd * 2, bytes_bwd=5 * N2 * Fd * 2,
    )

    # --- router: 16384 x 256 fp32 logits, top-8, 8 groups keep 4, sigmoid + bias (V3)
    N3, E, K, G, TG = 16384 // q, 256, 8, 8, 4
    logits = torch.randn(N3, E, device=dev)
    bias = 0.01 * torch.randn(E, device=dev)

    def v3_gate(lg):
        s = lg.float().sigmoid()
        orig = s
        s = (s + bias).view(lg.shape[0], G, -1)
        gs = s.topk(2, dim=-1)[0].sum(dim=-1)
        idx = gs.topk(TG, dim=-1)[1]
        mask = s.new_ones(lg.shape[0], G, dtype=torch.bool).scatter_(1, idx, False)
        s = s.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
        ids = torch.topk(s, K, dim=-1)[1]
        wts = orig.gather(1, ids)
        return wts / wts.sum(-1, keepdim=True) * 2.5, ids

    probs["router"] = dict(
        shape=f"[{N3}, {E}] fp32, k={K}, groups {TG}/{G}, sigmoid+bias",
        inputs=lambda: [leaf(logits)],
        triton=lambda lg: router_topk(lg, bias, K, "sigmoid", G, TG, 2.5, True),
        torch=v3_gate,
        ref=lambda lg: router_topk_ref(lg, bias, K, "sigmoid", G, TG, 2.5, True),
        bytes_fwd=N3 * E * 4 + N3 * K * 12, bytes_bwd=2 * N3 * E * 4 + N3 * K * 12,
        n_diff_outputs=1,
    )

    # --- permute / unpermute: 16384 tokens x top-8 x 7168 bf16, 256 experts
    N4, D4, E4, K4 = 16384 // q, 7168, 256, 8
    ids = torch.rand(N4, E4, device=dev).topk(K4, dim=-1)[1]
    xt = torch.randn(N4, D4, device=dev, dtype=bf16)
    _, sidx, _ = routing_map(ids, E4)
    ys = torch.randn(N4 * K4, D4, device=dev, dtype=bf16)
    wk = torch.rand(N4, K4, device=dev)

    def torch_permute(x):
        order = torch.sort(ids.flatten(), stable=True)[1]
        counts = torch.zeros(E4, dtype=torch.int64, device=dev).scatter_add_(
            0, ids.flatten(), torch.ones(N4 * K4, dtype=torch.int64, device=dev))
        return x[order // K4], counts, order

    probs["permute"] = dict(
        shape=f"x [{N4}, {D4}] bf16, top-{K4} of {E4}",
        inputs=lambda: [leaf(xt)],
        triton=lambda x: permute(x, ids, E4),
        torch=torch_permute,
        ref=lambda x: permute_ref(x, ids, E4),
        bytes_fwd=N4 * D4 * 2 + N4 * K4 * D4 * 2, bytes_bwd=N4 * K4 * D4 * 2 + N4 * D4 * 2,
        n_diff_outputs=1,
    )
    probs["unpermute"] = dict(
        shape=f"y_sorted [{N4 * K4}, {D4}] bf16, w [{N4}, {K4}] fp32",
        inputs=lambda: [leaf(ys), leaf(wk)],
        triton=lambda y, w: unpermute(y, sidx, w, N4),
        torch=lambda y, w: torch.bmm(w.to(y.dtype).unsqueeze(1),
                                     y.index_select(0, inverse_index(sidx)).view(N4, K4, D4)).squeeze(1),
        ref=lambda y, w: unpermute_ref(y, sidx, w, N4),
        bytes_fwd=N4 * K4 * D4 * 2 + N4 * D4 * 2,
        bytes_bwd=N4 * D4 * 2 + 2 * N4 * K4 * D4 * 2,
    )
    return probs


# ----------------------------------------------------------------------------------------------
def _diff_outputs(out, n):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs[:n] if o.is_floating_point()] if n else [o for o in outs if o.is_floating_point()]


def _check(torch, prob):
    """Forward + all grads of triton vs the fp32 reference on upcast inputs: max abs err, pass."""
    n = prob.get("n_diff_outputs", 0)
    ins = prob["inputs"]()
    outs = _diff_outputs(prob["triton"](*ins), n)
    refs_in = [t.detach().float().requires_grad_(True) for t in ins]
    refs = _diff_outputs(prob["ref"](*refs_in), n)
    gen = torch.Generator(device="cuda").manual_seed(0)
    gouts = [torch.randn(o.shape, device="cuda", generator=gen).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, ins, gouts)
    grads_r = torch.autograd.grad(refs, refs_in, [g.float() for g in gouts])
    report, ok = {}, True
    for name, got, want in ([(f"out{i}", o, r) for i, (o, r) in enumerate(zip(outs, refs))]
                            + [(f"grad{i}", g, r) for i, (g, r) in enumerate(zip(grads, grads_r))]):
        got, want = got.float(), want.float()
        err = (got - want).abs()
        scale = want.abs().max().item() or 1.0
        # bf16 storage: one rounding (2^-8 relative) per element, plus fp32 summation-order noise
        # on reductions (dw, dweights), bounded relative to the tensor's largest value
        bad = err > 1e-2 * scale + 2e-2 * want.abs()
        report[name] = {"max_abs_err": err.max().item(), "ref_max": scale,
                        "finite": bool(torch.isfinite(got).all())}
        ok = ok and not bool(bad.any()) and report[name]["finite"]
    return ok, report


def _time(torch, triton_testing, fn, inputs_fn, n, warmup, rep):
    ins = inputs_fn()
    with torch.no_grad():
        fwd = triton_testing.do_bench(lambda: fn(*ins), warmup=warmup, rep=rep, return_mode="median")
    outs = _diff_outputs(fn(*ins), n)
    gouts = [torch.randn_like(o) for o in outs]

    def step():
        o = _diff_outputs(fn(*ins), n)
        torch.autograd.backward(o, gouts)

    fb = triton_testing.do_bench(step, warmup=warmup, rep=rep, grad_to_none=ins, return_mode="median")
    return fwd, fb


def _hbm_copy_gbps(torch, triton_testing):
    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton_testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def main(argv=None):
    args = parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        sys.exit(f"unknown op(s) {unknown}; choose from {', '.join(OPS)}")

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import triton
    import triton.testing as triton_testing

    torch.manual_seed(0)
    if args.sweep:
        rc = _sweep(torch, triton_testing.do_bench, args.out, args.quick, ops)
        if not args.also_table:
            return rc
    warmup, rep = (10, 30) if args.quick else (args.warmup, args.rep)
    hbm = _hbm_copy_gbps(torch, triton_testing)
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"HBM copy {hbm:.0f} GB/s")
    probs = _problems(torch, F, 4 if args.quick else 1)
    results = []
    for op in ops:
        prob = probs[op]
        n = prob.get("n_diff_outputs", 0)
        row = {"op": op, "shape": prob["shape"], "baseline": BASELINES[op],
               "bytes_fwd": prob["bytes_fwd"], "bytes_bwd": prob["bytes_bwd"]}
        try:
            row["correct"], row["check"] = _check(torch, prob)
        except Exception as e:  # noqa: BLE001 - report and keep benchmarking the others
            row["correct"], row["check"] = False, {"error": repr(e)}
            traceback.print_exc()
        impls = {"triton": prob["triton"], "eager": prob["torch"]}
        if not args.no_compile:
            impls["compile"] = torch.compile(prob["torch"], dynamic=False)
        row["impl"] = {}
        for name, fn in impls.items():
            try:
                fwd, fb = _time(torch, triton_testing, fn, prob["inputs"], n, warmup, rep)
                row["impl"][name] = {
                    "fwd_ms": fwd, "fwd_bwd_ms": fb,
                    "fwd_GBps": prob["bytes_fwd"] / (fwd * 1e-3) / 1e9,
                    "fwd_bwd_GBps": (prob["bytes_fwd"] + prob["bytes_bwd"]) / (fb * 1e-3) / 1e9,
                }
            except Exception as e:  # noqa: BLE001
                row["impl"][name] = {"error": repr(e)[:300]}
        t = row["impl"].get("triton", {})
        for name in ("eager", "compile"):
            other = row["impl"].get(name, {})
            if "fwd_ms" in t and "fwd_ms" in other:
                row[f"speedup_vs_{name}"] = {"fwd": other["fwd_ms"] / t["fwd_ms"],
                                             "fwd_bwd": other["fwd_bwd_ms"] / t["fwd_bwd_ms"]}
        results.append(row)
        torch.cuda.empty_cache()

    lines = [f"{'op':<14} {'ok':<4} {'impl':<8} {'fwd ms':>9} {'fwd GB/s':>9} {'%HBM':>6} "
             f"{'f+b ms':>9} {'f+b GB/s':>9} {'%HBM':>6} {'x eager':>8} {'x comp':>7}"]
    for row in results:
        for name, m in row["impl"].items():
            if "error" in m:
                lines.append(f"{row['op']:<14} {'':<4} {name:<8} error: {m['error'][:80]}")
                continue
            sp_e = sp_c = ""
            if name == "triton":
                sp_e = f"{row.get('speedup_vs_eager', {}).get('fwd_bwd', float('nan')):.2f}"
                sp_c = f"{row.get('speedup_vs_compile', {}).get('fwd_bwd', float('nan')):.2f}"
            lines.append(
                f"{row['op']:<14} {('yes' if row['correct'] else 'NO') if name == 'triton' else '':<4} "
                f"{name:<8} {m['fwd_ms']:>9.3f} {m['fwd_GBps']:>9.0f} {100 * m['fwd_GBps'] / hbm:>5.0f}% "
                f"{m['fwd_bwd_ms']:>9.3f} {m['fwd_bwd_GBps']:>9.0f} {100 * m['fwd_bwd_GBps'] / hbm:>5.0f}% "
                f"{sp_e:>8} {sp_c:>7}")
    table = "\n".join(lines)
    print(table)
    print("x eager / x comp: (eager or compiled fwd+bwd time) / (triton fwd+bwd time); "
          "GB/s: minimum bytes moved / median time")

    os.makedirs(args.out, exist_ok=True)
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": props.name, "torch": torch.__version__, "triton": triton.__version__,
            "hbm_copy_GBps": hbm, "quick": args.quick, "warmup_ms": warmup, "rep_ms": rep}
    with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    with open(os.path.join(args.out, "bench_kernels.txt"), "w") as f:
        f.write(json.dumps(meta) + "\n" + table + "\n")
    print(f"wrote {os.path.join(args.out, 'bench_kernels.json')}")
    return 0 if all(r["correct"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
