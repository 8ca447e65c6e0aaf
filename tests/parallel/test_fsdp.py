"""Opt-in FSDP2 (``parallel.fsdp=true``) matches the single-process model (CPU, gloo, 2 ranks).

Each rank builds the single-process reference itself (same seed, same global batch: the reference runs
every rank's micro-batches and averages, the objective the ranks optimise together) and runs the real
path -- ``parallelize`` (FSDP2 over the world; at ep=2 experts sharded by EP and ignored by FSDP),
``build_optimizer`` (AdamW), the native engine (``micro_batch(last)`` -> ``set_requires_gradient_sync``,
``backward``, ``step``: grad sync, global-norm clipping, optimizer) -- with 2 micro-batches and clipping
active. At every step: the mean loss and the pre-clip grad norm; after every step every parameter
(DTensors gathered with ``full_tensor``, expert shards all-gathered over the ep group).
The trainer test saves with FSDP at world 2 and resumes in one process on the single-process curve.
"""
from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.parallel import workers
from tests.parallel._dist import run_workers
from tests.trainer_runs import run_trainer, step_records, train_args


def _full(p, ctx, experts: set, name: str) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    t = p.detach()
    if isinstance(t, DTensor):
        return t.full_tensor()
    return workers._gather_experts(t, ctx) if name in experts else t


def run_fsdp_case(rank: int, world: int, dp: int, ep: int, steps: int = 3, accum: int = 2) -> dict:
    from moetrain.config import load_config
    from moetrain.model.transformer import Transformer
    from moetrain.parallel.engine import build_engine
    from moetrain.parallel.expert_parallel import expert_parameter_names
    from moetrain.parallel.parallelize import parallelize
    from moetrain.train import build_optimizer

    name = f"fsdp dp={dp} ep={ep}"
    cfg = load_config(None, ["parallel.fsdp=true", f"parallel.ep={ep}", "train.grad_clip=0.05", "train.lr=1e-2",
                             "train.eps=1e-6", "precision.dtype=fp32"])
    ctx = workers.make_ctx(rank, world, dp, ep)
    args = workers.tiny_args()
    torch.manual_seed(0)
    ref = Transformer(args)
    torch.manual_seed(0)
    model, raw, grad_sync = parallelize(Transformer(args), cfg, ctx)
    engine = build_engine(cfg, ctx, model, raw, build_optimizer(raw, cfg), grad_sync, workers.B, accum)
    assert getattr(raw, "fsdp_mesh", None) is not None, "parallel.fsdp=true did not apply FSDP"
    opt_ref = build_optimizer(ref, cfg)
    experts = set(expert_parameter_names(raw)) if ep > 1 else set()
    n_dtensor = sum(type(p).__name__ == "DTensor" for p in raw.parameters())
    n_plain = sum(type(p).__name__ != "DTensor" for p in raw.parameters())
    assert n_plain == len(experts), f"{name}: {n_plain} plain parameters, {len(experts)} expert shards"
    ref_params = dict(ref.named_parameters())
    out = {"losses": [], "norms": [], "dtensor_params": n_dtensor, "expert_params": len(experts)}
    for step in range(steps):
        data = workers._batch(step, world * accum * workers.B, args.vocab_size)
        ref_total = 0.0
        for r in range(world):
            for a in range(accum):
                chunk = data[(r * accum + a) * workers.B:(r * accum + a + 1) * workers.B]
                loss = workers._loss(ref, chunk)
                (loss / (world * accum)).backward()
                ref_total += loss.item() / (world * accum)
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        total = torch.zeros(())
        norm = None
        for a in range(accum):
            chunk = data[(rank * accum + a) * workers.B:(rank * accum + a + 1) * workers.B]
            with engine.micro_batch(last=a == accum - 1):
                loss = workers._loss(model, chunk)
                engine.backward(loss)
            total += loss.detach() / accum
            norm = engine.step()
        assert norm is not None
        mean_loss = workers.all_reduce_sum(total.clone()).item() / world
        if not math.isclose(mean_loss, ref_total, rel_tol=1e-5, abs_tol=1e-6):
            raise AssertionError(f"{name} step {step}: loss {mean_loss} vs reference {ref_total}")
        workers._close(f"{name} step {step} grad norm", norm, norm_ref, 1e-5, 1e-7)
        for n, p in raw.named_parameters():
            workers._close(f"{name} step {step} param {n}", _full(p, ctx, experts, n), ref_params[n].detach(),
                           1e-4, 1e-7)
        out["losses"].append(mean_loss)
        out["norms"].append(float(norm))
    return out


