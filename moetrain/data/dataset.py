"""Memory-mapped token windows over a prepared dataset (``train.bin`` / ``val.bin`` + ``meta.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import DataError

__all__ = ["FORMAT_VERSION", "SPLITS", "TokenWindows", "load_meta", "open_dataset", "check_vocab"]

FORMAT_VERSION = 1
SPLITS = ("train", "val")
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_REQUIRED = ("format_version", "vocab_size", "dtype", "tokenizer", "n_train_tokens", "n_val_tokens")
_FULL_SCAN_TOKENS = 1 << 26   # scan every token of splits up to 64 Mi tokens; sample larger ones
_SCAN_CHUNK = 1 << 22
_RERUN = "re-run `python -m moetrain.data.prepare --input FILE --out DIR`"


class TokenWindows:
    """Non-overlapping windows of ``seq_len + 1`` tokens over one memory-mapped token file.

    Window ``i`` is ``tokens[i * seq_len : i * seq_len + seq_len + 1]`` (consecutive windows share one
    token: the last target of one is the first input of the next), so
    ``len(self) == (n_tokens - 1) // seq_len``. Inputs are ``w[:, :-1]``, targets ``w[:, 1:]``.

    With ``shifted=True`` (training) the windows can also start ``s`` tokens later, ``0 <= s < seq_len``,
    so that successive epochs see the text cut at different places (as random offsets do in nanoGPT,
    but deterministic and resumable): index ``j`` in ``[0, len(self) * n_shifts)`` means window
    ``j % len(self)`` shifted by ``j // len(self)``, and ``len(self) == (n_tokens - seq_len) // seq_len``
    leaves room for the largest shift. ``n_shifts`` is ``seq_len`` (shifted) or 1.

    Args:
        bin_path: raw token file (native-endian ``dtype`` values, no header).
        seq_len: tokens per training sequence (>= 1).
        dtype: ``"uint16"`` | ``"uint32"`` (or the numpy dtype).
        shifted: allow shifted windows (see above).
    Raises:
        DataError: missing file, size not a multiple of the item size, fewer than ``seq_len + 1`` tokens.

    Pickles without its data (the memmap is reopened lazily), so it can go to DataLoader workers.
    """

    def __init__(self, bin_path: str | Path, seq_len: int, dtype: str | np.dtype = "uint16", shifted: bool = False):
        self.bin_path = Path(bin_path)
        self.seq_len = int(seq_len)
        if self.seq_len < 1:
            raise DataError(f"{self.bin_path}: seq_len={seq_len} must be >= 1")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise DataError(f"{self.bin_path}: dtype {self.dtype} unsupported (uint16 | uint32); {_RERUN}")
        if not self.bin_path.is_file():
            raise DataError(f"{self.bin_path}: token file not found; {_RERUN}")
        size = self.bin_path.stat().st_size
        if size % self.dtype.itemsize:
            raise DataError(f"{self.bin_path}: {size} bytes is not a whole number of {self.dtype} tokens "
                            f"(truncated?); {_RERUN}")
        self.n_tokens = size // self.dtype.itemsize
        if self.n_tokens < self.seq_len + 1:
            raise DataError(f"{self.bin_path}: {self.n_tokens} tokens, fewer than seq_len + 1 = "
                            f"{self.seq_len + 1} needed for one window; lower train.seq_len (seq_len={self.seq_len}) "
                            "or prepare more data / a larger val fraction")
        self.n_shifts = self.seq_len if shifted and self.n_tokens >= 2 * self.seq_len else 1
        self._n_windows = (self.n_tokens - (self.seq_len if self.n_shifts > 1 else 1)) // self.seq_len
        self._offsets = np.arange(self.seq_len + 1, dtype=np.int64)
        self._mm: np.memmap | None = None

    # --- data access
    @property
    def tokens(self) -> np.memmap:
        """The whole token file as a read-only ``np.memmap[n_tokens]`` of ``dtype``."""
        if self._mm is None:
            self._mm = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        return self._mm

    def __len__(self) -> int:
        return self._n_windows

    def _check(self, idx: np.ndarray) -> None:
        limit = self._n_windows * self.n_shifts
        if idx.size and (idx.min() < 0 or idx.max() >= limit):
            bad = int(idx[(idx < 0) | (idx >= limit)][0])
            raise IndexError(f"window index {bad} out of range [0, {limit}) for {self.bin_path}")

    def batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Gather windows: ``LongTensor[len(indices), seq_len + 1]`` (int64, CPU, a fresh copy).

        Raises:
            IndexError: an index outside ``[0, len(self) * n_shifts)`` (negative indices are not wrapped).
        """
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        self._check(idx)
        start = (idx % self._n_windows) * self.seq_len + idx // self._n_windows
        pos = start[:, None] + self._offsets[None, :]
        return torch.from_numpy(self.tokens[pos].astype(np.int64))

    def __getitem__(self, i: int) -> torch.Tensor:
        """One window: ``LongTensor[seq_len + 1]``."""
        return self.batch([int(i)])[0]

    # --- pickling without the data
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mm"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"TokenWindows({str(self.bin_path)!r}, seq_len={self.seq_len}, dtype={self.dtype.name}, "
                f"n_tokens={self.n_tokens}, windows={self._n_windows})")


