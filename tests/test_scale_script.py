"""benchmarks/scale.py without launching anything: the metrics parsing, the throughput summary and tables, the
phase-A loss comparison (a mismatch is flagged and makes the exit code 1), the phase-B plan, and the sizing
claims of configs/scale-ep8.yaml. The multi-process runs themselves are not part of CI (see benchmarks/README.md).
"""
from __future__ import annotations

import json
import math

import pytest

from tests.trainer_runs import ROOT, load_benchmark


@pytest.fixture(scope="module")
def scale():
    return load_benchmark("scale")


def _records(world=8, batch_tokens=65536, steps=20, every=5, tps=(50_000.0, 100_000.0, 100_000.0, 80_000.0),
             a2a=(40.0, 60.0, 60.0, 60.0), mfu_per_tps=3e-6, gpu=True, losses=None):
    """A synthetic metrics.jsonl of a run: one training line every ``every`` steps, an eval line at the end."""
    recs = []
    for i, step in enumerate(range(every, steps + 1, every)):
        r = {"step": step, "tokens": step * batch_tokens, "loss": (losses or {}).get(step, 5.0 - 0.1 * i),
             "grad_norm": 1.0, "perf/tokens_per_s": tps[i], "perf/mfu": tps[i] * mfu_per_tps if gpu else None,
             "cost/usd": 0.01 * (i + 1), "cost/elapsed_s": 10.0 * (i + 1), "cost/usd_per_1m_tokens": 1.5,
             "moe/load_imbalance": 1.2 + 0.1 * i, "moe/load_cv": 0.1, "moe/dropped_frac": 0.0}
        if world > 1:
            r.update({"perf/a2a_ms": a2a[i], "perf/a2a_ms_max": a2a[i] * 1.5, "perf/a2a_bytes": 1e9})
        if gpu:
            r.update({"mem/peak_gib": 90.0 + i, "mem/peak_gib_max": 95.0 + i})
        recs.append(r)
    recs.append({"step": steps, "tokens": steps * batch_tokens, "val/loss": 4.0, "cost/usd": 1.0})
    return recs


def test_read_metrics_skips_a_cut_line(scale, tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in _records()) + '\n{"step": 25, "tok')
    recs = scale.read_metrics(p)
    assert len(recs) == 5 and recs[-1]["val/loss"] == 4.0
    assert [r["step"] for r in scale.train_records(recs)] == [5, 10, 15, 20]
    assert scale.read_metrics(tmp_path / "missing.jsonl") == []


def test_summarize_throughput_skips_warmup_and_weights_windows(scale):
    s = scale.summarize_throughput(_records(), world=8, skip_windows=1)
    assert s["windows"] == 3 and s["steps"] == 15 and s["warm"]
    # windows 2-4: 5 steps x 65536 tokens each at 100k, 100k, 80k tokens/s
    secs = 5 * 65536 * (1 / 100_000 + 1 / 100_000 + 1 / 80_000)
    assert s["tokens_per_s"] == pytest.approx(15 * 65536 / secs)
    assert s["tokens_per_s_per_gpu"] == pytest.approx(s["tokens_per_s"] / 8)
    assert s["step_ms"] == pytest.approx(secs / 15 * 1e3)
    assert s["mfu"] == pytest.approx(s["tokens_per_s"] * 3e-6)
    assert s["a2a_ms"] == pytest.approx(60.0) and s["a2a_ms_max"] == pytest.approx(90.0)
    assert s["a2a_share"] == pytest.approx(60.0 / s["step_ms"])
    assert s["a2a_share_max"] == pytest.approx(90.0 / s["step_ms"])
    assert s["load_imbalance"] == pytest.approx((1.3 + 1.4 + 1.5) / 3) and s["load_cv"] == pytest.approx(0.1)
    assert s["usd_per_1m_tokens"] == pytest.approx(0.04 / 40.0 / s["tokens_per_s"] * 1e6)  # the job's $/s / tok/s
    assert s["usd_per_1m_tokens_run"] == 1.5
    assert s["peak_gib"] == 98.0  # the largest over ranks and lines


