"""Worker functions for the distributed expert-parallel tests (run in spawned gloo processes).

Every worker builds the single-process reference itself (same seed, same data) and compares; it raises
AssertionError with the case name, the tensor and the error on a mismatch and returns a small summary.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moetrain.model.args import ModelArgs
from moetrain.model.transformer import Transformer
from moetrain.parallel.expert_parallel import (AllToAllDispatcher, apply_capacity, apply_ep,
                                               expert_parameter_names, moe_telemetry)
from moetrain.parallel.grad_sync import clip_grad_norm
from moetrain.parallel.mesh import DistContext, all_reduce_sum, build_mesh

T = 8          # tokens per sequence
B = 2          # sequences per rank and micro-batch


def tiny_args(**over) -> ModelArgs:
    base = dict(vocab_size=64, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=3, n_dense_layers=1,
                n_heads=2, max_seq_len=16, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                seq_aux_alpha=1e-2, bias_update_speed=1e-2, original_seq_len=16)
    base.update(over)
    return ModelArgs(**base)


def make_ctx(rank: int, world: int, dp: int, ep: int) -> DistContext:
    ctx = DistContext(rank=rank, world_size=world, device=torch.device("cpu"), backend="gloo")
    return build_mesh(ctx, dp, ep)


def _batch(step: int, n_seqs: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (n_seqs, T + 1), generator=g)


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
    return ce + model.aux_loss()


def _gather_experts(t: torch.Tensor, ctx) -> torch.Tensor:
    """Local expert shard [E_local, ...] -> full [E, ...] (all_gather over the ep group)."""
    if ctx.ep == 1:
        return t
    group = ctx.mesh.get_group("ep")
    parts = [torch.empty_like(t) for _ in range(ctx.ep)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _close(name, a, b, rtol, atol):
    """max|a - b| <= atol + rtol * max|b| (norm-wise: float noise from a different summation order,
    amplified by Adam's first steps, is ~1e-5 of a tensor's scale; a routing or scaling bug is O(1))."""
    if a.shape != b.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} vs reference {tuple(b.shape)}")
    if a.numel() == 0:
        return
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    if not err <= atol + rtol * scale:
        raise AssertionError(f"{name}: max abs err {err:.3e} > {atol:.0e} + {rtol:.0e} x ref max {scale:.3e}")


def _skew(model, expert_bias: dict):
    for g in model.gates():
        for e, v in expert_bias.items():
            g.bias[e] = v


def run_equivalence_case(rank: int, world: int, dp: int, ep: int, case: dict) -> dict:
    """One case: EP model on this rank vs the single-process reference, for ``case['steps']`` steps.

    case keys: name, model (ModelArgs overrides), steps, accum, capacity_factor, capacity_policy,
    overlap, exchange ("all_to_all" | "per_expert" | "pipelined" | "symmetric"), chunks (pipelined), skew
    ({expert: bias} applied to every gate), max_norm, optim ("sgd" | "adamw"), symm_torch (symmetric: PyTorch
    indexing instead of the interpreted Triton kernels).
    """
    name = case["name"]
    args = tiny_args(**case.get("model", {}))
    steps, accum = case.get("steps", 3), case.get("accum", 1)
    cf, policy = case.get("capacity_factor", 0.0), case.get("capacity_policy", "probs")
    max_norm = case.get("max_norm", 0.05)
    ctx = make_ctx(rank, world, dp, ep)
    torch.manual_seed(0)
    ref = Transformer(args)
    torch.manual_seed(0)
    model = Transformer(args)
    for m in (ref, model):
        _skew(m, case.get("skew", {}))
    if cf > 0:
        apply_capacity(ref, cf, policy)
    from moetrain.parallel.symm_exchange import SymmBuffer
    SymmBuffer.cpu_kernels = not case.get("symm_torch", False)  # symmetric on CPU: the Triton kernels or indexing
    grad_sync = apply_ep(model, ctx, capacity_factor=cf, capacity_policy=policy,
                         overlap=case.get("overlap", True), exchange=case.get("exchange", "all_to_all"),
                         chunks=case.get("chunks", 4))
    # SGD + momentum keeps EP-vs-reference differences at float noise (~3e-7 of a tensor's scale) and is
    # linear in the gradients (a gradient-scale bug shows in the parameters). Adam normalises tiny
    # gradients, which amplifies that noise to ~1e-5 (eps=1e-6) .. 1e-4 (eps=1e-8): looser tolerance.
    if case.get("optim", "sgd") == "sgd":
        opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        tol = 1e-5
    else:
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-6)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-6)
        tol = 1e-4
    expert_names = set(expert_parameter_names(model))
    ref_params = dict(ref.named_parameters())
    El = args.n_routed_experts // ep
    lo = ctx.mesh.get_local_rank("ep") * El
    summary = {"name": name, "losses": [], "dropped": []}
    for step in range(steps):
        data = _batch(step, world * accum * B, args.vocab_size)
        # reference: the global objective, mean over ranks and micro-batches, one rank chunk at a time
        ref_total = 0.0
        for r in range(world):
            for a in range(accum):
                chunk = data[(r * accum + a) * B:(r * accum + a + 1) * B]
                loss = _loss(ref, chunk)
                (loss / (world * accum)).backward()
                ref_total += loss.item() / (world * accum)
        total = torch.zeros(())
        for a in range(accum):
            chunk = data[(rank * accum + a) * B:(rank * accum + a + 1) * B]
            loss = _loss(model, chunk)
            (loss / accum).backward()
            total += loss.detach() / accum
        grad_sync()
        mean_loss = all_reduce_sum(total.clone()).item() / world
        if not math.isclose(mean_loss, ref_total, rel_tol=1e-5, abs_tol=1e-6):
            raise AssertionError(f"{name} step {step}: loss {mean_loss} vs reference {ref_total}")
        summary["losses"].append(mean_loss)
        for n, p in model.named_parameters():
            rp = ref_params[n]
            if n in expert_names:
                _close(f"{name} step {step} grad {n} (local shard)", p.grad, rp.grad[lo:lo + El], tol, 1e-7)
                _close(f"{name} step {step} grad {n} (gathered)", _gather_experts(p.grad, ctx), rp.grad,
                       tol, 1e-7)
            else:
                _close(f"{name} step {step} grad {n}", p.grad, rp.grad, tol, 1e-7)
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        norm = clip_grad_norm(model, max_norm, ctx)
        _close(f"{name} step {step} grad norm", norm, norm_ref, 1e-5, 1e-7)
        stats = moe_telemetry(model, reduce=all_reduce_sum, hist=True)
        ref_stats = moe_telemetry(ref, hist=True)
        for k in ("moe/load_imbalance", "moe/load_cv", "moe/dropped_frac"):
            if not math.isclose(stats[k], ref_stats[k], rel_tol=1e-6, abs_tol=1e-9):
                raise AssertionError(f"{name} step {step}: {k} {stats[k]} vs reference {ref_stats[k]}")
        hk = [k for k in stats if k.startswith("moe/load_hist/")]
        if not hk or any(stats[k] != ref_stats[k] for k in hk):
            raise AssertionError(f"{name} step {step}: load histograms differ")
        summary["dropped"].append(stats["moe/dropped_frac"])
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
        ref.update_expert_biases()
        model.update_expert_biases(reduce=all_reduce_sum)
    for n, p in model.named_parameters():
        rp = ref_params[n].detach()
        full = _gather_experts(p.detach(), ctx) if n in expert_names else p.detach()
        _close(f"{name} param {n} after {steps} steps", full, rp, tol, 1e-7)
    for i, (g, rg) in enumerate(zip(model.gates(), ref.gates())):
        _close(f"{name} gate {i} bias", g.bias, rg.bias, 0, 1e-6)
    return summary


def run_equivalence_cases(rank: int, world: int, layouts: list, cases: list) -> list:
    out = []
    for dp, ep in layouts:
        for case in cases:
            out.append(run_equivalence_case(rank, world, dp, ep, case))
    return out


# --------------------------------------------------------------------------------------------
# Dispatcher-level checks: per-expert scaling makes a misrouted row visible
# --------------------------------------------------------------------------------------------

def _scaled_experts(x, tpe, lo):
    """Local 'expert' j multiplies its rows by (global id + 1)."""
    scale = torch.repeat_interleave(torch.arange(tpe.numel(), dtype=x.dtype) + lo + 1, tpe,
                                    output_size=x.shape[0])
    return x * scale.unsqueeze(1)


def _symm_capacity(disp) -> int:
    """The capacity of a symmetric-exchange dispatcher's own dispatch buffer (0 before its first dispatch)."""
    return max([b.capacity for b in disp._symm_buffers.values()], default=0)


