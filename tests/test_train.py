"""The trainer end to end on CPU: metrics, checkpoints, kill-and-resume, SIGTERM, torchrun data parallel."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moetrain.config import load_config
from moetrain.train import lr_at, main
from tests.trainer_runs import ROOT, clean_env, losses, run_trainer, train_args

REQUIRED = ("step", "tokens", "loss", "lr", "grad_norm", "perf/tokens_per_s", "perf/mfu", "cost/gpu_hours",
            "cost/usd", "moe/aux_loss", "moe/load_imbalance")


def test_lr_schedule_warmup_and_decay():
    cfg = load_config(None, ["train.lr=1.0", "train.warmup_steps=10", "train.steps=110", "train.min_lr_ratio=0.1"])
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_debug_run_writes_metrics_config_and_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, tmp_path / "cache", "train.log_every=1")) == 0
    out = capsys.readouterr().out
    assert "val/loss" in out and "$" in out and "MLA cache" in out
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    for key in REQUIRED:
        assert key in steps[-1], key
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert any("val/loss" in r for r in records)
    # evaluation lines carry cost but no throughput (their window trained no tokens)
    assert all("perf/tokens_per_s" not in r and "cost/usd" in r for r in records if "val/loss" in r)
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "step_0000020" / "trainer.json").is_file()
    # the same command again: the run is complete, nothing is trained, logged or appended
    before = {f: (run / f).read_text() for f in ("metrics.jsonl", "run.json")}
    assert main(train_args(run, tmp_path / "cache", "train.log_every=1")) == 0
    assert "is complete at step 20 (train.steps=20): nothing to do" in capsys.readouterr().out
    assert {f: (run / f).read_text() for f in before} == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000020"]


def _spawn(run_dir: Path, cache: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moetrain.train", *train_args(run_dir, cache, *extra)],
                            cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"trainer exited early: {proc.stdout.read()}")
        if metrics.is_file() and any(json.loads(l).get("step", 0) >= step for l in metrics.read_text().splitlines()
                                     if l.strip()):
            return
        time.sleep(0.05)
    pytest.fail("trainer did not reach the step in time")


STEPS = ("train.steps=16", "train.log_every=1", "train.eval_every=0", "checkpoint.every=4")


def test_kill_and_resume_gives_the_same_losses(tmp_path):
    cache = tmp_path / "cache"
    ref = tmp_path / "ref"
    run_trainer(train_args(ref, cache, *STEPS))
    run = tmp_path / "killed"
    killed = run_trainer(train_args(run, cache, *STEPS), env=clean_env(MOETRAIN_KILL_AT_STEP="10"), check=False)
    assert killed.returncode == -signal.SIGKILL
    assert max(losses(run)) == 10  # it logged past its last checkpoint (step 8) before dying
    assert not any(p.name.endswith(".tmp") and (p / "trainer.json").exists()
                   for p in (run / "checkpoints").iterdir())
    resumed = run_trainer(train_args(run, cache, *STEPS))
    assert "resumed from" in resumed.stdout
    a, b = losses(ref), losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


def test_sigterm_stops_with_a_checkpoint_and_resume_continues(tmp_path):
    cache = tmp_path / "cache"
    run = tmp_path / "run"
    proc = _spawn(run, cache, "train.steps=400", "train.log_every=1", "train.eval_every=0")
    _wait_for_step(run, proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM" in out
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert ckpts and not ckpts[-1].name.endswith(".tmp")
    stopped_at = json.loads((ckpts[-1] / "trainer.json").read_text())["step"]
    assert 3 <= stopped_at < 400
    resumed = run_trainer(train_args(run, cache, f"train.steps={stopped_at + 2}", "train.log_every=1",
                                     "train.eval_every=0"))
    assert f"resumed from {ckpts[-1]}" in resumed.stdout
    assert f"note: train.steps 400 -> {stopped_at + 2} since that checkpoint" in resumed.stdout
    assert max(losses(run)) == stopped_at + 2


def test_torchrun_two_process_data_parallel_matches_single(tmp_path):
    cache = tmp_path / "cache"
    single = tmp_path / "single"
    extra = ("train.steps=6", "train.log_every=1", "train.eval_every=0", "checkpoint.at_end=false")
    run_trainer(train_args(single, cache, *extra))
    ddp = tmp_path / "ddp"
    run_trainer(train_args(ddp, cache, *extra), nproc=2)
    a, b = losses(single), losses(ddp)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step


def test_resume_never_refuses_a_used_run_dir_and_a_misfit_checkpoint_is_one_line(tmp_path, capsys):
    cache, run = tmp_path / "cache", tmp_path / "run"
    assert main(train_args(run, cache, "train.steps=2", "train.eval_every=0")) == 0
    capsys.readouterr()
    assert main(train_args(run, cache, "train.steps=4", "resume=never")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: resume=never:") and "\n" not in err, err
    assert main(train_args(run, cache, "train.steps=4", "model.n_routed_experts=16")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: resume:") and "does not fit this run" in err and "\n" not in err
    assert max(losses(run)) == 2  # nothing was overwritten
