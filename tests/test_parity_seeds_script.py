"""benchmarks/parity_seeds.py on synthetic train_step.py output folders: per-seed final-loss differences, the
baseline's spread over seeds, the plot, and a one-line error (exit 2) for a folder that is not such an output."""
from __future__ import annotations

import json

import pytest

from tests.trainer_runs import load_benchmark


@pytest.fixture(scope="module")
def ps():
    return load_benchmark("parity_seeds")


def _folder(tmp_path, seed, base_final, var_final, steps=60, val=None):
    d = tmp_path / f"seed{seed}"
    d.mkdir()
    (d / "train_step_1.json").write_text(json.dumps({"args": {"set": [f"run.seed={seed}"], "config": "c.yaml",
                                                                "steps": steps}, "device": "test"}))
    vals = val or (base_final, var_final)
    for name, final, v in (("kernels", base_final, vals[0]), ("fp8-blockwise_kernels_per-expert", var_final, vals[1])):
        m = d / "runs_1" / name
        m.mkdir(parents=True)
        recs = [{"step": s, "loss": final + (steps - s) * 0.1} for s in range(1, steps + 1)]
        recs.append({"step": steps, "val/loss": v})
        (m / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return d


def test_compare_two_seeds(ps, tmp_path):
    a, b = _folder(tmp_path, 1, 2.0, 2.02, val=(1.5, 1.503)), _folder(tmp_path, 2, 2.2, 2.2 * 0.99, val=(1.6, 1.6))
    res = ps.compare([a, b], "kernels", "fp8-blockwise+kernels+per-expert", last_n=1)
    assert [r["seed"] for r in res["rows"]] == ["1", "2"]
    assert res["rows"][0]["rel"] == pytest.approx(0.01) and res["rows"][1]["rel"] == pytest.approx(-0.01)
    assert res["baseline_spread"] == pytest.approx(0.2 / 2.1)
    assert res["mean_rel"] == pytest.approx(0.0, abs=1e-12)
    assert res["rows"][0]["val_rel"] == pytest.approx(0.002) and res["rows"][1]["val_rel"] == 0.0
    assert res["mean_val_rel"] == pytest.approx(0.001) and res["baseline_val_spread"] == pytest.approx(0.1 / 1.55)
    text = ps.table(res, "kernels", "fp8-blockwise+kernels+per-expert", 1)
    assert "| 1 | 2.0000 | 2.0200 | +1.000% | 1.5000 | 1.5030 | +0.200% |" in text
    assert "spread over the seeds: 9.524% (final), 6.452% (val)" in text
    # two seeds, differences +-1%: sd 1.414%, t(0.975, 1) = 12.706 -> half-width 12.706%
    assert res["ci_rel"] == pytest.approx(12.706 * 0.01 * 2 ** 0.5 / 2 ** 0.5)
    assert "0.000% +- 12.706% (final), +0.100% +- 1.271% (val)" in text
    png = ps.plot(res, "kernels", "fp8-blockwise+kernels+per-expert", tmp_path / "p.png", "t")
    assert png.stat().st_size > 1000


def test_ci95(ps):
    assert ps.ci95([0.1]) is None and ps.ci95([None, 0.2]) is None
    vals = [0.0, 0.01, 0.02, 0.03]   # sd 0.01291, t(0.975, 3) = 3.182
    assert ps.ci95(vals) == pytest.approx(3.182 * 0.0129099 / 2, rel=1e-4)


def test_not_a_train_step_folder_is_exit_2(ps, tmp_path, capsys):
    assert ps.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("parity_seeds: ") and "no train_step_*.json" in err and "\n" not in err
