"""The report CLI on real (short) debug runs: PNGs, the comparison table and its numbers, bad input."""
import json
import struct
from pathlib import Path

import pytest

from moetrain.report import main as report_main
from moetrain.train import main as train_main
from tests.trainer_runs import train_args

PLOTS = ("loss_vs_usd.png", "loss_vs_hours.png", "throughput.png", "expert_load.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two debug runs that differ (steps, experts), trained in-process."""
    base = tmp_path_factory.mktemp("report")
    cache = base / "cache"
    dirs = []
    for name, extra in (("a", ["train.steps=20"]), ("b", ["train.steps=30", "model.n_routed_experts=4"])):
        run = base / name
        assert train_main(train_args(run, cache, "train.log_every=2", "checkpoint.at_end=false", *extra)) == 0
        dirs.append(run)
    return dirs


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_report_writes_plots_and_table_with_right_numbers(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert report_main([str(r) for r in runs] + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in PLOTS:
        w, h = _png_size(out / name)
        assert 400 <= w <= 2000 and 300 <= h <= 2000, (name, w, h)
        assert 10_000 < (out / name).stat().st_size < 2_000_000, name
    summary = json.loads((out / "summary.json").read_text())
    table = (out / "summary.md").read_text()
    assert table in printed

    # the numbers, recomputed from metrics.jsonl
    recs = {r.name: _records(r) for r in runs}
    mins = {n: min(x["loss"] for x in rs if "loss" in x) for n, rs in recs.items()}
    level = max(mins.values())
    assert summary["shared_loss"] == pytest.approx(level)
    assert f"{level:.4f}" in table
    for row in summary["runs"]:
        rs = recs[row["run"]]
        train = [x for x in rs if "loss" in x]
        evals = [x for x in rs if "val/loss" in x]
        assert row["steps"] == train[-1]["step"] == (20 if row["run"] == "a" else 30)
        assert row["train_loss"] == pytest.approx(train[-1]["loss"])
        assert row["val_loss"] == pytest.approx(evals[-1]["val/loss"])
        assert row["usd"] == pytest.approx(rs[-1]["cost/usd"])
        assert row["hours"] == pytest.approx(rs[-1]["cost/cpu_core_hours"]) and row["hours_unit"] == "cpu_core_hours"
        assert row["kwh"] is None                     # CPU: energy omitted, not invented
        assert row["usd_per_1m_tokens"] == pytest.approx(rs[-1]["cost/usd"] / rs[-1]["tokens"] * 1e6)
        hit = next(x for x in train if x["loss"] <= level)
        assert row["shared_loss_step"] == hit["step"]
        assert row["usd_to_shared_loss"] == pytest.approx(hit["cost/usd"])
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {row['run']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == str(row["steps"])
        assert cells[3] == f"{row['train_loss']:.4g}" and cells[4] == f"{row['val_loss']:.4g}"
        assert cells[5] == f"${row['usd']:.3g}"
        assert cells[6] == f"{row['hours']:.4g} core-h"
        assert cells[7] == "n/a"
        assert cells[10].startswith(f"${row['usd_to_shared_loss']:.3g} (step {hit['step']})")
    # the run whose best loss is the shared level reaches it at its minimum
    worst = max(mins, key=mins.get)
    row = next(r for r in summary["runs"] if r["run"] == worst)
    assert next(x for x in recs[worst] if x.get("loss") == mins[worst])["step"] == row["shared_loss_step"]


def test_report_default_out_dir_for_one_run(runs, capsys):
    assert report_main([str(runs[0])]) == 0
    for name in PLOTS + ("summary.md",):
        assert (runs[0] / "report" / name).is_file()
    capsys.readouterr()


@pytest.mark.parametrize("content", [None, "", "\n\n", '{"step": 1, "val/loss": 2.0}\n'])
def test_missing_or_empty_metrics_is_one_error_line(tmp_path, capsys, content):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    assert report_main([str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "metrics.jsonl" in err[0]


def test_truncated_last_line_is_skipped(runs, tmp_path, capsys):
    run = tmp_path / "cut"
    run.mkdir()
    text = (runs[0] / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + '{"step": 99, "loss": 1.')  # killed mid-write
    assert report_main([str(run), "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["runs"][0]["steps"] == 20
    capsys.readouterr()
