from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import moetrain.data.prepare as prep
from moetrain.data import DataError, load_meta, tokenizer_from_meta
from moetrain.data.prepare import corpus_path, ensure_prepared, main, prepare

REPO = Path(__file__).resolve().parents[2]


def _read_split(d: Path, split: str, meta: dict) -> np.ndarray:
    return np.fromfile(d / f"{split}.bin", dtype=meta["dtype"])


@pytest.mark.parametrize("tok", ["char", "byte"])
def test_prepare_round_trip(tmp_path, small_file, small_text, tok):
    out = tmp_path / "ds"
    meta = prepare(small_file, out, tokenizer=tok, val_fraction=0.1)
    assert meta == load_meta(out)
    assert meta["dtype"] == "uint16" and meta["format_version"] == 1
    assert meta["source"]["bytes"] == small_file.stat().st_size
    assert len(meta["source"]["sha256"]) == 64
    train, val = _read_split(out, "train", meta), _read_split(out, "val", meta)
    n = len(train) + len(val)
    assert len(train) == meta["n_train_tokens"] == int(n * 0.9) and len(val) == meta["n_val_tokens"]
    t = tokenizer_from_meta(meta, out)
    assert t.vocab_size == meta["vocab_size"]
    assert t.decode(np.concatenate([train, val]).tolist()) == small_text  # bins hold the whole text, in order
    assert t.decode(t.encode(small_text)) == small_text
    if tok == "char":
        assert meta["vocab_size"] == len(set(small_text))
        assert t.decode(train.tolist()) == small_text[: len(train)]
    else:
        assert meta["vocab_size"] == 256 and n == len(small_text.encode("utf-8"))


class _BigVocab:
    """A fake tokenizer whose ids exceed 65535."""
    vocab_size = 70_000
    OFF = 66_000

    def encode(self, text):
        return [ord(c) - 32 + self.OFF if 32 <= ord(c) < 32 + 4000 else self.OFF + ord(c) % 7 for c in text]

    def decode(self, ids):
        return "".join(chr(i - self.OFF + 32) for i in ids)

    def to_meta(self):
        return {"kind": "fake", "vocab_size": self.vocab_size}


def test_uint32_for_large_vocab(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello world, " * 20)
    meta = prepare(src, tmp_path / "ds", tokenizer=_BigVocab())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    assert (tmp_path / "ds" / "train.bin").stat().st_size == 4 * meta["n_train_tokens"]
    train = _read_split(tmp_path / "ds", "train", meta)
    assert train.max() > 65535 and _BigVocab().decode(train.tolist()) == ("hello world, " * 20)[: len(train)]
    from moetrain.data import open_dataset
    w = open_dataset(tmp_path / "ds", "train", 8)
    assert int(w.batch([0]).max()) > 65535


def test_empty_input_and_small_val(tmp_path):
    e = tmp_path / "empty.txt"
    e.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        prepare(e, tmp_path / "o")
    s = tmp_path / "s.txt"
    s.write_text("abcdefghij")  # 10 tokens -> val 1 token
    with pytest.raises(DataError, match="val split"):
        prepare(s, tmp_path / "o")
    with pytest.raises(DataError, match="val-fraction"):
        prepare(s, tmp_path / "o", val_fraction=1.5)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 10)
    with pytest.raises(DataError, match="UTF-8"):
        prepare(bad, tmp_path / "o")
    with pytest.raises(DataError, match="unknown"):
        prepare(s, tmp_path / "o", tokenizer="bpe-please")
    assert not (tmp_path / "o").exists()


def test_atomic_failure_leaves_nothing(tmp_path, small_file, monkeypatch):
    out = tmp_path / "ds"

    def boom(*a, **k):
        raise RuntimeError("simulated crash while writing meta.json")

    monkeypatch.setattr(prep, "_write_json", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        prepare(small_file, out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt"]  # no temp dir left behind
    monkeypatch.undo()

    # an existing dataset survives a failed re-prepare untouched
    meta = prepare(small_file, out, tokenizer="char")
    monkeypatch.setattr(prep, "_write_array", boom)
    with pytest.raises(RuntimeError):
        prepare(small_file, out, tokenizer="byte")
    assert load_meta(out) == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "small.txt"]
    monkeypatch.undo()
    # a successful re-prepare replaces it
    assert prepare(small_file, out, tokenizer="byte")["tokenizer"]["kind"] == "byte"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "small.txt"]


def test_refuses_to_overwrite_foreign_dir(tmp_path, small_file):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare(small_file, out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli_in_process(tmp_path, small_file, capsys):
    assert main(["--input", str(small_file), "--out", str(tmp_path / "ds"), "--tokenizer", "byte",
                 "--val-fraction", "0.2"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_meta(tmp_path / "ds")["val_fraction"] == 0.2
    empty = tmp_path / "e.txt"
    empty.write_text("")
    assert main(["--input", str(empty), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "e.txt" in err
    with pytest.raises(SystemExit) as ei:
        main(["--out", str(tmp_path / "x")])  # missing --input: argparse error, one line
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_subprocess_exit_code(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for inp in (tmp_path / "missing.txt", empty):
        r = subprocess.run([sys.executable, "-W", "ignore", "-m", "moetrain.data.prepare", "--input", str(inp),
                            "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=REPO)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and inp.name in lines[0], r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_corpus_path():
    p = corpus_path("tinyshakespeare")
    assert p.is_file() and p.name == "tinyshakespeare.txt"
    assert corpus_path(str(p)) == p
    with pytest.raises(DataError, match="tinyshakespeare"):
        corpus_path("no-such-corpus")


def test_ensure_prepared_reuses_and_refreshes(tmp_path, small_file, monkeypatch):
    calls = []
    real = prep.prepare
    monkeypatch.setattr(prep, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "cache"
    d1 = ensure_prepared(str(small_file), cache, "char")
    assert d1 == cache / "small-char" and len(calls) == 1
    assert ensure_prepared(str(small_file), cache, "char") == d1 and len(calls) == 1  # reused
    d2 = ensure_prepared(str(small_file), cache, "byte")
    assert d2 != d1 and len(calls) == 2
    small_file.write_text(small_file.read_text() + "More text.\n")  # corpus changed -> sha differs
    assert ensure_prepared(str(small_file), cache, "char") == d1 and len(calls) == 3
    assert load_meta(d1)["source"]["bytes"] == small_file.stat().st_size
    (d1 / "val.bin").write_bytes(b"\0\0")  # damaged -> re-prepared
    ensure_prepared(str(small_file), cache, "char")
    assert len(calls) == 4


def test_ensure_prepared_tinyshakespeare_matches_nanogpt(tmp_path):
    d = ensure_prepared("tinyshakespeare", tmp_path, "char")
    meta = load_meta(d)
    # nanoGPT's shakespeare_char: 65 chars, 1,003,854 train / 111,540 val tokens
    assert (meta["vocab_size"], meta["n_train_tokens"], meta["n_val_tokens"]) == (65, 1_003_854, 111_540)
    assert json.loads((d / "meta.json").read_text())["source"]["sha256"] == meta["source"]["sha256"]


def test_package_level_names(tmp_path, small_file):
    import moetrain.data as data
    assert data.ensure_prepared is ensure_prepared and data.corpus_path is corpus_path
    # moetrain.data.prepare is the module, and calling it calls prepare()
    assert data.prepare.prepare is prepare
    assert data.prepare(small_file, tmp_path / "ds")["n_train_tokens"] > 0
