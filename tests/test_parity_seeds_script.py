"""benchmarks/parity_seeds.py on synthetic train_step.py output folders: per-seed final-loss differences, the
baseline's spread over seeds, the plot, and a one-line error (exit 2) for a folder that is not such an output."""
from __future__ import annotations

import json

import pytest

from tests.trainer_runs import load_benchmark


@pytest.fixture(scope="module")
def ps():
    return load_benchmark("parity_seeds")


def _folder(tmp_path, seed, base_final, var_final, steps=60):
    d = tmp_path / f"seed{seed}"
    d.mkdir()
    (d / "train_step_1.json").write_text(json.dumps({"args": {"set": [f"run.seed={seed}"], "config": "c.yaml",
                                                                "steps": steps}, "device": "test"}))
    for name, final in (("kernels", base_final), ("fp8-blockwise_kernels_per-expert", var_final)):
        m = d / "runs_1" / name
        m.mkdir(parents=True)
        recs = [{"step": s, "loss": final + (steps - s) * 0.1} for s in range(1, steps + 1)]
        recs.append({"step": steps, "val/loss": final})
        (m / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return d


def test_compare_two_seeds(ps, tmp_path):
    a, b = _folder(tmp_path, 1, 2.0, 2.02), _folder(tmp_path, 2, 2.2, 2.2 * 0.99)
    res = ps.compare([a, b], "kernels", "fp8-blockwise+kernels+per-expert", last_n=1)
    assert [r["seed"] for r in res["rows"]] == ["1", "2"]
    assert res["rows"][0]["rel"] == pytest.approx(0.01) and res["rows"][1]["rel"] == pytest.approx(-0.01)
    assert res["baseline_spread"] == pytest.approx(0.2 / 2.1)
    assert res["mean_rel"] == pytest.approx(0.0, abs=1e-12)
    text = ps.table(res, "kernels", "fp8-blockwise+kernels+per-expert", 1)
    assert "| 1 | 2.0000 | 2.0200 | +1.00% |" in text and "spread over the seeds: 9.52%" in text
    png = ps.plot(res, "kernels", "fp8-blockwise+kernels+per-expert", tmp_path / "p.png", "t")
    assert png.stat().st_size > 1000


def test_not_a_train_step_folder_is_exit_2(ps, tmp_path, capsys):
    assert ps.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("parity_seeds: ") and "no train_step_*.json" in err and "\n" not in err