def run_dispatcher_edge_cases(rank: int, world: int) -> dict:
    """Zero tokens sent by a rank, zero tokens received by a rank, all tokens to one expert, overlap on
    and off; forward and gradients vs the closed form ``y = sum_k w_k (id_k + 1) x``."""
    E, K, D = 8, 2, 5
    group = dist.new_group(list(range(world)))
    El = E // world
    results = {}
    symm_disp = AllToAllDispatcher(E, group, overlap=False, exchange="symmetric")  # one layer: its buffer persists
    cases = {
        "rank0_sends_nothing": lambda n, g: (0 if rank == 0 else n, None),
        "only_rank0_experts": lambda n, g: (n, torch.stack([torch.randperm(El, generator=g)[:K]
                                                            for _ in range(n)]) if n else None),
        "all_to_expert_5": lambda n, g: (n, None),
        "random": lambda n, g: (n, None),
        "many_tokens": lambda n, g: (5 * n, None),  # symmetric: more rows than its buffer holds -> grow, push again
    }
    for cname, make in cases.items():
        for overlap, exchange in ((True, "all_to_all"), (False, "all_to_all"), (True, "per_expert"),
                                  (False, "per_expert"), (False, "pipelined"), (False, "pipelined_triton"),
                                  (False, "symmetric")):
            g = torch.Generator().manual_seed(10 * rank + 1)
            n, ids = make(7 + rank, g)
            k = 1 if cname == "all_to_expert_5" else K
            if ids is None:
                ids = (torch.full((n, 1), 5, dtype=torch.int64) if cname == "all_to_expert_5"
                       else torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n)])
                       if n else torch.zeros(0, k, dtype=torch.int64))
            x = torch.randn(n, D, generator=g, requires_grad=True)
            w = torch.rand(n, k, generator=g, requires_grad=True)
            disp = (symm_disp if exchange == "symmetric" else
                    AllToAllDispatcher(E, group, overlap=overlap, exchange=exchange.removesuffix("_triton"), chunks=3))
            if exchange == "pipelined_triton":  # the Triton row passes (interpreted on CPU)
                from kernels.permute import RowOps
                disp.row_ops = RowOps
            cap0 = _symm_capacity(disp) if exchange == "symmetric" else None
            st = disp.dispatch(x, ids, w)
            if cap0 is not None:
                results[f"{cname}/symmetric_capacity"] = (cap0, _symm_capacity(disp))
            if overlap and st.pending is None:
                raise AssertionError(f"{cname}: overlap=True but no pending all-to-all after dispatch")
            ex, tpe = disp.wait(st)
            if tpe.numel() != El or int(tpe.sum()) != ex.shape[0]:
                raise AssertionError(f"{cname}: tokens_per_expert {tpe.tolist()} vs {ex.shape[0]} rows")
            y = disp.combine(_scaled_experts(ex, tpe, disp.ep_rank * El), st)
            gy = torch.randn(n, D, generator=g)
            (y * gy).sum().backward()
            xr = x.detach().clone().requires_grad_(True)
            wr = w.detach().clone().requires_grad_(True)
            yr = ((wr * (ids.float() + 1)).unsqueeze(-1) * xr.unsqueeze(1)).sum(1) if n else xr * 0
            (yr * gy).sum().backward()
            tag = f"{cname} overlap={overlap} {exchange}"
            _close(f"{tag} y", y, yr, 1e-5, 1e-6)
            _close(f"{tag} dx", x.grad, xr.grad, 1e-5, 1e-6)
            if n:
                _close(f"{tag} dw", w.grad, wr.grad, 1e-5, 1e-6)
            results[f"{cname}/{overlap}/{exchange}"] = int(ex.shape[0])
    return results