def run_fsdp_cases(rank: int, world: int, layouts: list) -> list:
    return [run_fsdp_case(rank, world, dp, ep) for dp, ep in layouts]


@pytest.mark.timeout(150)
def test_fsdp_ep1_and_ep2_match_single_process():
    out = run_workers(run_fsdp_cases, 2, [(2, 1), (1, 2)], timeout=140)
    ep1, ep2 = out[0]
    assert ep1["expert_params"] == 0 and ep2["expert_params"] > 0 and ep1["dtensor_params"] > ep2["dtensor_params"]
    assert all(n > 0.05 for n in ep1["norms"])  # clipping was active
    assert out[0] == out[1]


def _local(t) -> torch.Tensor:
    return t.to_local() if type(t).__name__ == "DTensor" else t


def run_fused_clip_case(rank: int, world: int, dp: int, ep: int, steps: int = 4) -> list:
    """Fused AdamW with clipping on: the native engine (norm only, ``optimizer.grad_scale = 1 / coef``) against
    the multiply path (``clip_grad_norm`` then ``optimizer.step()``) on the same rank-local model; clipping
    active on even steps and inactive on odd ones (loss scaled by 1e-4). No FSDP layout: torch's fused AdamW does
    not run on FSDP2's DTensor parameters ("got mixed torch.Tensor and DTensor"); FSDP keeps the multiply path."""
    from moetrain.config import load_config
    from moetrain.model.transformer import Transformer
    from moetrain.parallel.engine import build_engine
    from moetrain.parallel.grad_sync import clip_grad_norm
    from moetrain.parallel.parallelize import parallelize
    from moetrain.train import build_optimizer

    name = f"fused clip dp={dp} ep={ep}"
    cfg = load_config(None, [f"parallel.ep={ep}", "train.grad_clip=0.05", "train.lr=1e-2",
                             "train.optimizer_impl=fused", "precision.dtype=fp32"])
    ctx = workers.make_ctx(rank, world, dp, ep)
    args = workers.tiny_args()
    torch.manual_seed(0)
    model, raw, grad_sync = parallelize(Transformer(args), cfg, ctx)
    opt = build_optimizer(raw, cfg)
    engine = build_engine(cfg, ctx, model, raw, opt, grad_sync, workers.B, 1)
    torch.manual_seed(0)
    model_ref, raw_ref, grad_sync_ref = parallelize(Transformer(args), cfg, ctx)
    opt_ref = build_optimizer(raw_ref, cfg)
    assert all(g["fused"] for g in opt.param_groups), name
    scales = []
    inner = opt.step

    def spy(*a, **k):
        scales.append(getattr(opt, "grad_scale", None))
        return inner(*a, **k)
    opt.step = spy

    def loss_of(m, r, tokens):  # DDP (dp=2) wraps the model: the aux loss is the plain model's
        logits = m(tokens[:, :-1]).float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)) + r.aux_loss()

    norms = []
    for step in range(steps):
        data = workers._batch(step, world * workers.B, args.vocab_size)[rank * workers.B:(rank + 1) * workers.B]
        factor = 1.0 if step % 2 == 0 else 1e-4
        with engine.micro_batch(last=True):
            engine.backward(loss_of(model, raw, data) * factor)
        norm = engine.step()
        (loss_of(model_ref, raw_ref, data) * factor).backward()
        grad_sync_ref()
        norm_ref = clip_grad_norm(raw_ref, 0.05, ctx)
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        assert not hasattr(opt, "grad_scale"), name
        # step 0: identical parameters and gradients, so the same norm to the bit; later steps start from parameters
        # that differ in the last bits (below), and so do their gradients: the norms agree to rtol 1e-5
        if step == 0:
            assert torch.equal(norm, norm_ref), f"{name} step {step}: norm {norm} vs {norm_ref}"
        else:
            torch.testing.assert_close(norm, norm_ref, rtol=1e-5, atol=0, msg=f"{name} step {step}: norm")
        coef = (0.05 / (norm + 1e-6)).clamp(max=1.0)  # what clip_grad_norm would multiply by, from this norm
        assert torch.equal(scales[-1], coef.reciprocal()), f"{name} step {step}: grad_scale {scales[-1]}"
        # g / (1 / coef) and g * coef differ in the last bit; later steps amplify that (Adam normalises the 1e-4-scaled
        # gradients of the odd steps back to O(1) updates; how far depends on the CPU's matmul kernels: 1.7e-5 of
        # the tensor's scale seen at step 3): rtol 1e-4 of each tensor's scale (workers._close). A wrong coefficient
        # is off by O(1): exp_avg is linear in the gradients, and the coefficient changes from step to step
        for (n, p), p_ref in zip(raw.named_parameters(), raw_ref.parameters()):
            for what, a, b in [("param", p, p_ref)] + [(k, opt.state[p][k], opt_ref.state[p_ref][k])
                                                       for k in ("exp_avg", "exp_avg_sq")]:
                workers._close(f"{name} step {step} {what} {n}", _local(a.detach()), _local(b.detach()),
                               1e-5 if step == 0 else 1e-4, 0)
        norms.append(float(norm))
    return norms


