"""benchmarks/train_step.py without launching anything: the per-variant summary (steady tokens/s, final loss over
the last logged steps vs bf16's), the table, the flags (kernels parity, FP8 parity, FP8 speed-up; a failed parity
flag makes the exit code 1) and the loss plot, on synthetic metrics.jsonl files."""
from __future__ import annotations

import json

import pytest

from tests.trainer_runs import load_benchmark


@pytest.fixture(scope="module")
def ts():
    return load_benchmark("train_step")


def _recs(scale=1.0, tps=100_000.0, steps=50, every=10, batch_tokens=16384, first_tps=10_000.0):
    """A synthetic metrics.jsonl: loss 5 - 0.05*step (times ``scale``), the first window slow, eval at the end."""
    out = []
    for step in range(every, steps + 1, every):
        out.append({"step": step, "tokens": step * batch_tokens, "loss": (5.0 - 0.05 * step) * scale,
                    "perf/tokens_per_s": first_tps if step == every else tps, "perf/mfu": tps * 1e-7,
                    "mem/peak_gib": 3.0, "cost/usd": 0.01, "cost/elapsed_s": 1.0})
    out.append({"step": steps, "tokens": steps * batch_tokens, "val/loss": 3.0 * scale})
    return out


def _rows(ts, spec, tmp_path):
    """Rows as run_all builds them, the records read back from metrics.jsonl files."""
    rows = []
    for name, recs, status in spec:
        p = tmp_path / name / "metrics.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
        rows.append({"variant": name, "status": status, "overrides_shown": ts.VARIANTS[name],
                     "records": [json.loads(x) for x in p.read_text().splitlines() if x]})
    ts.finish(rows)
    return rows


def test_final_loss_uses_shared_last_steps(ts):
    ref = {s: 2.0 for s in range(10, 101, 10)}
    got = {s: 2.02 for s in range(10, 81, 10)}  # stopped at 80: compared on steps 40..80
    f = ts.final_loss(got, ref)
    assert f["steps"] == [40, 50, 60, 70, 80]
    assert f["rel_vs_ref"] == pytest.approx(0.01)
    assert ts.final_loss({}, ref)["loss"] is None


def test_summary_table_and_flags(ts, tmp_path):
    rows = _rows(ts, [("bf16", _recs(), "ok"),
                      ("kernels", _recs(scale=1.004, tps=120_000.0), "ok"),          # +0.4%: within 1%
                      ("fp8-blockwise", _recs(scale=1.001, tps=140_000.0), "ok"),    # +0.1%, 1.4x
                      ("fp8-rowwise", _recs(scale=1.01, tps=110_000.0), "ok"),       # +1%: parity fails, 1.1x
                      ("fp8-tensorwise", [], "skipped (deadline)")], tmp_path)
    s = {r["variant"]: r["summary"] for r in rows}
    # the first (slow) window is dropped: steady tokens/s is the later windows'
    assert s["bf16"]["tokens_per_s"] == pytest.approx(100_000.0)
    assert s["fp8-blockwise"]["speedup"] == pytest.approx(1.4)
    assert s["bf16"]["final_loss"] == pytest.approx(5.0 - 0.05 * 30)  # mean of steps 10..50
    assert s["fp8-rowwise"]["loss_rel_vs_base"] == pytest.approx(0.01)
    assert s["bf16"]["val_loss"] == 3.0 and s["bf16"]["peak_gib"] == 3.0
    k = next(f for f in ts.check_flags(rows) if f["target"].startswith("kernels on vs off: kernels"))
    assert k["ok"] is True and k["value"] == pytest.approx(0.004)
    fl = {(f["kind"], f["target"].split(":")[1].split()[0]): f for f in ts.check_flags(rows)}
    assert fl[("loss", "fp8-blockwise")]["ok"] is True
    assert fl[("speed", "fp8-blockwise")]["ok"] is True
    assert fl[("loss", "fp8-rowwise")]["ok"] is False          # the failed loss-parity flag
    assert fl[("speed", "fp8-rowwise")]["ok"] is False
    assert fl[("loss", "fp8-tensorwise")]["ok"] is None        # not run: not measured
    text = ts.flags_text(ts.check_flags(rows))
    assert "+1.000% -> NOT met" in text and "1.40x -> met" in text and "not measured" in text
    tab = ts.table(rows)
    assert "| fp8-rowwise |" in tab and "+1.000%" in tab and "1.40x" in tab and "skipped (deadline)" in tab
    png = ts.plot_losses(rows, tmp_path / "loss.png")
    assert png is None or (png.is_file() and png.stat().st_size > 1000)