def run_overlap_order_check(rank: int, world: int) -> dict:
    """In MoE.forward the shared experts run while the token all-to-all is still pending (launched with
    async_op=True by dispatch, waited in wait); in the backward their gradient runs while the reverse
    all-to-all of the gradient rows is pending (launched by _AllToAllWait's backward, waited by
    _AllToAllStart's). Output and input gradient equal the overlap=False path."""
    ctx = make_ctx(rank, world, 1, world)
    args = tiny_args(n_layers=1, n_dense_layers=0)
    torch.manual_seed(0)
    model = Transformer(args)
    apply_ep(model, ctx)
    moe = model.moe_layers()[0]
    disp = moe.dispatcher
    seen = {"pending": [], "fwd_in_flight": [], "bwd_in_flight": []}
    orig_dispatch = disp.dispatch

    def dispatch(*a, **k):
        st = orig_dispatch(*a, **k)
        seen["pending"].append(st.pending)   # None when overlap=False (waited inside dispatch)
        return st

    def in_flight(kind):
        p = seen["pending"][-1]
        return p is not None and (p.work if kind == "fwd" else p.bwd_work) is not None

    disp.dispatch = dispatch
    moe.shared_experts.register_forward_pre_hook(lambda m, inp: seen["fwd_in_flight"].append(in_flight("fwd")))
    moe.shared_experts.register_full_backward_pre_hook(
        lambda m, g: seen["bwd_in_flight"].append(in_flight("bwd")))
    x0 = torch.randn(2, 8, args.dim, generator=torch.Generator().manual_seed(rank))
    results = []
    for overlap in (True, False):
        disp.overlap = overlap
        x = x0.clone().requires_grad_(True)
        y = moe(x)
        y.square().sum().backward()
        results.append((y.detach(), x.grad))
    if seen["fwd_in_flight"] != [True, False]:
        raise AssertionError(f"a2a in flight during the shared experts' forward: {seen['fwd_in_flight']}")
    if seen["bwd_in_flight"] != [True, False]:
        raise AssertionError(f"reverse a2a in flight during the shared experts' backward: {seen['bwd_in_flight']}")
    _close("overlap vs sync y", results[0][0], results[1][0], 0, 0)
    _close("overlap vs sync dx", results[0][1], results[1][1], 0, 0)
    return {"fwd": seen["fwd_in_flight"], "bwd": seen["bwd_in_flight"]}


