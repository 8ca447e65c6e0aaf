"""Expert-parallelism benchmark (GPU; a tiny --smoke mode also runs on CPU/gloo).

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_ep.py --out results/
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_ep.py --micro-batch 8 --layers 6   # bigger
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/bench_ep.py --smoke  # CPU check

Sections, in order (rank 0 prints a table and writes <out>/bench_ep_<date>.json):

  1. equivalence  fp32 (TF32 off), a small model: EP over all ranks vs the single-process reference
                  that every rank computes itself (loss; every gradient, experts all-gathered): relative
                  errors; the benchmark stops (exit code 1) if they exceed 1e-4.
  2. throughput   a training step (bf16 autocast, AdamW, grad sync, clipping) of a DeepSeek-V2-Lite-like
                  model with --layers layers, tokens/s over all GPUs and peak memory per GPU, at ep=1
                  (dp = world: every GPU holds all experts, the same dispatcher code without communication,
                  gradients all-reduced over the world) and at ep = world (dp = 1), once per --exchanges
                  value (parallel.ep_exchange; the equivalence section checks each too). Also the all-to-all time per step from the dispatcher's meter
                  (perf/a2a_ms).
  3. dispatch     one MoE layer's dispatch + wait + combine (forward, identity experts, bf16 rows) vs a raw
                  all_to_all_single of the same bytes there and back (equal splits): ms and algorithmic GB/s
                  (bytes sent by one rank / time); with the PyTorch and (GPU) the Triton permute, and with
                  each exchange (all_to_all: one all_to_all_single + regroup by local expert; per_expert:
                  batched send/recv per (rank, local expert) chunk, no regroup; pipelined: --chunks all-to-alls
                  whose local passes overlap the neighbouring chunks' transfers; symmetric: one kernel
                  stores / reads the copies in the peers' symmetric-memory buffers).
  4. overlap      one MoE layer (with its shared experts) forward + backward with the token all-to-all
                  overlapped with the shared experts (async, the default; forward and backward) vs waited at
                  once; then the forward segment dispatch -> shared experts -> wait alone, against its ceiling
                  min(token all-to-all alone, shared experts alone).

The environment of the lent GPU host needs NVLS / multicast off: this script sets NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 before anything initialises NCCL.
Not part of CI.
"""
from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results", help="directory for the JSON result (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, few steps (CPU/gloo check of the script)")
    m = p.add_argument_group("throughput model (DeepSeek-V2-Lite-like)")
    m.add_argument("--dim", type=int, default=2048)
    m.add_argument("--layers", type=int, default=4, help="total layers (default: %(default)s)")
    m.add_argument("--dense-layers", type=int, default=1)
    m.add_argument("--heads", type=int, default=16)
    m.add_argument("--experts", type=int, default=64, help="routed experts")
    m.add_argument("--topk", type=int, default=6)
    m.add_argument("--moe-inter", type=int, default=1408)
    m.add_argument("--shared", type=int, default=2, help="shared experts")
    m.add_argument("--vocab", type=int, default=32768)
    m.add_argument("--seq", type=int, default=2048)
    m.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per step")
    t = p.add_argument_group("timing")
    t.add_argument("--steps", type=int, default=10, help="timed training steps")
    t.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    t.add_argument("--reps", type=int, default=20, help="repetitions of the dispatch / overlap timings")
    t.add_argument("--exchanges", nargs="+", default=["all_to_all", "per_expert", "pipelined"],
                   choices=["all_to_all", "per_expert", "pipelined", "symmetric", "symmetric_overlap"],
                   help="token exchanges the equivalence and throughput sections run at ep>1 (symmetric_overlap: "
                        "the symmetric exchange with its dispatch push on a side stream, during the shared experts)")
    t.add_argument("--chunks", type=int, nargs="+", default=[2, 4, 8],
                   help="token chunks of the pipelined exchange timed by the dispatch section (the first one is "
                        "also used by the other sections)")
    t.add_argument("--kernels", action="store_true",
                   help="throughput section: every layout with the Triton kernels (kernels.enabled=true: attention, "
                        "norms, RoPE, SwiGLU, router, permute and the pipelined exchange's row passes)")
    t.add_argument("--profile", action="store_true",
                   help="dispatch section: also run torch.profiler over the Triton all_to_all and pipelined "
                        "dispatch+combine (rank 0 prints the top GPU kernels; Chrome traces go to --out)")
    t.add_argument("--sections", nargs="+", default=["equivalence", "throughput", "dispatch", "overlap"],
                   choices=["equivalence", "throughput", "dispatch", "overlap"])
    args = p.parse_args(argv)
    if args.smoke:
        args.dim, args.layers, args.heads, args.experts, args.topk = 64, 3, 2, 8, 2
        args.moe_inter, args.shared, args.vocab, args.seq, args.micro_batch = 32, 1, 256, 32, 2
        args.steps, args.warmup, args.reps = 2, 1, 3
    return args


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timeit(fn, device, reps: int) -> float:
    """Median wall ms of ``fn()`` over ``reps`` (after one warm-up call), synchronising the device and
    aligning the ranks (barrier) before each repetition."""
    import torch.distributed as dist
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _model_args(a, small=False):
    from moetrain.model.args import ModelArgs
    if small:  # the equivalence model
        return ModelArgs(vocab_size=512, dim=256, inter_dim=512, moe_inter_dim=128, n_layers=3, n_dense_layers=1,
                         n_heads=4, max_seq_len=128, n_routed_experts=max(8, a.world * 4), n_shared_experts=1,
                         n_activated_experts=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                         v_head_dim=32, seq_aux_alpha=1e-3, original_seq_len=128)
    return ModelArgs(vocab_size=a.vocab, dim=a.dim, inter_dim=a.dim * 5, moe_inter_dim=a.moe_inter,
                     n_layers=a.layers, n_dense_layers=a.dense_layers, n_heads=a.heads, max_seq_len=a.seq,
                     n_routed_experts=a.experts, n_shared_experts=a.shared, n_activated_experts=a.topk,
                     kv_lora_rank=min(512, a.dim // 4), qk_nope_head_dim=128 if a.dim >= 1024 else 16,
                     qk_rope_head_dim=64 if a.dim >= 1024 else 8, v_head_dim=128 if a.dim >= 1024 else 16,
                     seq_aux_alpha=1e-3, original_seq_len=a.seq)


def _ctx(base, dp, ep):
    import copy
    from moetrain.parallel.mesh import build_mesh
    ctx = copy.copy(base)
    ctx.mesh = None
    return build_mesh(ctx, dp, ep) if base.distributed else ctx


def _xent(model, tokens):
    import torch.nn.functional as F
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)) + model.aux_loss()


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------

