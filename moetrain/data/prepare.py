"""Text -> token files: ``train.bin``, ``val.bin`` and ``meta.json``, written atomically.

CLI::

    python -m moetrain.data.prepare --input FILE --out DIR [--tokenizer char|byte|PATH/tokenizer.json|tiktoken:PATH_OR_NAME]
                                    [--val-fraction 0.1]

Errors print one line ``error: ...`` to stderr and exit with code 2.

Layout of a prepared dir (format version 1):

* ``train.bin`` / ``val.bin``: raw native-endian ``uint16`` (vocab_size <= 65535) or ``uint32`` token ids,
  ``np.memmap``-able, no header. Train is the first ``int(n * (1 - val_fraction))`` tokens of the stream,
  val the rest (nanoGPT's split).
* ``meta.json``: ``format_version``, ``vocab_size``, ``dtype``, ``tokenizer`` (``kind`` + what decodes),
  ``n_train_tokens``, ``n_val_tokens``, ``val_fraction``, ``max_token_id``, ``files``,
  ``source`` {``path``, ``sha256``, ``bytes``}.
* ``tokenizer.json`` / ``tokenizer.tiktoken``: a copy of a file-based tokenizer (hf / tiktoken file).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import types
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import FORMAT_VERSION, load_meta
from .errors import DataError
from .tokenizers import encode_array, file_sha256, get_tokenizer

__all__ = ["prepare", "ensure_prepared", "corpus_path", "embedded_corpora", "main", "MIN_SPLIT_TOKENS"]

MIN_SPLIT_TOKENS = 2          # one window of seq_len=1 needs 2 tokens
_CORPUS_DIR = Path(__file__).resolve().parent / "corpus"


# ------------------------------------------------------------------------------------------ corpora
def embedded_corpora() -> list[str]:
    """Names of the corpora shipped inside the package (``moetrain/data/corpus/<name>.txt``)."""
    return sorted(p.stem for p in _CORPUS_DIR.glob("*.txt"))


def corpus_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve an embedded corpus name (``"tinyshakespeare"``) or a path to an existing text file.

    Raises:
        DataError: neither an embedded corpus nor an existing file.
    """
    s = str(name_or_path)
    emb = _CORPUS_DIR / f"{s}.txt"
    if "/" not in s and os.sep not in s and emb.is_file():
        return emb
    p = Path(s).expanduser()
    if p.is_file():
        return p
    raise DataError(f"{s}: corpus file not found; give a text file or one of {', '.join(embedded_corpora())}")