def run_fused_clip_cases(rank: int, world: int, layouts: list) -> list:
    return [run_fused_clip_case(rank, world, *layout) for layout in layouts]


@pytest.mark.timeout(150)
def test_fused_adamw_clip_via_grad_scale_matches_multiply_path():
    """ep=2 (expert-parallel norm, all-reduced over the ep group) and dp=2 (DDP): the same norms, parameters and
    moments as the multiply path."""
    out = run_workers(run_fused_clip_cases, 2, [(1, 2), (2, 1)], timeout=140)
    for norms in out[0]:
        assert norms[0] > 0.05 and norms[1] < 0.05  # clipping active, then not
    assert out[0] == out[1]


def _step2_only(src, dst):
    """Copies ``src``'s checkpoints to ``dst`` keeping only step 2 (resume=auto then starts there)."""
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    for ckpt in (dst / "checkpoints").iterdir():
        if not ckpt.name.endswith("0000002"):
            shutil.rmtree(ckpt)


@pytest.mark.timeout(300)
def test_trainer_fsdp_world2_matches_single_and_resumes_across_layouts(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader
    cache = tmp_path / "cache"
    extra = ("train.steps=4", "train.log_every=1", "train.eval_every=0", "train.batch_size=8",
             "checkpoint.at_end=false", "checkpoint.every=2")
    fsdp_args = ("parallel.fsdp=true", "parallel.ep=2", "train.micro_batch_size=2")  # 2 micro-batches per rank
    single = tmp_path / "single"
    run_trainer(train_args(single, cache, *extra), timeout=120)
    fsdp = tmp_path / "fsdp"
    run_trainer(train_args(fsdp, cache, *extra, *fsdp_args), nproc=2, timeout=150)
    a, b = step_records(single), step_records(fsdp)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4), step
    # the dense weights were saved as FSDP shards (one chunk per rank), the experts at their global shape
    meta = FileSystemReader(str(fsdp / "checkpoints" / "step_0000002")).read_metadata().state_dict_metadata
    assert len(meta["model.embed.weight"].chunks) == 2
    assert meta["model.layers.1.ffn.experts.w1"].size[0] == 8
    # saved with FSDP at world 2 (ep=2) -> resumed in one process; and the reverse
    for src, dst, nproc, more in ((fsdp, tmp_path / "to_single", 1, ()),
                                  (single, tmp_path / "to_fsdp", 2, fsdp_args)):
        _step2_only(src, dst)
        out = run_trainer(train_args(dst, cache, *extra, *more), nproc=nproc, timeout=150)
        assert "resumed from" in out.stdout, dst
        c = step_records(dst)
        assert sorted(c) == [3, 4], dst
        for step in (3, 4):
            assert c[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), (dst, step)


def test_fsdp_config():
    from moetrain.config import ConfigError, load_config
    assert load_config(None, []).parallel.fsdp is False
    with pytest.raises(ConfigError, match="parallel.fsdp"):
        load_config(None, ["parallel.fsdp=true", "parallel.engine=deepspeed"])