def equivalence(a, base, exchange: str = "all_to_all") -> dict:
    import torch
    import torch.distributed as dist
    from moetrain.model.transformer import Transformer
    from moetrain.parallel.expert_parallel import expert_parameter_names

    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    W, dev = base.world_size, base.device
    args = _model_args(a, small=True)
    ctx = _ctx(base, 1, W)
    with torch.device(dev):
        torch.manual_seed(0)
        ref = Transformer(args)
        torch.manual_seed(0)
        model = Transformer(args)
    sync = _apply_ep(model, ctx, exchange, a.chunks[0])
    B, T = 2, 64
    g = torch.Generator().manual_seed(7)
    data = torch.randint(0, args.vocab_size, (W * B, T + 1), generator=g).to(dev)
    ref_loss = 0.0
    for r in range(W):
        loss = _xent(ref, data[r * B:(r + 1) * B])
        (loss / W).backward()
        ref_loss += loss.item() / W
    loss = _xent(model, data[base.rank * B:(base.rank + 1) * B])
    loss.backward()
    sync()
    lt = loss.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(lt)
    mean_loss = lt.item() / W
    experts = set(expert_parameter_names(model))
    refp = dict(ref.named_parameters())
    worst, worst_name = 0.0, ""
    for n, p in model.named_parameters():
        gr = p.grad
        if n in experts and ctx.ep > 1:
            parts = [torch.empty_like(gr) for _ in range(ctx.ep)]
            dist.all_gather(parts, gr.contiguous(), group=ctx.mesh.get_group("ep"))
            gr = torch.cat(parts)
        err = ((gr - refp[n].grad).norm() / refp[n].grad.norm().clamp_min(1e-30)).item()
        if err > worst:
            worst, worst_name = err, n
    out = {"ranks": W, "exchange": exchange, "loss_ep": mean_loss, "loss_ref": ref_loss,
           "loss_rel_err": abs(mean_loss - ref_loss) / abs(ref_loss),
           "grad_max_rel_err": worst, "grad_worst_param": worst_name}
    out["ok"] = out["loss_rel_err"] < 1e-4 and worst < 1e-4
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return out


