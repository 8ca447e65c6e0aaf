"""The launchers: slurm/train.sbatch on a real one-node Slurm (preempt -> checkpoint -> requeue -> resume ->
finish), and the command lines of launch/*.sh.

The Slurm test starts a local Slurm with ../shared/tools/start-local-slurm.sh (relative to the repository
root; it installs slurm-wlm + munge with apt-get when missing, so it needs root). The preemption is
delivered deterministically with `scancel --signal=USR1 --batch` (what `#SBATCH --signal=B:USR1@120` does
near the time limit), and the job is watched with `scontrol show job` (never `sbatch --wait`).
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START_SLURM = ROOT.parent / "shared" / "tools" / "start-local-slurm.sh"
STEPS = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("slurmctld") is None and os.geteuid() != 0:
        pytest.skip("slurmctld is not installed and we are not root (cannot install Slurm with apt-get)")
    if not START_SLURM.is_file():
        pytest.skip(f"{START_SLURM} not found (the shared tools directory next to the repository)")
    if shutil.which("slurmctld") is not None and os.geteuid() != 0:
        pytest.skip("Slurm is installed but start-local-slurm.sh needs root to start munge and the daemons")
    p = subprocess.run(["bash", str(START_SLURM)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"start-local-slurm.sh failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    yield
    subprocess.run(["bash", str(START_SLURM), "stop"], capture_output=True, timeout=120)


def test_sbatch_preempt_checkpoint_requeue_resume(slurm, tmp_path):
    run, log = tmp_path / "run", tmp_path / "slurm.out"
    venv_bin = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                                                                    "MASTER_", "WANDB_"))}
    env.update(PATH=f"{venv_bin}:{env.get('PATH', '/usr/bin:/bin')}", GPUS_PER_NODE="0", NPROC_PER_NODE="2",
               MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore",
               TORCHRUN=str(venv_bin / "torchrun") if (venv_bin / "torchrun").exists() else "torchrun")
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}", f"--chdir={ROOT}",
           "--job-name=moetrain-test", str(ROOT / "slurm" / "train.sbatch"),
           "--config", str(ROOT / "configs" / "debug.yaml"), f"run.dir={run}", f"data.cache_dir={tmp_path / 'cache'}",
           "logging.progress=false", f"train.steps={STEPS}", "train.log_every=5", "train.eval_every=0",
           "checkpoint.every=0"]
    sub = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    try:
        # 1. wait until it trains (a few steps logged), then preempt it
        deadline = time.monotonic() + 120
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count('"loss"') >= 1):
            state = _job(job_id).get("JobState")
            assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {state} before training:\n" + \
                (log.read_text() if log.is_file() else "")
            assert time.monotonic() < deadline, "the job did not start training:\n" + (log.read_text() if log.is_file() else "")
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
        # 2. the requeued job resumes and finishes
        deadline = time.monotonic() + 150
        while True:
            info = _job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                if info.get("JobState") != "COMPLETED" or info.get("Restarts") == "1":
                    break
            assert time.monotonic() < deadline, f"job {info.get('JobState')} Restarts={info.get('Restarts')}:\n" + \
                log.read_text()
            time.sleep(0.5)
    finally:
        if _job(job_id).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"):
            subprocess.run(["scancel", job_id], timeout=30)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text)
    assert "SIGUSR1" in text and "requeueing job" in text, text
    stopped = re.search(r"done: step (\d+)/%d \(stopped by SIGUSR1\)" % STEPS, text)
    assert stopped, text
    stop_step = int(stopped.group(1))
    assert 0 < stop_step < STEPS
    ckpt = run / "checkpoints" / f"step_{stop_step:07d}"
    assert ckpt.is_dir() and (ckpt / "trainer.json").is_file()          # the preemption checkpoint
    assert f"resumed from {ckpt} at step {stop_step}" in text, text
    assert f"done: step {STEPS}/{STEPS}\n" in text, text
    assert (run / "checkpoints" / f"step_{STEPS:07d}").is_dir()
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == STEPS and records[-1]["time/restarts"] == 1
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS            # no step logged twice
    meta = json.loads((run / "run.json").read_text())
    assert meta["slurm_job_id"] == job_id
    assert [(la["slurm"]["job_id"], la["slurm"]["restart_count"], la["world_size"]) for la in meta["launches"]] == \
        [(job_id, "0", 2), (job_id, "1", 2)]
    assert meta["launches"][1]["start_step"] == stop_step


# ------------------------------------------------------------------------------------------------
# Launch scripts: syntax and command lines (no GPUs, no Slurm needed)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["launch/torchrun.sh", "launch/deepspeed.sh", "slurm/train.sbatch"])
def test_scripts_parse_and_are_executable(script):
    path = ROOT / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def _dry(env_extra: dict, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("NGPUS", "NPROC", "LAUNCHER")}
    env.update(DRY_RUN="1", **env_extra)
    p = subprocess.run(["bash", str(ROOT / "launch" / "deepspeed.sh"), *args], capture_output=True, text=True,
                       env=env, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_deepspeed_launcher_command_lines(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "deepspeed").write_text("#!/bin/sh\nexit 0\n")
    (fake / "deepspeed").chmod(0o755)
    path = f"{fake}:{os.environ.get('PATH', '')}"
    gpu = _dry({"NGPUS": "8", "PATH": path}, "--config", "configs/debug.yaml", "train.steps=5")
    assert gpu == ("deepspeed --num_gpus 8 --master_port 29500 --no_local_rank --module moetrain.train "
                   "--config configs/debug.yaml train.steps=5 parallel.engine=deepspeed")
    cpu = _dry({"NPROC": "2", "PATH": path}, "a=b")
    assert cpu == "torchrun --standalone --nproc-per-node 2 -m moetrain.train a=b parallel.engine=deepspeed"
    forced = _dry({"NGPUS": "4", "LAUNCHER": "torchrun", "PATH": path}, "x=1")
    assert forced.startswith("torchrun --standalone --nproc-per-node 4 -m moetrain.train x=1")
