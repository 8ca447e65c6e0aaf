"""Config schema: overrides, the resolved config, and one test per validation rule (exit code 2)."""
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moetrain.config import ConfigError, load_config, model_args, save_config, validate_layout
from moetrain.train import main

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_yaml_and_dotlist_override(tmp_path):
    yaml = tmp_path / "x.yaml"
    yaml.write_text("train:\n  steps: 7\nmodel:\n  flavor: debug\n")
    cfg = load_config(str(yaml), ["train.steps=9", "model.n_routed_experts=16"])
    assert cfg.train.steps == 9
    args = model_args(cfg)
    assert args.n_routed_experts == 16
    assert args.dim == model_args(load_config()).dim  # untouched fields keep the flavor's value


def test_every_config_in_configs_dir_loads():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files
    for f in files:
        load_config(str(f))


def test_resolved_config_is_saved(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "train.steps=3"])
    path = save_config(cfg, tmp_path)
    assert OmegaConf.load(path).train.steps == 3


@pytest.mark.parametrize("override, fragment", [
    (["train.stepz=3"], "train.stepz: unknown config key"),
    (["nosuch.key=1"], "nosuch.key: unknown config key"),
    (["train.steps=abc"], "train.steps"),
    (["train.lr=abc"], "; expected float, e.g. train.lr="),
    (["train.steps=0"], "train.steps=0: must be > 0"),
    (["train.batch_size=-4"], "train.batch_size=-4: must be > 0"),
    (["model.dim=0"], "model.dim=0: must be > 0"),
    (["model.n_activated_experts=9", "model.n_routed_experts=8"], "model.n_activated_experts=9: must be <="),
    (["model.n_routed_experts=10", "model.n_expert_groups=4"], "divisible by model.n_expert_groups"),
    (["model.n_limited_groups=3", "model.n_expert_groups=2"], "model.n_limited_groups=3"),
    (["model.flavor=gpt5"], "model.flavor='gpt5': unknown flavor"),
    (["precision.fp8=int4"], "precision.fp8='int4': must be one of"),
    (["precision.fp8_expert_gemm=looped"], "precision.fp8_expert_gemm='looped': must be one of"),
    (["data.corpus=/no/such/file.txt"], "data.corpus=/no/such/file.txt: file not found"),
    (["data.prepared_dir=/no/such/dir"], "data.prepared_dir=/no/such/dir: no meta.json"),
    (["resume=/no/such/ckpt"], "resume=/no/such/ckpt: no such checkpoint"),
    (["train.seq_len=100000"], "train.seq_len=100000: must be <= model.max_seq_len"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5"),
    (["model.qk_rope_head_dim=7"], "model.qk_rope_head_dim=7: must be even"),
    (["notakeyvalue"], "expected key=value"),
])
def test_invalid_values_exit_2_with_one_line(override, fragment, capsys):
    assert main(override) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ")
    assert "\n" not in err
    assert fragment in err


def test_missing_config_file_exit_2(capsys):
    assert main(["--config", "/no/such.yaml"]) == 2
    assert "--config /no/such.yaml: file not found" in capsys.readouterr().err


def test_layout_rules():
    cfg = load_config(None, ["parallel.ep=3"])
    with pytest.raises(ConfigError, match="parallel.ep=3: must divide the world size"):
        validate_layout(cfg, 4)
    cfg = load_config(None, ["parallel.ep=4", "model.n_routed_experts=6", "model.n_expert_groups=1"])
    with pytest.raises(ConfigError, match="must divide model.n_routed_experts"):
        validate_layout(cfg, 4)
    cfg = load_config(None, ["train.batch_size=6"])
    with pytest.raises(ConfigError, match="train.batch_size=6: must be a multiple"):
        validate_layout(cfg, 4)
    cfg = load_config(None, ["parallel.dp=3", "parallel.ep=2"])
    with pytest.raises(ConfigError, match="dp x ep"):
        validate_layout(cfg, 4)
    assert validate_layout(load_config(None, ["parallel.ep=2"]), 4) == (2, 2)


def test_cli_exit_code_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "moetrain.train", "model.n_activated_experts=99"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
