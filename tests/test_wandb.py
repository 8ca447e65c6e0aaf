"""W&B offline logging of a real debug run, read back from the .wandb file that offline mode writes.

wandb >= 0.18 has no Python reader for .wandb files (the Go wandb-core writes and reads them), so the
file is parsed here: a LevelDB-log container (7-byte header ':W&B' + magic + version, 32 KiB blocks of
chunks with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) of ``wandb.proto`` Records.
"""
import json
import struct
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

from moetrain.train import main as train_main  # noqa: E402
from tests.trainer_runs import train_args  # noqa: E402

BLOCK = 32 * 1024


def read_wandb_file(path: Path) -> list:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a .wandb file"
    pos, chunks, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:                       # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:      # zero padding to the block end
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            chunks.append(buf + chunk)
            buf = b""
    records = []
    for c in chunks:
        r = pb.Record()
        r.ParseFromString(c)
        records.append(r)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def parse(records: list) -> dict:
    out = {"history": [], "metrics": {}, "config": {}, "summary": {}, "run": None, "exit": None}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "metric":
            m = r.metric
            out["metrics"][m.name or m.glob_name] = m
        elif kind == "config":
            out["config"].update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "summary":
            for i in r.summary.update:
                out["summary"][_key(i)] = json.loads(i.value_json)
        elif kind == "run":
            out["run"] = r.run
            out["config"].update({_key(i): json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "exit":
            out["exit"] = r.exit
    return out


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(var, raising=False)
    for var, sub in (("WANDB_DIR", "wb"), ("WANDB_CONFIG_DIR", "wbconfig"), ("WANDB_CACHE_DIR", "wbcache"),
                     ("WANDB_DATA_DIR", "wbdata")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("HOME", str(tmp_path))      # no ~/.netrc: no API key anywhere
    monkeypatch.setenv("SLURM_JOB_ID", "4242")      # as under sbatch: the id goes into the W&B config
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES",
                "SLURM_JOB_PARTITION", "SLURM_JOB_NAME", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


def _train(tmp_path: Path, *extra: str) -> Path:
    run = tmp_path / "run"
    assert train_main(train_args(run, tmp_path / "cache", "logging.wandb=online", "train.log_every=2", *extra)) == 0
    return run


def _offline_runs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))


def test_offline_run_logs_keys_cost_axes_config_and_summary(wandb_env, capsys):
    tmp_path = wandb_env
    run = _train(tmp_path, "train.steps=10", "train.eval_every=0")
    assert "logging offline" in capsys.readouterr().out        # online without a key: offline, no prompt
    dirs = _offline_runs(tmp_path)
    assert len(dirs) == 1, dirs                                 # one W&B run per job, under $WANDB_DIR
    files = list(dirs[0].glob("*.wandb"))
    assert len(files) == 1
    w = parse(read_wandb_file(files[0]))
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]

    # run id fixed by the SLURM job; config = the resolved config + this launch (with the job id)
    assert w["run"].run_id == "run-slurm4242"
    cfg = w["config"]
    assert cfg["train"]["steps"] == 10 and cfg["model"]["flavor"] == "debug" and cfg["logging"]["wandb"] == "online"
    assert cfg["launch"]["slurm"]["job_id"] == "4242" and cfg["launch"]["slurm"]["restart_count"] == "1"
    meta = json.loads((run / "run.json").read_text())
    assert meta["slurm_job_id"] == "4242" and meta["launches"][-1]["wandb_id"] == "run-slurm4242"

    # every metrics.jsonl line is one history row with the same numbers, plus the loss-vs-cost copies
    hist = w["history"]
    assert len(hist) == len(lines)
    for row, line in zip(hist, lines):
        assert row["step"] == line["step"]
        for k, v in line.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                assert row[k] == pytest.approx(v), k
            elif v is None:
                assert k not in row, k                        # None (e.g. MFU on CPU) is not logged
    train_rows = [r for r in hist if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8, 10]
    for r in train_rows:
        assert r["vs_usd/loss"] == r["loss"] and r["vs_cpu_core_hours/loss"] == r["loss"]
        assert r["vs_usd/moe/aux_loss"] == r["moe/aux_loss"]
        for key in ("cost/usd", "cost/cpu_core_hours", "perf/tokens_per_s", "time/goodput", "forecast/usd_at_end"):
            assert key in r, key
    val_rows = [r for r in hist if "val/loss" in r]
    assert len(val_rows) == 1 and val_rows[0]["vs_usd/val/loss"] == val_rows[0]["val/loss"]

    # define_metric: every loss against step, and copies against cost/usd and the hours axis
    m = w["metrics"]
    assert m["loss"].step_metric == "step" and m["val/loss"].step_metric == "step"
    for key in ("loss", "val/loss", "moe/aux_loss"):
        assert m[f"vs_usd/{key}"].step_metric == "cost/usd"
        assert m[f"vs_cpu_core_hours/{key}"].step_metric == "cost/cpu_core_hours"
        assert m[key].summary.min and m[key].summary.last
    assert m["*"].step_metric == "step"

    # summary: totals of the run, min/last of the losses
    s = w["summary"]
    losses = [ln["loss"] for ln in lines if "loss" in ln]
    assert s["loss"]["min"] == pytest.approx(min(losses)) and s["loss"]["last"] == pytest.approx(losses[-1])
    assert s["final/val_loss"] == pytest.approx(val_rows[0]["val/loss"])
    assert s["step"] == 10 and s["checkpoint"].endswith("step_0000010")
    assert s["cost/usd"] >= lines[-1]["cost/usd"] > 0
    assert s["time/checkpoint_s"] > 0                             # the final totals, after the last checkpoint
    assert w["exit"] is not None and w["exit"].exit_code == 0


def test_resumed_job_continues_the_same_wandb_run(wandb_env, monkeypatch, capsys):
    tmp_path = wandb_env
    monkeypatch.delenv("SLURM_JOB_ID")                          # the id must come from the checkpoint
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    run = _train(tmp_path, "train.steps=6", "train.eval_every=0", "logging.wandb=offline")
    _train(tmp_path, "train.steps=10", "train.eval_every=0", "logging.wandb=offline")
    assert "resumed from" in capsys.readouterr().out
    dirs = _offline_runs(tmp_path)
    assert len(dirs) == 2
    first, second = (parse(read_wandb_file(next(d.glob("*.wandb")))) for d in dirs)
    assert first["run"].run_id == second["run"].run_id
    assert [r["step"] for r in second["history"] if "loss" in r] == [8, 10]
    assert second["summary"]["time/restarts"] == 1
    assert len(json.loads((run / "run.json").read_text())["launches"]) == 2