# --------------------------------------------------------------------------------------------
# Checkpoint resharding
# --------------------------------------------------------------------------------------------

CKPT_ARGS = dict(n_routed_experts=8)


def _trained_model(ctx, steps=2):
    """A model at layout ``ctx`` after ``steps`` AdamW steps on fixed data (moments non-trivial)."""
    args = tiny_args(**CKPT_ARGS)
    torch.manual_seed(0)
    model = Transformer(args)
    grad_sync = apply_ep(model, ctx) if ctx.ep > 1 or ctx.world_size > 1 else (lambda: None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        data = _batch(step, ctx.world_size * B, args.vocab_size)
        _loss(model, data[ctx.rank * B:(ctx.rank + 1) * B]).backward()
        grad_sync()
        opt.step()
        opt.zero_grad()
    return model, opt


def _fresh_model(ctx):
    args = tiny_args(**CKPT_ARGS)
    torch.manual_seed(123)  # different weights: everything must come from the checkpoint
    model = Transformer(args)
    if ctx.ep > 1 or ctx.world_size > 1:
        apply_ep(model, ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def full_state(model, opt, ctx) -> dict:
    """{name: full tensor} for every parameter, its exp_avg / exp_avg_sq and gate biases (experts
    gathered over the ep group)."""
    experts = set(expert_parameter_names(model))
    out = {}
    for n, p in model.named_parameters():
        st = opt.state[p]
        for key, t in (("param", p.detach()), ("exp_avg", st["exp_avg"]), ("exp_avg_sq", st["exp_avg_sq"])):
            out[f"{key}:{n}"] = (_gather_experts(t, ctx) if n in experts else t).clone()
    for i, g in enumerate(model.gates()):
        out[f"bias:{i}"] = g.bias.clone()
    return out


def save_worker(rank: int, world: int, dp: int, ep: int, run_dir: str, ref_file: str) -> int:
    from moetrain import checkpoint as ckpt
    ctx = make_ctx(rank, world, dp, ep)
    model, opt = _trained_model(ctx)
    ckpt.save_checkpoint(run_dir, 2, model, opt, {"note": "ep test"})
    state = full_state(model, opt, ctx)
    if rank == 0:
        torch.save(state, ref_file)
    return len(state)


def load_worker(rank: int, world: int, layouts: list, ckpt_dir: str, ref_file: str) -> list:
    from moetrain import checkpoint as ckpt
    ref = torch.load(ref_file, weights_only=True)
    checked = []
    for dp, ep in layouts:
        ctx = make_ctx(rank, world, dp, ep)
        model, opt = _fresh_model(ctx)
        ckpt.load_checkpoint(ckpt_dir, model, opt)
        got = full_state(model, opt, ctx)
        if sorted(got) != sorted(ref):
            raise AssertionError(f"dp={dp} ep={ep}: keys differ: {set(got) ^ set(ref)}")
        for k in ref:
            if not torch.equal(got[k], ref[k]):
                raise AssertionError(f"dp={dp} ep={ep}: {k} differs after load "
                                     f"(max err {(got[k] - ref[k]).abs().max().item():.3e})")
        checked.append((dp, ep, len(ref)))
    return checked


def load_single(ckpt_dir: str, ref_file: str) -> int:
    """Loads the checkpoint in this process without a process group (ep = 1, all experts)."""
    from moetrain import checkpoint as ckpt
    ref = torch.load(ref_file, weights_only=True)
    ctx = DistContext()
    model, opt = _fresh_model(ctx)
    ckpt.load_checkpoint(ckpt_dir, model, opt)
    got = full_state(model, opt, ctx)
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    return len(ref)



def run_symmetric_two_forwards(rank: int, world: int) -> dict:
    """The symmetric exchange keeps a layer's received rows in the layer's buffer until its backward: a second
    forward of the same layer before that backward, or a second backward, must raise (not compute on stale rows)."""
    E, K, D = 4, 2, 3
    group = dist.new_group(list(range(world)))
    disp = AllToAllDispatcher(E, group, overlap=False, exchange="symmetric")
    g = torch.Generator().manual_seed(rank)
    out = {}

    def fwd():
        x = torch.randn(5, D, generator=g, requires_grad=True)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(5)])
        st = disp.dispatch(x, ids, torch.rand(5, K, generator=g))
        ex, _ = disp.wait(st)
        return disp.combine(ex * 2.0, st)

    y1 = fwd()
    fwd()
    try:
        y1.sum().backward()
        out["two_forwards"] = "no error"
    except RuntimeError as e:
        out["two_forwards"] = str(e)
    y3 = fwd()
    y3.sum().backward(retain_graph=True)
    try:
        y3.sum().backward()
        out["second_backward"] = "no error"
    except RuntimeError as e:
        out["second_backward"] = str(e)
    return out