def load_meta(data_dir: str | Path) -> dict:
    """Read and validate ``data_dir/meta.json``.

    Returns:
        The meta dict (``format_version``, ``vocab_size``, ``dtype``, ``tokenizer``, ``n_train_tokens``,
        ``n_val_tokens``, ``source`` ...).
    Raises:
        DataError: missing dir/file, invalid JSON, missing keys, unknown format version or dtype.
    """
    d = Path(data_dir).expanduser()
    mp = d / "meta.json"
    if not mp.is_file():
        raise DataError(f"{mp}: not found (not a prepared dataset); run "
                        f"`python -m moetrain.data.prepare --input FILE --out {d}`")
    try:
        meta = json.loads(mp.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{mp}: invalid JSON ({e.__class__.__name__}: {str(e).splitlines()[0]}); {_RERUN}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{mp}: expected a JSON object; {_RERUN}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise DataError(f"{mp}: missing key(s) {', '.join(missing)}; {_RERUN}")
    if meta["format_version"] != FORMAT_VERSION:
        raise DataError(f"{mp}: format_version {meta['format_version']!r}, this moetrain reads "
                        f"{FORMAT_VERSION}; {_RERUN}")
    if meta["dtype"] not in _DTYPES:
        raise DataError(f"{mp}: dtype {meta['dtype']!r} unsupported (uint16 | uint32); {_RERUN}")
    for k in ("vocab_size", "n_train_tokens", "n_val_tokens"):
        if not isinstance(meta[k], int) or meta[k] < 0:
            raise DataError(f"{mp}: {k}={meta[k]!r} must be a non-negative integer; {_RERUN}")
    return meta


def _max_token(mm: np.ndarray) -> int:
    """Max token id: a full chunked scan up to _FULL_SCAN_TOKENS, else 64 evenly spaced chunks."""
    n = mm.shape[0]
    if n <= _FULL_SCAN_TOKENS:
        return int(max(int(mm[i:i + _SCAN_CHUNK].max()) for i in range(0, n, _SCAN_CHUNK)))
    starts = np.linspace(0, n - _SCAN_CHUNK // 4, 64, dtype=np.int64)
    return int(max(int(mm[s:s + _SCAN_CHUNK // 4].max()) for s in starts))


def open_dataset(data_dir: str | Path, split: str, seq_len: int, shifted: bool = False) -> TokenWindows:
    """Open one split of a prepared dataset after checking it against ``meta.json``.

    Checks: ``meta.json`` exists and parses; ``<split>.bin`` exists; its byte size equals
    ``n_<split>_tokens * itemsize``; at least one window of ``seq_len + 1`` tokens; max token id
    < ``vocab_size`` (full scan up to 64 Mi tokens, sampled above).

    Args:
        data_dir: directory written by :func:`moetrain.data.prepare.prepare`.
        split: ``"train"`` | ``"val"``.
        seq_len: tokens per sequence.
        shifted: training windows that may start up to ``seq_len - 1`` tokens later (see TokenWindows).
    Returns:
        :class:`TokenWindows` with ``.meta`` (the meta dict) and ``.split`` set.
    Raises:
        DataError: any failed check (one line naming the file and the fix); ValueError for a bad split.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    d = Path(data_dir).expanduser()
    meta = load_meta(d)
    dtype = np.dtype(_DTYPES[meta["dtype"]])
    n_expected = meta[f"n_{split}_tokens"]
    bp = d / meta.get("files", {}).get(split, f"{split}.bin")
    if not bp.is_file():
        raise DataError(f"{bp}: token file not found next to meta.json; {_RERUN}")
    size = bp.stat().st_size
    if size != n_expected * dtype.itemsize:
        what = "truncated" if size < n_expected * dtype.itemsize else "longer than meta.json says"
        raise DataError(f"{bp}: {size} bytes but meta.json says {n_expected} {dtype.name} tokens = "
                        f"{n_expected * dtype.itemsize} bytes ({what}); {_RERUN}")
    if n_expected < seq_len + 1:
        raise DataError(f"{bp}: the {split} split has {n_expected} tokens, fewer than seq_len + 1 = "
                        f"{seq_len + 1}; lower train.seq_len (seq_len={seq_len}) or prepare more data"
                        + (" / raise the val fraction" if split == "val" else ""))
    tw = TokenWindows(bp, seq_len, dtype, shifted=shifted)
    mx = _max_token(tw.tokens)
    if mx >= meta["vocab_size"]:
        raise DataError(f"{bp}: token id {mx} >= vocab_size {meta['vocab_size']} in meta.json (corrupt or "
                        f"mismatched files); {_RERUN}")
    tw.meta = meta
    tw.split = split
    return tw


def check_vocab(meta: dict, model_vocab_size: int) -> None:
    """Raise :class:`DataError` if the data needs more embeddings than the model has.

    ``meta["vocab_size"] > model_vocab_size`` is an error naming ``model.vocab_size``; a larger model vocab
    is fine (unused rows).
    """
    v = int(meta["vocab_size"])
    if v > int(model_vocab_size):
        kind = meta.get("tokenizer", {}).get("kind", "?") if isinstance(meta.get("tokenizer"), dict) else "?"
        raise DataError(f"model.vocab_size={model_vocab_size} is smaller than the data's vocab_size {v} "
                        f"({kind} tokenizer); set model.vocab_size={v} or more")