def test_summarize_throughput_cpu_short_and_empty(scale):
    s = scale.summarize_throughput(_records(world=1, gpu=False, steps=5), world=1, skip_windows=1)
    assert s["windows"] == 1 and not s["warm"] and s["steps"] == 5  # only one window: it is used
    assert s["mfu"] is None and s["peak_gib"] is None and s["a2a_ms"] is None and s["a2a_share"] is None
    assert scale.summarize_throughput([{"step": 1, "val/loss": 3.0}], world=1) == {"steps": 0, "windows": 0}


def test_compare_losses_flags_mismatch(scale):
    ref = {1: 4.0, 2: 3.5, 3: 3.2}
    ok = scale.compare_losses(ref, {1: 4.0, 2: 3.5 * (1 + 5e-5), 3: 3.2}, rtol=1e-4)
    assert ok["ok"] and ok["worst_step"] == 2 and ok["max_rel_err"] == pytest.approx(5e-5)
    bad = scale.compare_losses(ref, {1: 4.0, 2: 3.6, 3: 3.2}, rtol=1e-4)
    assert not bad["ok"] and bad["worst_step"] == 2 and bad["max_rel_err"] == pytest.approx(0.1 / 3.5)
    assert not scale.compare_losses(ref, {1: 4.0, 2: 3.5}, rtol=1e-4)["ok"]  # a step missing
    assert scale.compare_losses(ref, {1: 4.0, 2: 3.5}, rtol=1e-4)["missing"] == [3]
    assert not scale.compare_losses(ref, {1: 4.0, 2: math.nan, 3: 3.2}, rtol=1.0)["ok"]
    assert not scale.compare_losses({}, {}, rtol=1e-4)["ok"]  # nothing compared is not a pass


class FakeRunner:
    """Stands in for scale.Runner: returns synthetic records per job name instead of launching anything."""

    def __init__(self, records_by_name, status="ok"):
        self.records, self.status, self.calls = records_by_name, status, []

    def run(self, name, config, nproc, overrides):
        self.calls.append((name, config, nproc, list(overrides)))
        return {"name": name, "nproc": nproc, "status": self.status, "seconds": 1.0, "cmd": f"fake {name}",
                "run_dir": "", "records": self.records(name)}


def _args(scale, *argv):
    return scale._parse_args(["--cpu", "--nproc", "8", *argv])


def test_phase_a_flags_mismatch_and_passes_match(scale):
    a = _args(scale)
    same = FakeRunner(lambda name: _records(world=1, gpu=False, steps=5, every=1, tps=[1.0] * 5,
                                            losses={1: 4.0, 2: 3.9, 3: 3.8, 4: 3.7, 5: 3.6}))
    rows = scale.phase_a(a, same)
    assert len(rows) == 1 and rows[0]["compare"]["ok"] and rows[0]["dtype"] == "fp32"
    (n1, cfg1, p1, ov1), (n8, _, p8, ov8) = same.calls
    assert (p1, p8) == (1, 8) and "parallel.ep=1" in ov1 and "parallel.ep=8" in ov8
    assert "train.batch_size=16" in ov1 and "model.n_routed_experts=16" in ov8 and cfg1 == scale.EQ_CONFIG

    def diverging(name):
        bump = 1.001 if name.endswith("ep8") else 1.0
        return _records(world=1, gpu=False, steps=5, every=1, tps=[1.0] * 5,
                        losses={s: (4.0 - 0.1 * s) * (bump if s >= 3 else 1.0) for s in range(1, 6)})

    rows = scale.phase_a(a, FakeRunner(diverging))
    c = rows[0]["compare"]
    assert not c["ok"] and c["worst_step"] >= 3 and c["max_rel_err"] == pytest.approx(1e-3)
    assert "FAIL" in scale.equivalence_table(rows)
    failed = scale.phase_a(a, FakeRunner(lambda n: [], status="failed rc=1"))
    assert not failed[0]["compare"]["ok"] and "failed" in failed[0]["status"]