def test_kernel_parity_failure_and_exit_code(ts, tmp_path, monkeypatch):
    spec = [("bf16", _recs(), "ok"), ("kernels", _recs(scale=1.05), "ok"),
            ("fp8-blockwise", _recs(), "ok"), ("fp8-blockwise+kernels", _recs(), "timeout")]
    rows = _rows(ts, spec, tmp_path)
    fl = ts.check_flags(rows)
    k = [f for f in fl if f["target"].startswith("kernels on vs off")]
    assert k[0]["ok"] is False and k[0]["value"] == pytest.approx(0.05)
    assert k[1]["ok"] is None  # a run that timed out is not judged
    assert [r["status"] for r in rows][-1] == "timeout (partial)"

    # main() end to end with run_all replaced: files written, exit code 1 on the failed parity flag
    monkeypatch.setattr(ts, "run_all", lambda a, runner: rows)
    out = tmp_path / "out"
    rc = ts.main(["--cpu", "--out", str(out), "--variants", "bf16", "kernels"])
    assert rc == 1
    md = next(out.glob("train_step_*.md")).read_text()
    assert "kernels vs bf16" in md and "NOT met" in md
    data = json.loads(next(out.glob("train_step_*.json")).read_text())
    assert data["tolerances"]["fp8_rel"] == 0.0025 and len(data["rows"]) == 4
    assert "records" not in data["rows"][0]


def test_plan_variants_and_overrides(ts):
    a = ts._parse_args(["--cpu", "--variants", "bf16", "fp8-blockwise+kernels", "--set", "a.b=1", "c.d=2"])
    config, runs = ts.plan(a)
    assert config == "configs/debug.yaml" and a.steps == 8
    assert "precision.dtype=fp32" in runs[0]["overrides"] and "a.b=1" in runs[0]["overrides"]
    assert "c.d=2" in runs[1]["overrides"]
    assert runs[1]["overrides"][-2:] == ["precision.fp8=blockwise", "kernels.enabled=true"]
    assert "train.eval_every=0" in runs[0]["overrides"] and "checkpoint.every=0" in runs[0]["overrides"]


def test_other_baseline_and_longer_final_mean(ts, tmp_path, monkeypatch):
    """--baseline kernels compares the FP8 variants with bf16 + kernels; --last-n sets the final-loss window."""
    a = ts._parse_args(["--cpu", "--baseline", "kernels", "--last-n", "2"])
    assert (a.baseline, a.last_n) == ("kernels", 2)
    monkeypatch.setattr(ts, "BASELINE", "kernels")
    monkeypatch.setattr(ts, "LAST_N", 2)
    kern = _recs(tps=100_000.0)
    fp8 = _recs(tps=125_000.0)
    for r in fp8:                      # +1% on the last two logged steps only
        if "loss" in r and r["step"] >= 40:
            r["loss"] *= 1.01
    rows = _rows(ts, [("kernels", kern, "ok"), ("fp8-blockwise+kernels+per-expert", fp8, "ok")], tmp_path)
    s = rows[1]["summary"]
    assert s["speedup"] == pytest.approx(1.25) and s["loss_steps"] == [40, 50]
    assert s["loss_rel_vs_base"] == pytest.approx(0.01)
    flags = {(f["kind"], f["target"].split(":")[1].split(" vs ")[0].split(" >=")[0].strip()): f
             for f in ts.check_flags(rows)}
    assert flags[("loss", "fp8-blockwise+kernels+per-expert")]["ok"] is False
    assert "| vs kernels |" in ts.table(rows) and "last 2 logs" in ts.table(rows)
