from __future__ import annotations

import base64
import sys

import numpy as np
import pytest

from moetrain.data import (ByteTokenizer, CharTokenizer, DataError, get_tokenizer, load_meta,
                           tokenizer_from_meta)
from moetrain.data.prepare import prepare


def test_char_and_byte(small_text):
    c = CharTokenizer.from_text(small_text)
    assert c.decode(c.encode(small_text)) == small_text
    assert c.encode(small_text[:50]) == [c.chars.index(ch) for ch in small_text[:50]]
    assert CharTokenizer.from_meta(c.to_meta()).chars == c.chars
    with pytest.raises(DataError, match="not in the"):
        c.encode("§")
    b = ByteTokenizer()
    assert b.decode(b.encode(small_text)) == small_text
    assert tokenizer_from_meta(b.to_meta()).vocab_size == 256
    assert b.decode([0xE2, 0x82]) == "\ufffd"  # a cut multi-byte char decodes with a replacement char
    with pytest.raises(DataError, match="unknown tokenizer kind"):
        tokenizer_from_meta({"kind": "sentencepiece"})


def test_hf_tokenizers_bpe(tmp_path, small_file, small_text):
    tk = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    t = tk.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([small_text[:4000]], trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    t.save(str(path))

    meta = prepare(small_file, tmp_path / "ds", tokenizer=str(path))
    assert meta["tokenizer"]["kind"] == "hf" and meta["vocab_size"] == t.get_vocab_size()
    assert meta["n_train_tokens"] + meta["n_val_tokens"] < len(small_text)  # merges happened
    ids = np.concatenate([np.fromfile(tmp_path / "ds" / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")])
    assert (tmp_path / "ds" / "tokenizer.json").is_file()
    path.unlink()  # the copy inside the dataset dir is enough to decode
    tok = tokenizer_from_meta(load_meta(tmp_path / "ds"), tmp_path / "ds")
    assert tok.decode(ids.tolist()) == small_text
    with pytest.raises(DataError, match="not found"):
        tokenizer_from_meta(meta)  # no base_dir and the original is gone


def _write_tiktoken(path):
    ranks = {bytes([b]): b for b in range(256)}
    for tok in (b"th", b"the", b" t", b" th", b" the", b"an", b"and", b" and", b"\n\n"):
        ranks[tok] = len(ranks)
    path.write_bytes(b"".join(base64.b64encode(k) + b" " + str(v).encode() + b"\n" for k, v in ranks.items()))
    return len(ranks)


def test_tiktoken_local_file(tmp_path, small_file, small_text):
    pytest.importorskip("tiktoken")
    path = tmp_path / "mini.tiktoken"
    n_vocab = _write_tiktoken(path)
    tok = get_tokenizer(f"tiktoken:{path}")
    assert tok.vocab_size == n_vocab
    ids = tok.encode("the cat and the hat")
    assert len(ids) < len("the cat and the hat") and tok.decode(ids) == "the cat and the hat"

    meta = prepare(small_file, tmp_path / "ds", tokenizer=f"tiktoken:{path}")
    assert meta["tokenizer"]["kind"] == "tiktoken" and meta["vocab_size"] == n_vocab
    ids = np.concatenate([np.fromfile(tmp_path / "ds" / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")])
    assert len(ids) < len(small_text.encode("utf-8"))
    assert tokenizer_from_meta(meta, tmp_path / "ds").decode(ids.tolist()) == small_text

    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not base64 at all!\n")
    with pytest.raises(DataError, match="bad.tiktoken"):
        get_tokenizer(f"tiktoken:{bad}")
    with pytest.raises(DataError, match="not found"):
        get_tokenizer(f"tiktoken:{tmp_path}/missing.tiktoken")


def test_tiktoken_name_never_downloads(tmp_path, monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    import tiktoken.load as tl
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "cl100k_base", raising=False)
    orig = tl.read_file
    with pytest.raises(DataError, match="downloads nothing"):
        get_tokenizer("tiktoken:cl100k_base")
    assert tl.read_file is orig  # the guard is removed again
    with pytest.raises(DataError, match="no_such_encoding"):
        get_tokenizer("tiktoken:no_such_encoding")


def test_missing_optional_packages(tmp_path, monkeypatch):
    j = tmp_path / "tokenizer.json"
    j.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as if not installed
    with pytest.raises(DataError, match=r"moetrain\[tokenizers\]"):
        get_tokenizer(str(j))
    t = tmp_path / "x.tiktoken"
    t.write_text("")
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(DataError, match=r"moetrain\[tokenizers\]"):
        get_tokenizer(f"tiktoken:{t}")
