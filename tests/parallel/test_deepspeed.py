"""The DeepSpeed engine (``parallel.engine=deepspeed``, ZeRO 1/2) under torchrun on 2 CPU processes (gloo,
``DS_ACCELERATOR=cpu``): the same per-step losses and grad norms as the native engine with gradient
accumulation (2 micro-batches per rank) and clipping on; ZeRO-2 with expert parallelism (ep=2: expert
gradients reduced over the expert-data-parallel group) killed after its step-3 checkpoint and resumed
through the engine continues the same curve; a missing DeepSpeed is one ``error:`` line, exit code 2.

Tolerance: the DeepSpeed runs match the native ones to ~1e-7 here; ``LOSS_REL`` (1e-5) is well below the
effect of the clipping itself (clip 0.5 vs none: 2.8e-4 relative on the step-6 loss), so a DeepSpeed run
that did not clip (or clipped differently) fails.

By hand:
    DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 2 -m moetrain.train --config configs/debug.yaml \\
        parallel.engine=deepspeed parallel.zero_stage=2 parallel.ep=2 train.micro_batch_size=2
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moetrain.config import ConfigError
from tests.trainer_runs import ROOT, clean_env, run_trainer, step_records, train_args

# 6 steps, 2 ranks x 2 micro-batches x 2 sequences per step, clipping active (grad norms are 1.2-1.6)
EXTRA = ("train.steps=6", "train.log_every=1", "train.eval_every=0", "train.micro_batch_size=2",
         "train.grad_clip=0.5", "parallel.backend=gloo")
LOSS_REL, NORM_REL = 1e-5, 1e-4
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed (pip install '.[deepspeed]')")


def _env(**extra: str) -> dict:
    return clean_env(DS_ACCELERATOR="cpu", **extra)


def _torchrun(run_dir: Path, cache: Path, *extra: str, env: dict | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    return run_trainer(train_args(run_dir, cache, *extra), nproc=2, env=env or _env(), timeout=240, check=check)


def _assert_same_curve(ref: dict, got: dict) -> None:
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step in ref:
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=LOSS_REL), step
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=NORM_REL), step


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """The native engine's curve (DDP, 2 ranks) and the shared data cache."""
    tmp = tmp_path_factory.mktemp("native")
    cache = tmp / "cache"
    _torchrun(tmp / "run", cache, *EXTRA, "checkpoint.at_end=false")
    return step_records(tmp / "run"), cache


@needs_deepspeed
@pytest.mark.timeout(300)
def test_zero1_matches_native_with_accumulation_and_clipping(native, tmp_path):
    ref, cache = native
    run = tmp_path / "ds"
    out = _torchrun(run, cache, *EXTRA, "parallel.engine=deepspeed", "checkpoint.at_end=false")
    assert "engine deepspeed" in out.stdout and "ZeRO-1" in out.stdout and "grad accumulation 2" in out.stdout
    _assert_same_curve(ref, step_records(run))


@needs_deepspeed
@pytest.mark.timeout(300)
def test_zero2_expert_parallel_kill_and_resume_continues_the_curve(native, tmp_path):
    ref, cache = native
    run = tmp_path / "ds"
    extra = (*EXTRA, "parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.ep=2", "checkpoint.every=3",
             "checkpoint.at_end=false")
    killed = _torchrun(run, cache, *extra, env=_env(MOETRAIN_KILL_AT_STEP="4"), check=False)
    assert killed.returncode != 0  # every rank SIGKILLed itself after logging step 4
    assert max(step_records(run)) == 4
    ckpts = run / "checkpoints"
    assert [p.name for p in sorted(ckpts.glob("step_*"))] == ["step_0000003"]  # complete, no .tmp left
    done = ckpts / "step_0000003"
    state = json.loads((done / "trainer.json").read_text())
    assert (state["engine"], state["step"], state["ep"], state["zero_stage"]) == ("deepspeed", 3, 2, 2)
    assert (done / "mp_rank_00_model_states.pt").is_file() and (done / "experts_ep1.pt").is_file()
    assert len(list(done.glob("zero_pp_rank_*_optim_states.pt"))) == 2

    resumed = _torchrun(run, cache, *extra)
    assert f"resumed from {done} at step 3" in resumed.stdout
    assert "experts reduced over expert-dp groups 'ep_size_2'" in resumed.stdout
    _assert_same_curve(ref, step_records(run))

    # the native engine refuses the DeepSpeed checkpoint with one line naming the engine that wrote it
    from moetrain.checkpoint import read_trainer_state
    from moetrain.parallel.engine import check_checkpoint_engine
    with pytest.raises(ConfigError, match="written by parallel.engine=deepspeed; resume it with parallel.engine=deepspeed"):
        check_checkpoint_engine(done, read_trainer_state(done), "native")


def test_missing_deepspeed_is_one_error_line_exit_2(tmp_path):
    shim = tmp_path / "shim" / "deepspeed"  # shadows any installed deepspeed
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'deepspeed'\")\n")
    env = _env(PYTHONPATH=os.pathsep.join([str(shim.parent), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-m", "moetrain.train",
                           *train_args(tmp_path / "run", tmp_path / "cache", "train.steps=1", "parallel.engine=deepspeed")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: parallel.engine=deepspeed: DeepSpeed is not available"), \
        proc.stderr
    assert "pip install 'moetrain[deepspeed]'" in errors[0] and "Traceback" not in proc.stderr


def test_zero_stage_is_validated():
    from moetrain.config import load_config
    assert load_config(None, []).parallel.zero_stage == 1
    with pytest.raises(ConfigError, match="parallel.zero_stage=3: must be 1 or 2"):
        load_config(None, ["parallel.zero_stage=3"])
