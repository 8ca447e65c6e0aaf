"""The trainer with expert parallelism (torchrun, CPU, gloo): losses match the single-process run, the
EP telemetry is logged, and an ep=2 checkpoint resumes in one process (ep=1) on the same curve.

By hand (4 ranks, same losses):
    torchrun --standalone --nproc-per-node 4 -m moetrain.train --config configs/debug.yaml parallel.ep=4 ...
"""

import pytest

from tests.trainer_runs import run_trainer, step_records, train_args

EXTRA = ("train.steps=6", "train.log_every=1", "train.eval_every=0")


def _single(run_dir, cache, *extra):
    return run_trainer(train_args(run_dir, cache, *extra), timeout=150)


def _torchrun(n, run_dir, cache, *extra):
    return run_trainer(train_args(run_dir, cache, *extra), nproc=n, timeout=150)


@pytest.mark.timeout(400)
def test_torchrun_ep2_matches_single_and_resumes_at_ep1(tmp_path):
    cache = tmp_path / "cache"
    single = tmp_path / "single"
    _single(single, cache, *EXTRA, "checkpoint.at_end=false")
    ep2 = tmp_path / "ep2"
    _torchrun(2, ep2, cache, *EXTRA, "parallel.ep=2", "checkpoint.at_end=false")
    a, b = step_records(single), step_records(ep2)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4), step
        assert b[step]["moe/load_imbalance"] == pytest.approx(a[step]["moe/load_imbalance"], rel=1e-5), step
        assert b[step]["perf/a2a_bytes"] > 0 and b[step]["perf/a2a_ms"] >= 0
        assert b[step]["moe/dropped_frac"] == 0.0
    hist = b[6]["moe/load_hist/layer_1"]
    assert hist == a[6]["moe/load_hist/layer_1"] and len(hist) == 8 and sum(hist) > 0
    # save at ep=2 (the per-expert exchange) after 4 steps, resume in one process (ep=1, all experts local)
    resumed = tmp_path / "resumed"
    _torchrun(2, resumed, cache, "train.steps=4", "train.log_every=1", "train.eval_every=0", "parallel.ep=2",
              "parallel.ep_exchange=per_expert")
    out = _single(resumed, cache, *EXTRA, "checkpoint.at_end=false")
    assert "resumed from" in out.stdout
    c = step_records(resumed)
    for step in range(1, 7):
        assert c[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step


def test_capacity_and_ep_config_errors():
    from moetrain.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="parallel.capacity_policy"):
        load_config(None, ["parallel.capacity_policy=random"])
    with pytest.raises(ConfigError, match="parallel.capacity_factor"):
        load_config(None, ["parallel.capacity_factor=-1"])
    with pytest.raises(ConfigError, match="parallel.ep_exchange"):
        load_config(None, ["parallel.ep_exchange=p2p"])
    with pytest.raises(ConfigError, match="parallel.ep_chunks"):
        load_config(None, ["parallel.ep_exchange=pipelined", "parallel.ep_chunks=0"])
    assert load_config(None, ["parallel.ep_exchange=pipelined", "parallel.ep_chunks=8"]).parallel.ep_chunks == 8
    with pytest.raises(ConfigError, match="parallel.ep_chunks=65: at most 64"):
        load_config(None, ["parallel.ep_chunks=65"])
    cfg = load_config(None, ["parallel.capacity_factor=1.25", "parallel.capacity_policy=position"])
    assert cfg.parallel.capacity_factor == 1.25


def test_symmetric_exchange_on_gpus_needs_nccl():
    """parallel.ep_exchange=symmetric on CUDA without NCCL: a one-line UnavailableFeature naming the fix (the trainer
    turns it into exit code 2), raised before any expert is sharded. (On CPU / gloo it runs: see below.)"""
    import types

    import torch

    from moetrain.config import load_config
    from moetrain.parallel.parallelize import UnavailableFeature, parallelize
    cfg = load_config(None, ["parallel.ep=2", "parallel.ep_exchange=symmetric"])
    ctx = types.SimpleNamespace(ep=2, dp=1, device=torch.device("cuda", 0), backend="gloo", distributed=True)
    with pytest.raises(UnavailableFeature, match="ep_exchange=symmetric on GPUs needs the NCCL backend.*pipelined"):
        parallelize(torch.nn.Linear(2, 2), cfg, ctx)


@pytest.mark.timeout(300)
def test_torchrun_ep2_symmetric_exchange_matches_single(tmp_path):
    """The symmetric exchange on CPU (gloo, buffers in /dev/shm mapped by both ranks) trains on the single-process
    curve, and leaves no buffer file behind."""
    import glob
    before = set(glob.glob("/dev/shm/moetrain-symm-*"))
    cache = tmp_path / "cache"
    single, sym = tmp_path / "single", tmp_path / "sym"
    _single(single, cache, *EXTRA, "checkpoint.at_end=false")
    _torchrun(2, sym, cache, *EXTRA, "parallel.ep=2", "parallel.ep_exchange=symmetric", "checkpoint.at_end=false")
    a, b = step_records(single), step_records(sym)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4), step
        assert b[step]["perf/a2a_bytes"] > 0
    assert set(glob.glob("/dev/shm/moetrain-symm-*")) == before