# ------------------------------------------------------------------------------------------ prepare
def _read_text(path: Path) -> tuple[str, bytes]:
    if not path.exists():
        raise DataError(f"{path}: input file not found; give an existing UTF-8 text file with --input")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file; give a UTF-8 text file with --input")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    if not raw:
        raise DataError(f"{path}: input file is empty; give a non-empty UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None
    return text, raw


def _write_array(arr: np.ndarray, path: Path) -> None:
    with open(path, "wb") as f:
        arr.tofile(f)
        f.flush()
        os.fsync(f.fileno())


def _write_json(obj: Any, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished temp dir to ``out``; an existing prepared dir there is swapped out first."""
    if out.exists():
        if not out.is_dir():
            raise DataError(f"{out}: exists and is not a directory; choose another --out")
        entries = list(out.iterdir())
        if entries and not (out / "meta.json").is_file():
            raise DataError(f"{out}: exists, is not empty and is not a prepared dataset; choose another --out "
                            "or remove it")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)  # put the previous dataset back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    _fsync_dir(out.parent)


def prepare(input_path: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: Any = "char",
            val_fraction: float = 0.1) -> dict:
    """Tokenize a UTF-8 text file into ``out_dir/{train.bin, val.bin, meta.json}``.

    Everything is written into a temp dir next to ``out_dir`` and moved into place with ``os.replace``:
    a crash leaves either no ``out_dir`` or the previous complete one, never a half-written dataset.
    An existing ``out_dir`` is replaced only if it is empty or a prepared dataset (has ``meta.json``).

    Args:
        input_path: UTF-8 text file (read whole into memory).
        out_dir: target directory (created; parents too).
        tokenizer: spec string (``char`` | ``byte`` | ``PATH/tokenizer.json`` | ``tiktoken:PATH_OR_NAME``) or a
            :class:`~moetrain.data.tokenizers.Tokenizer` object.
        val_fraction: fraction of the token stream (its tail) that becomes ``val.bin``; in (0, 1).
    Returns:
        The meta dict written to ``meta.json``.
    Raises:
        DataError: missing/empty/non-UTF-8 input, bad tokenizer, val_fraction outside (0, 1), a split with
            fewer than 2 tokens, ``out_dir`` occupied by something else, I/O failure.
    """
    src = Path(input_path).expanduser()
    out = Path(out_dir).expanduser()
    try:
        vf = float(val_fraction)
    except (TypeError, ValueError):
        raise DataError(f"--val-fraction={val_fraction!r}: must be a number in (0, 1), e.g. 0.1") from None
    if not 0.0 < vf < 1.0:
        raise DataError(f"--val-fraction={val_fraction}: must be strictly between 0 and 1, e.g. 0.1")
    text, raw = _read_text(src)
    tok = get_tokenizer(tokenizer, text=text)
    ids = encode_array(tok, text)
    del text
    n = int(ids.size)
    n_train = int(n * (1.0 - vf))
    n_val = n - n_train
    if n_train < MIN_SPLIT_TOKENS or n_val < MIN_SPLIT_TOKENS:
        small = "val" if n_val < MIN_SPLIT_TOKENS else "train"
        fix = "raise --val-fraction or " if small == "val" else "lower --val-fraction or "
        raise DataError(f"{src}: {n} tokens give a {small} split of {min(n_train, n_val)} tokens "
                        f"(val_fraction={vf}); need >= {MIN_SPLIT_TOKENS}: {fix}use a larger input")
    vocab = int(tok.vocab_size)
    if n and (ids.min() < 0 or ids.max() >= vocab):
        raise DataError(f"{src}: tokenizer produced id {int(ids.max())} outside [0, {vocab}); fix the tokenizer")
    dtype = np.uint16 if vocab <= 65535 else np.uint32
    ids = ids.astype(dtype)
    tmeta = dict(tok.to_meta())
    tmeta.setdefault("vocab_size", vocab)
    meta = {
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab,
        "dtype": np.dtype(dtype).name,
        "tokenizer": tmeta,
        "n_train_tokens": n_train,
        "n_val_tokens": n_val,
        "val_fraction": vf,
        "max_token_id": {"train": int(ids[:n_train].max()), "val": int(ids[n_train:].max())},
        "files": {"train": "train.bin", "val": "val.bin"},
        "source": {"path": str(src.resolve()), "sha256": file_sha256(src), "bytes": len(raw)},
    }
    del raw
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise DataError(f"{out}: cannot create the output directory ({e.strerror}); choose a writable --out") from None
    try:
        _write_array(ids[:n_train], tmp / "train.bin")
        _write_array(ids[n_train:], tmp / "val.bin")
        copy = getattr(tok, "copy_to", None)
        if copy is not None:
            copy(tmp)
        _write_json(meta, tmp / "meta.json")  # last: its presence marks a complete dataset
        _fsync_dir(tmp)
        os.chmod(tmp, 0o755)                  # mkdtemp makes it 0700
        _publish(tmp, out)
    except OSError as e:
        raise DataError(f"{out}: writing the dataset failed ({e.strerror or e}); check disk space and "
                        "permissions, then re-run prepare") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


# ------------------------------------------------------------------------------------ ensure_prepared
def _tokenizer_slug(tokenizer: Any) -> str:
    if not isinstance(tokenizer, str):
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", type(tokenizer).__name__.lower())
    t = tokenizer.strip()
    if t in ("char", "byte"):
        return t
    if t.startswith("tiktoken:"):
        rest = t[len("tiktoken:"):]
        p = Path(rest).expanduser()
        if p.is_file():
            return f"tiktoken-{file_sha256(p)[:12]}"
        return "tiktoken-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", rest)
    p = Path(t).expanduser()
    if p.is_file():
        return f"hf-{file_sha256(p)[:12]}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", t)


def _tokenizer_matches(meta: dict, tokenizer: Any, slug: str) -> bool:
    kind = meta.get("tokenizer", {}).get("kind")
    if slug in ("char", "byte"):
        return kind == slug
    if slug.startswith("hf-"):
        return kind == "hf" and str(meta["tokenizer"].get("sha256", ""))[:12] == slug[3:]
    if slug.startswith("tiktoken-"):
        tm = meta["tokenizer"]
        return kind == "tiktoken" and slug[9:] in (str(tm.get("sha256", ""))[:12], tm.get("name"))
    return False


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive advisory lock (flock) so concurrent ranks/jobs prepare a dataset once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:  # a filesystem without flock (some NFS): go on unlocked
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _valid_prepared(d: Path, sha: str, tokenizer: Any, slug: str, vf: float) -> bool:
    try:
        meta = load_meta(d)
    except DataError:
        return False
    if meta.get("source", {}).get("sha256") != sha or not _tokenizer_matches(meta, tokenizer, slug):
        return False
    if abs(float(meta.get("val_fraction", -1)) - vf) > 1e-12:
        return False
    item = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        p = d / meta.get("files", {}).get(split, f"{split}.bin")
        if not p.is_file() or p.stat().st_size != meta[f"n_{split}_tokens"] * item:
            return False
    return True


def ensure_prepared(corpus_name_or_path: str | os.PathLike, cache_dir: str | os.PathLike,
                    tokenizer: Any = "char", val_fraction: float = 0.1) -> Path:
    """Return a prepared dataset dir for a corpus, preparing it only when needed.

    The dir is ``cache_dir/<corpus stem>-<tokenizer slug>`` (``tinyshakespeare-char``; a file tokenizer's
    slug holds its sha256 prefix). It is reused when its ``meta.json`` has the corpus's sha256, the same
    tokenizer and val_fraction, and the .bin sizes match; otherwise it is (re)prepared. Safe to call from
    several processes at once (an flock on ``cache_dir/<name>.lock`` serialises them).

    Args:
        corpus_name_or_path: embedded corpus name (``"tinyshakespeare"``) or a text file path.
        cache_dir: where prepared dirs live (``~`` expanded, created).
        tokenizer: as for :func:`prepare`.
        val_fraction: as for :func:`prepare`.
    Returns:
        Path of the prepared dir.
    Raises:
        DataError: as :func:`corpus_path` and :func:`prepare`.
    """
    src = corpus_path(corpus_name_or_path)
    cache = Path(cache_dir).expanduser()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{cache}: cannot create the data cache dir ({e.strerror}); set data.cache_dir "
                        "to a writable directory") from None
    slug = _tokenizer_slug(tokenizer)
    name = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', src.stem)}-{slug}"
    out = cache / name
    sha = file_sha256(src)
    vf = float(val_fraction)
    with _lock(cache / f".{name}.lock"):
        if not _valid_prepared(out, sha, tokenizer, slug, vf):
            prepare(src, out, tokenizer=tokenizer, val_fraction=vf)
    return out


# ---------------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints usage too)
        self.exit(2, f"error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 error)."""
    ap = _Parser(prog="python -m moetrain.data.prepare",
                 description="Tokenize a UTF-8 text file into train.bin / val.bin / meta.json.")
    ap.add_argument("--input", required=True, help="UTF-8 text file, or an embedded corpus name "
                    f"({', '.join(embedded_corpora())})")
    ap.add_argument("--out", required=True, help="output directory (written atomically)")
    ap.add_argument("--tokenizer", default="char",
                    help="char | byte | PATH/tokenizer.json | tiktoken:PATH_OR_NAME (default: char)")
    ap.add_argument("--val-fraction", type=float, default=0.1,
                    help="tail fraction of the token stream used for validation (default: 0.1)")
    args = ap.parse_args(argv)
    try:
        inp = Path(args.input).expanduser()
        if not inp.exists() and args.input in embedded_corpora():
            inp = corpus_path(args.input)
        meta = prepare(inp, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {meta['n_train_tokens']:,} train + {meta['n_val_tokens']:,} val tokens, "
          f"vocab_size {meta['vocab_size']} ({meta['tokenizer']['kind']}, {meta['dtype']})")
    return 0


class _CallableModule(types.ModuleType):
    """Lets ``from moetrain.data import prepare; prepare(...)`` work although ``moetrain.data.prepare`` is
    this module (the CLI): calling the module calls :func:`prepare`."""

    def __call__(self, *args, **kwargs):
        return prepare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