def _apply_ep(model, ctx, exchange: str, chunks: int):
    """apply_ep with ``exchange``; ``"symmetric_overlap"``: the symmetric exchange with its push on a side stream."""
    from moetrain.parallel.expert_parallel import apply_ep
    sync = apply_ep(model, ctx, exchange=exchange.removesuffix("_overlap"), chunks=chunks)
    if exchange.endswith("_overlap"):
        for moe in model.moe_layers():
            moe.dispatcher.symm_overlap = True
    return sync


def throughput(a, base, ep: int, exchange: str = "all_to_all") -> dict:
    import torch
    from moetrain.model.transformer import Transformer
    from moetrain.parallel.expert_parallel import A2A_METER
    from moetrain.parallel.grad_sync import clip_grad_norm

    W, dev = base.world_size, base.device
    ctx = _ctx(base, W // ep, ep)
    args = _model_args(a)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.device(dev):
        torch.manual_seed(0)
        model = Transformer(args)
    sync = _apply_ep(model, ctx, exchange, a.chunks[0])
    if a.kernels:
        from moetrain.config import KernelsConfig
        from moetrain.kernels_apply import apply_kernels
        apply_kernels(model, KernelsConfig(enabled=True), dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(base.rank)
    batches = [torch.randint(0, args.vocab_size, (a.micro_batch, a.seq + 1), generator=g).to(dev)
               for _ in range(2)]
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else _null()

    def step(i):
        with amp:
            loss = _xent(model, batches[i % 2])
        loss.backward()
        sync()
        clip_grad_norm(model, 1.0, ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(a.warmup):
        step(i)
    _sync(dev)
    A2A_METER.reset()
    t0 = time.perf_counter()
    for i in range(a.steps):
        loss = step(i)
    _sync(dev)
    dt = time.perf_counter() - t0
    a2a = A2A_METER.report()
    out = {"ep": ep, "dp": W // ep, "exchange": exchange if ep > 1 else "-", "kernels": a.kernels,
           "params_per_gpu": n_params, "tokens_per_step": W * a.micro_batch * a.seq,
           "step_ms": dt / a.steps * 1e3, "tokens_per_s": W * a.micro_batch * a.seq * a.steps / dt,
           "loss": loss.item(), "a2a_ms_per_step": a2a.get("perf/a2a_ms", 0.0),
           "a2a_bytes_per_step": a2a.get("perf/a2a_bytes", 0.0)}
    if dev.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    del model, opt, batches
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _routing(N, K, E, dev, seed):
    import torch
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(N, E, generator=g).topk(K, dim=-1)[1].to(dev)
    w = torch.rand(N, K, generator=g).to(dev)
    return ids, w / w.sum(-1, keepdim=True)


def dispatch_vs_raw(a, base) -> dict:
    import torch
    import torch.distributed as dist
    from moetrain.parallel.expert_parallel import A2AMeter, AllToAllDispatcher
    from moetrain.parallel.pipelined_exchange import build_route

    W, dev = base.world_size, base.device
    ctx = _ctx(base, 1, W)
    group = ctx.mesh.get_group("ep")
    N, D, K, E = a.micro_batch * a.seq, a.dim, a.topk, a.experts
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    x = torch.randn(N, D, device=dev, dtype=dt)
    ids, w = _routing(N, K, E, dev, 100 + base.rank)
    disp = AllToAllDispatcher(E, group, meter=A2AMeter())

    def dispatch_combine():
        with torch.no_grad():
            st = disp.dispatch(x, ids, w)
            ex, _ = disp.wait(st)
            return disp.combine(ex, st)

    def train_fwd():
        with torch.enable_grad():
            st = disp.dispatch(x.detach().requires_grad_(), ids, w.detach().requires_grad_())
            ex, _ = disp.wait(st)
            return disp.combine(ex, st)

    send = torch.randn(N * K, D, device=dev, dtype=dt)
    recv = torch.empty_like(send)

    def raw():
        dist.all_to_all_single(recv, send, group=group)
        dist.all_to_all_single(send, recv, group=group)

    y_ref = dispatch_combine().float()
    errs = {}

    def checked(name):
        """dispatch_combine, after checking once that it gives the plain exchange's output (identity experts)."""
        err = ((dispatch_combine().float() - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-30)).item()
        errs[name] = err
        if not err <= 1e-2:
            raise AssertionError(f"dispatch+combine ({name}): max relative error {err:.2e} vs the all_to_all path")
        return dispatch_combine

    ms_disp = _timeit(dispatch_combine, dev, a.reps)
    ms_raw = _timeit(raw, dev, a.reps)
    nbytes = 2 * send.numel() * send.element_size()  # there and back, per rank
    out = {"tokens": N, "dim": D, "topk": K, "experts": E, "dtype": str(dt).replace("torch.", ""),
           "bytes_per_rank": nbytes, "dispatch_combine_ms": ms_disp, "raw_a2a_ms": ms_raw,
           "dispatch_combine_GBps": nbytes / ms_disp / 1e6, "raw_a2a_GBps": nbytes / ms_raw / 1e6,
           "overhead_ms": ms_disp - ms_raw}
    # where the overhead goes: the local passes over the rows, timed alone (no communication)
    st = disp.dispatch(x, ids, w)
    ex, _ = disp.wait(st)
    out["parts_ms"] = {
        "permute": _timeit(lambda: disp.permute_fn(x, ids, E), dev, a.reps),
        "regroup_both_ways": (_timeit(lambda: st.recv.index_select(0, st.order), dev, a.reps) * 2
                              if st.order is not None else 0.0),
        "unpermute": _timeit(lambda: disp.unpermute_fn(send, st.sorted_idx, w), dev, a.reps),
    }
    # the per-expert exchange: rows land in local-expert order, no regroup
    disp.exchange = "per_expert"
    out["dispatch_combine_per_expert_ms"] = _timeit(checked("per_expert"), dev, a.reps)
    # the pipelined exchange: C chunks, each chunk's local passes overlapping its neighbours' all-to-alls
    disp.exchange = "pipelined"
    out["dispatch_combine_pipelined_ms"] = {}
    for c in a.chunks:
        disp.chunks = c
        out["dispatch_combine_pipelined_ms"][c] = _timeit(checked(f"pipelined/{c}"), dev, a.reps)
    disp.exchange = "all_to_all"
    if dev.type == "cuda":  # the same with the Triton permute / unpermute kernels (kernels.permute=true)
        from kernels.permute import (RowOps, permute as k_permute, stable_order as k_order,
                                     unpermute as k_unpermute)
        disp.row_ops = RowOps
        disp.exchange = "pipelined"
        out["dispatch_combine_triton_pipelined_ms"] = {}
        for c in a.chunks:
            disp.chunks = c
            out["dispatch_combine_triton_pipelined_ms"][c] = _timeit(checked(f"triton pipelined/{c}"), dev, a.reps)
        # the forward as training runs it (grad on: the combines keep the pulled rows for the weights' gradient)
        disp.chunks = a.chunks[0]
        out["dispatch_combine_triton_pipelined_train_fwd_ms"] = _timeit(train_fwd, dev, a.reps)
    # symmetric memory: one kernel each way, no all-to-all (GPU: Triton routing; CPU: buffers in /dev/shm)
    disp.exchange = "symmetric"
    out["dispatch_combine_symmetric_ms"] = _timeit(checked("symmetric"), dev, a.reps)
    out["dispatch_combine_symmetric_train_fwd_ms"] = _timeit(train_fwd, dev, a.reps)
    out["parts_symmetric_ms"] = _symmetric_parts(disp, x, ids, w, E, group, dev, a.reps)
    disp.exchange = "all_to_all"
    if dev.type == "cuda":
        disp.permute_fn, disp.unpermute_fn, disp.order_fn = k_permute, k_unpermute, k_order
        ms_k = _timeit(checked("triton"), dev, a.reps)
        out["dispatch_combine_triton_ms"] = ms_k
        disp.exchange = "per_expert"
        out["dispatch_combine_triton_per_expert_ms"] = _timeit(checked("triton per_expert"), dev, a.reps)
        disp.exchange = "all_to_all"
        out["parts_triton_ms"] = {
            "permute": _timeit(lambda: k_permute(x, ids, E), dev, a.reps),
            "unpermute": _timeit(lambda: k_unpermute(send, st.sorted_idx, w), dev, a.reps),
            # the pipelined exchange's routing: counting sort, counts all-to-all, host sync, placement index
            f"pipelined_route_{a.chunks[0]}_chunks": _timeit(
                lambda: build_route(ids, E, E, W, a.chunks[0], group, disp.meter, RowOps),
                dev, a.reps),
            "all_to_all_counts_and_sync": _timeit(lambda: _counts_exchange(ids, E, group), dev, a.reps),
        }
    out["max_rel_err_vs_all_to_all"] = errs
    if a.profile and dev.type == "cuda":
        out["profile"] = {}
        for name, exchange in (("all_to_all", "all_to_all"), (f"pipelined{a.chunks[0]}", "pipelined")):
            disp.exchange, disp.chunks = exchange, a.chunks[0]
            out["profile"][name] = _profile(dispatch_combine, base, a, f"dispatch_{name}")
        disp.exchange = "all_to_all"
    return out


def _symmetric_parts(disp, x, ids, w, E, group, dev, reps) -> dict:
    """The symmetric exchange's pieces alone (forward, no grad): routing (counting sort, counts all-gather, route
    table, counts on their way to the host), the dispatch (routing + push + host sync), the combine (copy-in +
    barrier + pull)."""
    import torch
    from moetrain.parallel.expert_parallel import _NULL_METER
    from moetrain.parallel.symm_exchange import build_symm_route
    with torch.no_grad():
        st = disp.dispatch(x, ids, w)
        ex, _ = disp.wait(st)

        def route():
            r = build_symm_route(ids, E, E, group, disp.ep_rank, disp.row_ops, x.dtype, x.shape[1], _NULL_METER,
                                 disp._symm_buffers)
            r.resolve()
        return {"route_and_counts_on_host": _timeit(route, dev, reps),
                "dispatch": _timeit(lambda: disp.dispatch(x, ids, w), dev, reps),
                "combine": _timeit(lambda: disp.combine(ex, st), dev, reps)}


def _counts_exchange(ids, E, group):
    """The all_to_all exchange's counts step alone: histogram, all-to-all of the counts, host sync."""
    import torch
    import torch.distributed as dist
    counts = torch.zeros(E, dtype=torch.int64, device=ids.device).scatter_add_(0, ids.reshape(-1),
                                                                                torch.ones_like(ids.reshape(-1)))
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts, group=group)
    return torch.cat([counts, recv]).tolist()


def _profile(fn, base, a, tag: str, reps: int = 5) -> str:
    """torch.profiler over ``reps`` calls of ``fn`` (after a warm-up): returns rank 0's table of the top GPU
    ops and writes its Chrome trace to ``<out>/<tag>_rank<r>.trace.json.gz``."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    _sync(base.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
            _sync(base.device)
    os.makedirs(a.out, exist_ok=True)
    if base.rank == 0:
        prof.export_chrome_trace(os.path.join(a.out, f"{tag}_rank0.trace.json.gz"))
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60)
    return f"per {reps} calls\n{table}"


def overlap_gain(a, base) -> dict:
    import torch
    from moetrain.model.moe import MoE
    from moetrain.parallel.expert_parallel import apply_ep

    W, dev = base.world_size, base.device
    ctx = _ctx(base, 1, W)
    args = _model_args(a)
    res = {}
    with torch.device(dev):
        torch.manual_seed(0)
        moe = MoE(args)
        moe.gate.reset_parameters()
        moe.experts.reset_parameters()
        if moe.shared_experts is not None:
            moe.shared_experts.reset_parameters()
    holder = torch.nn.Module()
    holder.moe = moe
    apply_ep(holder, ctx)
    g = torch.Generator().manual_seed(base.rank)
    x = torch.randn(a.micro_batch, a.seq, args.dim, generator=g).to(dev).requires_grad_(True)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else _null()

    def fwd_bwd():
        with amp:
            y = moe(x)
        y.float().square().mean().backward()

    reps = 3 * a.reps  # the gain is a few % of a layer: more repetitions than the other sections
    for overlap in (False, True):
        moe.dispatcher.overlap = overlap
        res["sync_ms" if not overlap else "overlap_ms"] = _timeit(fwd_bwd, dev, reps)
    moe.shared_experts, shared = None, moe.shared_experts
    res["no_shared_ms"] = _timeit(fwd_bwd, dev, reps)
    moe.shared_experts = shared
    res["gain_ms"] = res["sync_ms"] - res["overlap_ms"]
    res["gain_pct"] = 100 * res["gain_ms"] / res["sync_ms"]

    # The forward segment the overlap acts on, alone: dispatch -> shared experts -> wait. Its ceiling is
    # min(token all-to-all, shared experts), each timed alone.
    x2d = x.detach().reshape(-1, args.dim).to(torch.bfloat16 if dev.type == "cuda" else x.dtype)
    disp = moe.dispatcher
    with torch.no_grad():
        r = moe.gate.route(x2d)

    def segment(with_shared=True):
        with torch.no_grad(), amp:  # autocast as in training: the shared experts' weights are fp32
            st = disp.dispatch(x2d, r.ids, r.weights)
            if with_shared:
                shared(x2d)
            disp.wait(st)

    def shared_only():
        with torch.no_grad(), amp:
            shared(x2d)

    seg = {}
    for overlap in (False, True):
        disp.overlap = overlap
        seg["sync_ms" if not overlap else "overlap_ms"] = _timeit(segment, dev, reps)
    seg["a2a_only_ms"] = _timeit(lambda: segment(False), dev, reps)
    seg["shared_only_ms"] = _timeit(shared_only, dev, reps)
    seg["gain_ms"] = seg["sync_ms"] - seg["overlap_ms"]
    seg["ceiling_ms"] = min(seg["a2a_only_ms"], seg["shared_only_ms"])
    disp.overlap = True
    res["forward_segment"] = seg
    return res


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    a = _parse_args(argv)
    import torch
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from moetrain.parallel.mesh import init_distributed, shutdown

    base = init_distributed("auto")
    a.world = base.world_size
    if base.device.type != "cuda" and not a.smoke:
        print("bench_ep: no CUDA GPU; use --smoke for a CPU check of the script", file=sys.stderr)
        shutdown()
        return 2
    main_rank = base.is_main
    info = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "world_size": base.world_size,
            "device": torch.cuda.get_device_name(base.device) if base.device.type == "cuda" else "cpu",
            "torch": torch.__version__, "backend": base.backend, "args": vars(a),
            "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                  "NVSHMEM_DISABLE_NVLS")}}
    rc = 0
    try:
        if "equivalence" in a.sections and base.world_size > 1:
            info["equivalence"] = [equivalence(a, base, ex) for ex in a.exchanges]
            for eq in info["equivalence"]:
                if main_rank:
                    print(f"equivalence ep={eq['ranks']} ({eq['exchange']}): loss {eq['loss_ep']:.6f} vs "
                          f"{eq['loss_ref']:.6f} (rel {eq['loss_rel_err']:.1e}), worst grad rel err "
                          f"{eq['grad_max_rel_err']:.1e} ({eq['grad_worst_param']}) -> {'OK' if eq['ok'] else 'FAIL'}",
                          flush=True)
            if not all(eq["ok"] for eq in info["equivalence"]):
                rc = 1
                return rc
        if "throughput" in a.sections:
            rows = info["throughput"] = []
            for ep in sorted({1, base.world_size}):
                for exchange in (a.exchanges if ep > 1 else ["all_to_all"]):
                    rows.append(throughput(a, base, ep, exchange))
            if main_rank:
                print(f"\n{'layout':<12}{'exchange':>12}{'params/GPU':>12}{'step ms':>10}{'tokens/s':>12}{'a2a ms':>9}"
                      f"{'a2a MB':>9}{'peak GiB':>10}")
                for r in rows:
                    print(f"{'dp%d x ep%d' % (r['dp'], r['ep']):<12}{r['exchange']:>12}{r['params_per_gpu'] / 1e9:>11.2f}B"
                          f"{r['step_ms']:>10.1f}{r['tokens_per_s']:>12,.0f}{r['a2a_ms_per_step']:>9.1f}"
                          f"{r['a2a_bytes_per_step'] / 1e6:>9.1f}{r.get('peak_mem_gib', float('nan')):>10.2f}")
                for r in rows[1:]:
                    print(f"ep={r['ep']} ({r['exchange']}) / ep=1 tokens/s: "
                          f"{r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x")
        if "dispatch" in a.sections and base.world_size > 1:
            d = info["dispatch"] = dispatch_vs_raw(a, base)
            if main_rank:
                print(f"\ndispatch+combine of {d['tokens']} tokens x top-{d['topk']} x {d['dim']} ({d['dtype']}): "
                      f"{d['dispatch_combine_ms']:.2f} ms ({d['dispatch_combine_GBps']:.1f} GB/s) vs raw "
                      f"all_to_all_single there+back {d['raw_a2a_ms']:.2f} ms ({d['raw_a2a_GBps']:.1f} GB/s); "
                      f"overhead {d['overhead_ms']:.2f} ms ({d['dispatch_combine_ms'] / d['raw_a2a_ms']:.2f}x raw)",
                      flush=True)
                print("  local passes alone (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in d["parts_ms"].items()))
                print("  outputs vs the all_to_all path (max relative error): "
                      + ", ".join(f"{k} {v:.1e}" for k, v in d["max_rel_err_vs_all_to_all"].items()))
                r = d["dispatch_combine_per_expert_ms"] / d["raw_a2a_ms"]
                print(f"  per-expert exchange (no regroup): {d['dispatch_combine_per_expert_ms']:.2f} ms ({r:.2f}x raw)",
                      flush=True)
                if "dispatch_combine_triton_ms" in d:
                    r = d["dispatch_combine_triton_ms"] / d["raw_a2a_ms"]
                    print("  with the Triton permute/unpermute kernels and counting-sort regroup order: "
                          f"{d['dispatch_combine_triton_ms']:.2f} ms ({r:.2f}x raw); alone (ms): "
                          + ", ".join(f"{k} {v:.3f}" for k, v in d["parts_triton_ms"].items()), flush=True)
                    r = d["dispatch_combine_triton_per_expert_ms"] / d["raw_a2a_ms"]
                    print(f"  Triton permute/unpermute + per-expert exchange: "
                          f"{d['dispatch_combine_triton_per_expert_ms']:.2f} ms ({r:.2f}x raw)", flush=True)
                if "dispatch_combine_symmetric_ms" in d:
                    ms = d["dispatch_combine_symmetric_ms"]
                    print(f"  symmetric-memory exchange: {ms:.2f} ms ({ms / d['raw_a2a_ms']:.2f}x raw)", flush=True)
                    print("  symmetric, alone (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                              d["parts_symmetric_ms"].items()), flush=True)
                    for key, what in (("dispatch_combine_symmetric_train_fwd_ms", "symmetric"),
                                      ("dispatch_combine_triton_pipelined_train_fwd_ms", "pipelined (Triton rows)")):
                        if key in d:
                            ms = d[key]
                            print(f"  training forward (grad on), {what}: {ms:.2f} ms "
                                  f"({ms / d['raw_a2a_ms']:.2f}x raw)", flush=True)
                for name, table in d.get("profile", {}).items():
                    print(f"\n  profile, Triton row passes, {name}: {table}", flush=True)
                for key, what in (("dispatch_combine_pipelined_ms", "PyTorch row passes"),
                                  ("dispatch_combine_triton_pipelined_ms", "Triton row passes")):
                    if key in d:
                        print(f"  pipelined exchange, {what}: " + ", ".join(
                            f"{c} chunks {ms:.2f} ms ({ms / d['raw_a2a_ms']:.2f}x raw)" for c, ms in d[key].items()),
                            flush=True)
        if "overlap" in a.sections and base.world_size > 1:
            o = info["overlap"] = overlap_gain(a, base)
            if main_rank:
                print(f"\nMoE layer fwd+bwd: a2a waited at once {o['sync_ms']:.2f} ms, overlapped with shared "
                      f"experts {o['overlap_ms']:.2f} ms (gain {o['gain_ms']:.2f} ms, {o['gain_pct']:.1f}%); "
                      f"without shared experts {o['no_shared_ms']:.2f} ms", flush=True)
                f = o["forward_segment"]
                print(f"forward segment dispatch -> shared experts -> wait: waited at once {f['sync_ms']:.3f} ms, "
                      f"overlapped {f['overlap_ms']:.3f} ms (gain {f['gain_ms']:.3f} ms of at most "
                      f"{f['ceiling_ms']:.3f}: token a2a alone {f['a2a_only_ms']:.3f} ms, shared experts alone "
                      f"{f['shared_only_ms']:.3f} ms)", flush=True)
    finally:
        if main_rank:
            os.makedirs(a.out, exist_ok=True)
            stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
            path = os.path.join(a.out, f"bench_ep_{stamp}.json")
            with open(path, "w") as fh:
                json.dump(info, fh, indent=1)
            print(f"\nwrote {path}", flush=True)
        shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())
