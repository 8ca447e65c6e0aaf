"""Helpers for tests that run the trainer as a subprocess (single process or torchrun on CPU/gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """benchmarks/<name>.py imported as a module (the benchmarks folder is not a package), for tests of its
    pure functions."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_args(run_dir: Path, cache: Path, *extra: str, config: str = "debug") -> list[str]:
    """CLI arguments of a quiet run of ``configs/<config>.yaml`` in ``run_dir`` with data cached in ``cache``."""
    return ["--config", str(ROOT / "configs" / f"{config}.yaml"), f"run.dir={run_dir}", f"data.cache_dir={cache}",
            "logging.progress=false", *extra]


def clean_env(**extra: str) -> dict:
    """This environment, one thread per process, unbuffered, without a surrounding torchrun's variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run_trainer(args: list[str], nproc: int = 1, env: dict | None = None, timeout: float = 300,
                check: bool = True) -> subprocess.CompletedProcess:
    """``python -m moetrain.train ARGS`` (nproc == 1) or the same under ``torchrun --nproc-per-node nproc``."""
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *launch, "-m", "moetrain.train", *args], cwd=ROOT,
                          env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def step_records(run_dir: Path) -> dict[int, dict]:
    """The training-step lines of ``metrics.jsonl`` by step."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {step: rec["loss"] for step, rec in step_records(run_dir).items()}