def run_symmetric_shm_full(rank: int, world: int) -> str:
    """/dev/shm too small on one rank (simulated): every rank raises the same one-line UnavailableFeature."""
    import os as _os
    import types

    from moetrain.parallel import symm_exchange
    real = _os.statvfs

    def statvfs(path):
        st = real(path)
        return types.SimpleNamespace(f_bavail=0 if rank == 1 else st.f_bavail, f_frsize=st.f_frsize)

    symm_exchange.os.statvfs = statvfs
    try:
        group = dist.new_group(list(range(world)))
        disp = AllToAllDispatcher(4, group, overlap=False, exchange="symmetric")
        ids = torch.tensor([[0, 3], [1, 2]])
        try:
            disp.dispatch(torch.randn(2, 3), ids, torch.rand(2, 2))
        except RuntimeError as e:
            return f"{type(e).__name__}: {e}"
        return "no error"
    finally:
        symm_exchange.os.statvfs = real


def run_dispatcher_edge_cases_symm_torch(rank: int, world: int) -> dict:
    """run_dispatcher_edge_cases with the symmetric exchange's CPU transfers on PyTorch indexing (not the kernels)."""
    from moetrain.parallel.symm_exchange import SymmBuffer
    SymmBuffer.cpu_kernels = False
    return run_dispatcher_edge_cases(rank, world)
