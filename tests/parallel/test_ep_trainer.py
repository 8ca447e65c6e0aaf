"""The trainer with expert parallelism (torchrun, CPU, gloo): losses match the single-process run, the
EP telemetry is logged, and an ep=2 checkpoint resumes in one process (ep=1) on the same curve.

By hand (4 ranks, same losses):
    torchrun --standalone --nproc-per-node 4 -m moetrain.train --config configs/debug.yaml parallel.ep=4 ...
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXTRA = ("train.steps=6", "train.log_every=1", "train.eval_every=0")


def _args(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "debug.yaml"), f"run.dir={run_dir}", f"data.cache_dir={cache}",
            "logging.progress=false", *extra]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(cmd: list[str], timeout: float = 150) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _single(run_dir, cache, *extra):
    return _run([sys.executable, "-m", "moetrain.train", *_args(run_dir, cache, *extra)])


def _torchrun(n, run_dir, cache, *extra):
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                 "-m", "moetrain.train", *_args(run_dir, cache, *extra)])


def _records(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec
    return out


@pytest.mark.timeout(400)
def test_torchrun_ep2_matches_single_and_resumes_at_ep1(tmp_path):
    cache = tmp_path / "cache"
    single = tmp_path / "single"
    _single(single, cache, *EXTRA, "checkpoint.at_end=false")
    ep2 = tmp_path / "ep2"
    _torchrun(2, ep2, cache, *EXTRA, "parallel.ep=2", "checkpoint.at_end=false")
    a, b = _records(single), _records(ep2)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4), step
        assert b[step]["moe/load_imbalance"] == pytest.approx(a[step]["moe/load_imbalance"], rel=1e-5), step
        assert b[step]["perf/a2a_bytes"] > 0 and b[step]["perf/a2a_ms"] >= 0
        assert b[step]["moe/dropped_frac"] == 0.0
    hist = b[6]["moe/load_hist/layer_1"]
    assert hist == a[6]["moe/load_hist/layer_1"] and len(hist) == 8 and sum(hist) > 0
    # save at ep=2 after 4 steps, resume in one process (ep=1, all experts local) to step 6
    resumed = tmp_path / "resumed"
    _torchrun(2, resumed, cache, "train.steps=4", "train.log_every=1", "train.eval_every=0", "parallel.ep=2")
    out = _single(resumed, cache, *EXTRA, "checkpoint.at_end=false")
    assert "resumed from" in out.stdout
    c = _records(resumed)
    for step in (5, 6):
        assert c[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step


def test_capacity_and_ep_config_errors():
    from moetrain.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="parallel.capacity_policy"):
        load_config(None, ["parallel.capacity_policy=random"])
    with pytest.raises(ConfigError, match="parallel.capacity_factor"):
        load_config(None, ["parallel.capacity_factor=-1"])
    cfg = load_config(None, ["parallel.capacity_factor=1.25", "parallel.capacity_policy=position"])
    assert cfg.parallel.capacity_factor == 1.25
