from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from moetrain.data import DataError, TokenWindows, check_vocab, load_meta, open_dataset
from moetrain.data.prepare import prepare


@pytest.fixture()
def ds(tmp_path, small_file):
    d = tmp_path / "ds"
    prepare(small_file, d, tokenizer="char")
    return d


def test_token_windows(tmp_path):
    arr = np.arange(103, dtype=np.uint16)
    p = tmp_path / "t.bin"
    arr.tofile(p)
    w = TokenWindows(p, 10, "uint16")
    assert len(w) == (103 - 1) // 10 == 10
    b = w.batch([0, 9, 3])
    assert b.dtype == torch.int64 and b.shape == (3, 11)
    for row, i in zip(b, [0, 9, 3]):
        assert row.tolist() == list(range(i * 10, i * 10 + 11))  # windows start at multiples of seq_len
    assert w[9][-1].item() == 100
    assert w.batch(torch.tensor([1])).tolist() == [list(range(10, 21))]
    with pytest.raises(IndexError):
        w.batch([10])
    with pytest.raises(IndexError):
        w.batch([-1])
    w2 = pickle.loads(pickle.dumps(w))
    assert len(pickle.dumps(w)) < 1000 and torch.equal(w2.batch([2, 5]), w.batch([2, 5]))
    with pytest.raises(DataError, match="seq_len"):
        TokenWindows(p, 200, "uint16")


def test_shifted_token_windows(tmp_path):
    arr = np.arange(103, dtype=np.uint16)
    p = tmp_path / "t.bin"
    arr.tofile(p)
    w = TokenWindows(p, 10, "uint16", shifted=True)
    assert w.n_shifts == 10 and len(w) == (103 - 10) // 10 == 9
    # index j = window + shift * len: window 8 shifted by 9 is the last that fits (ends at token 99 + 1)
    assert w.batch([8 + 9 * 9]).tolist() == [list(range(89, 100))]
    assert w.batch([3 + 2 * 9]).tolist() == [list(range(32, 43))]
    assert w.batch([3]).tolist() == [list(range(30, 41))]  # shift 0 = the plain window
    with pytest.raises(IndexError):
        w.batch([9 * 10])
    assert TokenWindows(p, 60, "uint16", shifted=True).n_shifts == 1  # no room for a shift


def test_open_dataset(ds, small_text):
    tr = open_dataset(ds, "train", 32)
    va = open_dataset(ds, "val", 32)
    meta = load_meta(ds)
    assert len(tr) == (meta["n_train_tokens"] - 1) // 32 and len(va) == (meta["n_val_tokens"] - 1) // 32
    assert tr.meta == meta and va.split == "val"
    chars = meta["tokenizer"]["chars"]
    assert "".join(chars[i] for i in tr.batch([1])[0].tolist()) == small_text[32:65]
    with pytest.raises(ValueError):
        open_dataset(ds, "test", 32)


def test_truncated_bin_detected(ds):
    p = ds / "train.bin"
    p.write_bytes(p.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train\.bin.*truncated.*prepare"):
        open_dataset(ds, "train", 16)
    open_dataset(ds, "val", 16)  # the other split is fine


def test_missing_and_corrupt_files(ds, tmp_path):
    (ds / "val.bin").unlink()
    with pytest.raises(DataError, match=r"val\.bin.*not found"):
        open_dataset(ds, "val", 16)
    with pytest.raises(DataError, match=r"meta\.json.*not found"):
        open_dataset(tmp_path / "nowhere", "train", 16)
    (ds / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON"):
        open_dataset(ds, "train", 16)


def test_too_short_for_seq_len(ds):
    n_val = load_meta(ds)["n_val_tokens"]
    with pytest.raises(DataError, match=f"seq_len={n_val}"):
        open_dataset(ds, "val", n_val)
    assert len(open_dataset(ds, "val", n_val - 1)) == 1


def test_token_id_out_of_vocab_detected(ds):
    meta = load_meta(ds)
    meta["vocab_size"] = meta["max_token_id"]["train"]  # claim a smaller vocab than the data uses
    (ds / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="vocab_size"):
        open_dataset(ds, "train", 16)


def test_check_vocab(ds):
    meta = load_meta(ds)
    check_vocab(meta, meta["vocab_size"])
    check_vocab(meta, 256)
    with pytest.raises(DataError, match=r"model\.vocab_size"):
        check_vocab(meta, meta["vocab_size"] - 1)