def test_phase_b_plan_on_the_scale_config_and_tables(scale):
    a = _args(scale, "--config", "configs/scale-ep8.yaml", "--phases", "a", "b", "--throughput-on-cpu")
    fake = FakeRunner(lambda name: _records(world=1 if name.startswith("ep1") else 8, a2a=(40.0, 100.0, 100.0, 100.0)))
    rows = scale.phase_b(a, fake)
    names = [r["name"] for r in rows]
    assert names == ["ep8_bf16", "ep1_bf16_same_work", "ep8_fp8-blockwise", "ep8_fp8-rowwise"]
    calls = {c[0]: c for c in fake.calls}
    assert calls["ep8_bf16"][2] == 8 and calls["ep1_bf16_same_work"][2] == 1
    base = calls["ep1_bf16_same_work"][3]
    # same per-GPU work: 128 / 8 = 16 local experts, one micro-batch of 2 sequences
    assert "model.n_routed_experts=16" in base and "train.batch_size=2" in base and "parallel.ep=1" in base
    assert "train.batch_size=16" in calls["ep8_bf16"][3] and "precision.fp8=blockwise" in calls["ep8_fp8-blockwise"][3]
    table = scale.throughput_table(rows)
    assert table.count("\n") == len(rows) + 1 and "ep8_fp8-rowwise" in table and "%" in table
    targets = scale.check_targets(rows)
    mfu = targets[0]
    assert mfu["ok"] is (mfu["value"] >= 0.35)
    ratio = targets[-1]
    assert ratio["value"] == pytest.approx(rows[0]["summary"]["tokens_per_s_per_gpu"]
                                           / rows[1]["summary"]["tokens_per_s_per_gpu"])
    # synthetic numbers: MFU ~28%, slowest-rank a2a 150 ms of ~700 ms steps, 1/8 of ep=1's tokens/s per GPU
    assert [t["ok"] for t in targets] == [False] * 5
    assert scale.targets_text(targets).count("NOT met") == 5


def test_main_writes_tables_and_exits_1_on_mismatch(scale, tmp_path, monkeypatch):
    def fake_run(self, name, config, nproc, overrides):
        loss = {s: 4.0 - 0.1 * s + (0.05 if name.endswith("ep8") and s == 4 else 0.0) for s in range(1, 6)}
        return {"name": name, "nproc": nproc, "status": "ok", "seconds": 0.0, "cmd": name, "run_dir": "",
                "records": _records(world=1, gpu=False, steps=5, every=1, tps=[1.0] * 5, losses=loss)}

    monkeypatch.setattr(scale.Runner, "run", fake_run)
    rc = scale.main(["--cpu", "--nproc", "8", "--out", str(tmp_path)])
    assert rc == 1
    md = next(tmp_path.glob("scale_*.md")).read_text()
    assert "Phase A" in md and "FAIL" in md and "Phase B: skipped on CPU" in md
    data = json.loads(next(tmp_path.glob("scale_*.json")).read_text())
    assert data["exit_code"] == 1 and data["equivalence"][0]["compare"]["worst_step"] == 4


def test_scale_config_needs_all_eight_gpus():
    """The arithmetic in configs/scale-ep8.yaml's comment: 16 B/param (fp32 weights, grads, Adam m and v)."""
    from moetrain.config import load_config, model_args
    from moetrain.model.args import flops_per_token, param_counts

    cfg = load_config(str(ROOT / "configs" / "scale-ep8.yaml"), [])
    a = model_args(cfg)
    c = param_counts(a)
    assert c["total"] == pytest.approx(21.685e9, rel=1e-3) and c["routed_experts"] == pytest.approx(21.039e9, rel=1e-3)
    assert c["activated"] == pytest.approx(1.894e9, rel=1e-3)
    assert flops_per_token(a, cfg.train.seq_len) == pytest.approx(12.62e9, rel=1e-3)
    dense = c["total"] - c["routed_experts"]
    state = {ep: (dense + c["routed_experts"] / ep) * 16 for ep in (1, 2, 4, 8)}
    h200 = 141e9
    assert state[1] > 2 * h200 and state[2] > h200  # ep=1 / ep=2: the optimizer state alone does not fit
    assert state[8] < 0.4 * h200                      # ep=8: ~52 GB, room for ~54 GiB of activations
    assert cfg.parallel.ep == 8 and a.n_routed_experts // cfg.parallel.ep == 16
    assert a.n_routed_experts // a.n_expert_groups == 16  # a routing group = one GPU's experts at ep=8
    assert cfg.train.batch_size == 8 * cfg.train.micro_batch_size and cfg.train.seq_len == 4096
    assert cfg.checkpoint.at_end is False and cfg.checkpoint.every == 0  # a checkpoint would be ~380 GB
