"""moetrain.data: text -> token files, memory-mapped windows, a resumable sampler.

Public API::

    DataError
    prepare.prepare(input_path, out_dir, tokenizer="char", val_fraction=0.1) -> dict   # train/val .bin + meta.json
    ensure_prepared(corpus_name_or_path, cache_dir, tokenizer="char", val_fraction=0.1) -> Path
    corpus_path(name_or_path) -> Path; embedded_corpora() -> list[str]
    load_meta(dir) -> dict; open_dataset(dir, split, seq_len) -> TokenWindows; check_vocab(meta, model_vocab_size)
    TokenWindows(bin_path, seq_len, dtype): len(), batch(indices) -> LongTensor[len(indices), seq_len + 1]
    ResumableSampler(n_windows, global_batch_size, seed); shard(indices, rank, world, micro_batch_size)
    get_tokenizer(spec, text=None); tokenizer_from_meta(meta, base_dir=None); CharTokenizer, ByteTokenizer, ...

``moetrain.data.prepare`` is the module (``from moetrain.data.prepare import prepare``); it is imported lazily
(on first access to ``ensure_prepared`` / ``corpus_path`` / ``embedded_corpora``) so that
``python -m moetrain.data.prepare`` runs without a double-import warning.
"""

from __future__ import annotations

from .dataset import TokenWindows, check_vocab, load_meta, open_dataset
from .errors import DataError
from .sampler import ResumableSampler, shard
from .tokenizers import (ByteTokenizer, CharTokenizer, HFTokenizer, TiktokenTokenizer, Tokenizer,
                         get_tokenizer, tokenizer_from_meta)

_LAZY = {"ensure_prepared", "corpus_path", "embedded_corpora"}

__all__ = [
    "DataError", "ensure_prepared", "corpus_path", "embedded_corpora",
    "TokenWindows", "open_dataset", "load_meta", "check_vocab",
    "ResumableSampler", "shard",
    "Tokenizer", "CharTokenizer", "ByteTokenizer", "HFTokenizer", "TiktokenTokenizer",
    "get_tokenizer", "tokenizer_from_meta",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(".prepare", __name__), name)
    if name == "prepare":  # the submodule, imported on first access
        import importlib
        return importlib.import_module(".prepare", __name__)
    raise AttributeError(f"module 'moetrain.data' has no attribute {name!r}")
