"""Tokenizers: text <-> token ids, and the metadata that rebuilds them.

Built in (no extra packages):

* ``"char"``  -> :class:`CharTokenizer`: one id per Unicode character; the vocabulary is the sorted set of
  characters of the corpus it was built from (the table is stored in ``meta.json``).
* ``"byte"``  -> :class:`ByteTokenizer`: the 256 byte values of the UTF-8 encoding.

Optional (``pip install 'moetrain[tokenizers]'``; imported lazily):

* ``"PATH/tokenizer.json"``  -> :class:`HFTokenizer` (Hugging Face ``tokenizers``).
* ``"tiktoken:PATH"``  -> :class:`TiktokenTokenizer` from a local ``.tiktoken`` BPE file
  (lines ``<base64 token> <rank>``).
* ``"tiktoken:NAME"``  -> a named tiktoken encoding (``cl100k_base`` ...) **only if it is already in the
  local tiktoken cache**: nothing is ever downloaded; otherwise :class:`DataError`.

Every tokenizer implements the :class:`Tokenizer` protocol; :func:`get_tokenizer` builds one from a spec
string, :func:`tokenizer_from_meta` rebuilds one from ``meta["tokenizer"]``.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import DataError

__all__ = [
    "Tokenizer",
    "CharTokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "TiktokenTokenizer",
    "get_tokenizer",
    "tokenizer_from_meta",
    "encode_array",
    "file_sha256",
    "TOKENIZER_EXTRA",
]

TOKENIZER_EXTRA = "pip install 'moetrain[tokenizers]'"
_SPECS = "char, byte, PATH/tokenizer.json or tiktoken:PATH_OR_NAME"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@runtime_checkable
class Tokenizer(Protocol):
    """What moetrain needs from a tokenizer.

    * ``encode(text: str) -> list[int]``: ids in ``[0, vocab_size)``.
    * ``decode(ids: Sequence[int]) -> str``: ``decode(encode(t)) == t`` for the built-in tokenizers and
      for byte-level BPEs.
    * ``vocab_size: int``: number of ids (max id + 1), the embedding size the model needs at least.
    * ``to_meta() -> dict``: JSON-serialisable; ``kind`` plus what is needed to rebuild the tokenizer.
    * ``from_meta(meta) -> Tokenizer`` (classmethod): the inverse of ``to_meta``.
    """

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def to_meta(self) -> dict: ...

    @classmethod
    def from_meta(cls, meta: dict) -> "Tokenizer": ...


def encode_array(tok: Any, text: str) -> np.ndarray:
    """Encode ``text`` to a 1-D int64 numpy array, using the tokenizer's vectorised ``encode_array`` when
    it has one (char, byte), else ``np.asarray(tok.encode(text))``."""
    fast = getattr(tok, "encode_array", None)
    if fast is not None:
        return np.asarray(fast(text), dtype=np.int64)
    return np.asarray(tok.encode(text), dtype=np.int64).reshape(-1)


# --------------------------------------------------------------------------------------------- char
class CharTokenizer:
    """One id per character: id ``i`` is ``chars[i]``, ``chars`` the sorted distinct characters.

    Raises :class:`DataError` when asked to encode a character that is not in the table.
    """

    kind = "char"

    def __init__(self, chars: str | Sequence[str]):
        chars = "".join(chars)
        if not chars:
            raise DataError("char tokenizer: empty character table; build it from a non-empty text")
        if list(chars) != sorted(set(chars)):
            raise DataError("char tokenizer: the character table must be sorted and without repeats "
                            "(meta.json edited by hand?); re-run prepare")
        self.chars = chars
        self.vocab_size = len(chars)
        self._codepoints = np.frombuffer(chars.encode("utf-32-le"), dtype="<u4").copy()

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The table of the distinct characters of ``text`` (sorted by code point)."""
        if not text:
            raise DataError("char tokenizer: cannot build a character table from empty text")
        cps = np.unique(np.frombuffer(text.encode("utf-32-le"), dtype="<u4"))
        return cls(cps.astype("<u4").tobytes().decode("utf-32-le"))

    def encode_array(self, text: str) -> np.ndarray:
        """Vectorised encode: ``np.ndarray[int64]`` of length ``len(text)``."""
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        if cps.size == 0:
            return np.zeros(0, dtype=np.int64)
        idx = np.searchsorted(self._codepoints, cps)
        idx_c = np.minimum(idx, self.vocab_size - 1)
        bad = self._codepoints[idx_c] != cps
        if bad.any():
            ch = chr(int(cps[np.argmax(bad)]))
            raise DataError(f"char tokenizer: character {ch!r} is not in the {self.vocab_size}-character "
                            "table built from the training corpus; use --tokenizer byte or prepare with this text")
        return idx.astype(np.int64)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise DataError(f"char tokenizer: id out of range [0, {self.vocab_size})")
        return self._codepoints[arr].astype("<u4").tobytes().decode("utf-32-le")

    def to_meta(self) -> dict:
        return {"kind": "char", "vocab_size": self.vocab_size, "chars": self.chars}

    @classmethod
    def from_meta(cls, meta: dict) -> "CharTokenizer":
        return cls(meta["chars"])


# --------------------------------------------------------------------------------------------- byte
class ByteTokenizer:
    """The UTF-8 bytes of the text; ``vocab_size == 256``. ``decode`` replaces invalid UTF-8 (e.g. a cut
    multi-byte character in a sampled sequence) with U+FFFD."""

    kind = "byte"
    vocab_size = 256

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataError("byte tokenizer: id out of range [0, 256)")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_meta(self) -> dict:
        return {"kind": "byte", "vocab_size": 256}

    @classmethod
    def from_meta(cls, meta: dict) -> "ByteTokenizer":
        return cls()


# ----------------------------------------------------------------------------------- HF tokenizers
def _resolve_file(meta: dict, base_dir: str | Path | None, what: str) -> Path:
    """The tokenizer file of ``meta``: the copy in the dataset dir (``meta["file"]``) if there, else the
    original ``meta["path"]``; its sha256 must equal ``meta["sha256"]``."""
    candidates = []
    if base_dir is not None and meta.get("file"):
        candidates.append(Path(base_dir) / meta["file"])
    if meta.get("path"):
        candidates.append(Path(meta["path"]))
    for p in candidates:
        if p.is_file():
            if meta.get("sha256") and file_sha256(p) != meta["sha256"]:
                raise DataError(f"{p}: {what} file changed since the data was prepared (sha256 differs); "
                                "restore it or re-run prepare")
            return p
    raise DataError(f"{what} file not found (looked at {', '.join(map(str, candidates)) or 'nothing'}); "
                    "restore it or re-run prepare")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from a local ``tokenizer.json``.

    ``encode`` adds no special tokens; ``vocab_size`` counts added tokens too. Missing package ->
    :class:`DataError` naming the ``moetrain[tokenizers]`` extra.
    """

    kind = "hf"

    def __init__(self, path: str | Path):
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"{path}: tokenizer.json not found; give an existing file or one of {_SPECS}")
        try:
            from tokenizers import Tokenizer as _HFTok
        except ImportError:
            raise DataError(f"{path}: the 'tokenizers' package is needed for a tokenizer.json; "
                            f"{TOKENIZER_EXTRA}") from None
        try:
            self._tok = _HFTok.from_file(str(path))
        except Exception as e:  # the Rust side raises its own Exception type
            raise DataError(f"{path}: not a valid tokenizers JSON file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        self.path = path.resolve()
        self.sha256 = file_sha256(path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_meta(self) -> dict:
        return {"kind": "hf", "vocab_size": self.vocab_size, "path": str(self.path), "sha256": self.sha256,
                "file": "tokenizer.json"}

    def copy_to(self, out_dir: Path) -> None:
        """Copy the tokenizer file into a prepared dataset dir (as ``meta["file"]``)."""
        shutil.copyfile(self.path, Path(out_dir) / "tokenizer.json")

    @classmethod
    def from_meta(cls, meta: dict, base_dir: str | Path | None = None) -> "HFTokenizer":
        return cls(_resolve_file(meta, base_dir, "tokenizer.json"))


# ----------------------------------------------------------------------------------------- tiktoken
_ENDOFTEXT = "<|endoftext|>"
_R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
               r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
_O200K_PAT = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
# pattern and special tokens of the public encodings, used when a local .tiktoken file carries their name
_KNOWN_TIKTOKEN = {
    "r50k_base": (_R50K_PAT, {_ENDOFTEXT: 50256}),
    "p50k_base": (_R50K_PAT, {_ENDOFTEXT: 50256}),
    "cl100k_base": (_CL100K_PAT, {_ENDOFTEXT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                                  "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}),
    "o200k_base": (_O200K_PAT, {_ENDOFTEXT: 199999, "<|endofprompt|>": 200018}),
}
_tiktoken_lock = threading.Lock()


class _NeedsNetwork(Exception):
    pass


def _import_tiktoken(what: str):
    try:
        import tiktoken
        import tiktoken.load
    except ImportError:
        raise DataError(f"{what}: the 'tiktoken' package is needed; {TOKENIZER_EXTRA}") from None
    return tiktoken


def _parse_tiktoken_file(path: Path) -> dict[bytes, int]:
    import base64
    import binascii

    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise DataError(f"{path}:{lineno}: not a .tiktoken BPE line ('<base64 token> <rank>'); "
                                "give a valid .tiktoken file") from None
    if not ranks:
        raise DataError(f"{path}: empty .tiktoken file; give a valid .tiktoken BPE file")
    return ranks


class TiktokenTokenizer:
    """A tiktoken BPE, from a local ``.tiktoken`` file or a named encoding already in the local cache.

    * Local file: ranks parsed from the file; pattern and special tokens are those of the public encoding
      whose name is the file's stem (``cl100k_base.tiktoken`` ...), else the cl100k pattern and no specials.
    * Name: ``tiktoken.get_encoding(name)`` with the download path disabled: an encoding that is not in the
      local cache (``$TIKTOKEN_CACHE_DIR`` or ``$DATA_GYM_CACHE_DIR`` or ``<tmp>/data-gym-cache``) raises
      :class:`DataError` instead of reaching the network.

    ``encode`` is ``encode_ordinary`` (special-token text is encoded as plain text).
    """

    kind = "tiktoken"

    def __init__(self, enc: Any, *, name: str | None = None, path: Path | None = None,
                 sha256: str | None = None):
        self._enc = enc
        self.name = name
        self.path = path
        self.sha256 = sha256
        self.pattern = getattr(enc, "_pat_str", None)
        self.vocab_size = int(enc.max_token_value) + 1

    @classmethod
    def from_file(cls, path: str | Path, pattern: str | None = None) -> "TiktokenTokenizer":
        path = Path(path).expanduser()
        tiktoken = _import_tiktoken(str(path))
        ranks = _parse_tiktoken_file(path)
        known_pat, specials = _KNOWN_TIKTOKEN.get(path.stem, (_CL100K_PAT, {}))
        if specials and max(specials.values()) < max(ranks.values()):
            specials = {}  # the file is not really that encoding
        try:
            enc = tiktoken.Encoding(name=f"moetrain-file-{path.stem}", pat_str=pattern or known_pat,
                                    mergeable_ranks=ranks, special_tokens=dict(specials))
        except Exception as e:
            raise DataError(f"{path}: tiktoken rejected this BPE file ({e}); give a valid .tiktoken file") from None
        return cls(enc, path=path.resolve(), sha256=file_sha256(path))

    @classmethod
    def from_name(cls, name: str) -> "TiktokenTokenizer":
        tiktoken = _import_tiktoken(f"tiktoken:{name}")
        import tiktoken.load as tl

        def _refuse(blobpath: str) -> bytes:
            raise _NeedsNetwork(blobpath)

        with _tiktoken_lock:
            orig = tl.read_file
            tl.read_file = _refuse  # read_file_cached falls through to read_file only on a cache miss
            try:
                enc = tiktoken.get_encoding(name)
            except _NeedsNetwork as e:
                raise DataError(
                    f"tiktoken:{name}: encoding file {e} is not in the local tiktoken cache and moetrain "
                    "downloads nothing at run time; put the .tiktoken file on disk and pass tiktoken:PATH "
                    "(or pre-fill $TIKTOKEN_CACHE_DIR)") from None
            except ValueError as e:
                raise DataError(f"tiktoken:{name}: {str(e).splitlines()[0]}; give a local .tiktoken file "
                                "path or a known encoding name") from None
            finally:
                tl.read_file = orig
        return cls(enc, name=name)

    @classmethod
    def from_spec(cls, spec: str) -> "TiktokenTokenizer":
        """``spec`` is what follows ``tiktoken:``: an existing file path, else an encoding name."""
        p = Path(spec).expanduser()
        if p.is_file():
            return cls.from_file(p)
        if "/" in spec or spec.endswith(".tiktoken"):
            raise DataError(f"tiktoken:{spec}: file not found; give an existing .tiktoken file or an "
                            "encoding name in the local tiktoken cache")
        return cls.from_name(spec)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def to_meta(self) -> dict:
        m: dict = {"kind": "tiktoken", "vocab_size": self.vocab_size, "pattern": self.pattern}
        if self.path is not None:
            m.update(path=str(self.path), sha256=self.sha256, file="tokenizer.tiktoken")
        else:
            m["name"] = self.name
        return m

    def copy_to(self, out_dir: Path) -> None:
        if self.path is not None:
            shutil.copyfile(self.path, Path(out_dir) / "tokenizer.tiktoken")

    @classmethod
    def from_meta(cls, meta: dict, base_dir: str | Path | None = None) -> "TiktokenTokenizer":
        if meta.get("name"):
            tok = cls.from_name(meta["name"])
        else:
            tok = cls.from_file(_resolve_file(meta, base_dir, ".tiktoken"), pattern=meta.get("pattern"))
        if tok.vocab_size != meta.get("vocab_size", tok.vocab_size):
            raise DataError(f"tiktoken tokenizer has vocab_size {tok.vocab_size}, meta.json says "
                            f"{meta['vocab_size']}; re-run prepare")
        return tok


# ---------------------------------------------------------------------------------------- factories
def get_tokenizer(spec: Any = "char", text: str | None = None) -> Any:
    """Build a tokenizer from a spec.

    Args:
        spec: ``"char"`` | ``"byte"`` | ``"PATH/tokenizer.json"`` | ``"tiktoken:PATH_OR_NAME"``, or an object
            that already implements :class:`Tokenizer` (returned as is).
        text: the corpus; required for ``"char"`` (the table is built from it).
    Raises:
        DataError: unknown spec, missing file, missing optional package, tiktoken needing the network.
    """
    if not isinstance(spec, str):
        if all(hasattr(spec, a) for a in ("encode", "decode", "vocab_size", "to_meta")):
            return spec
        raise DataError(f"tokenizer {spec!r}: not a tokenizer; use one of {_SPECS}")
    s = spec.strip()
    if s == "char":
        if text is None:
            raise DataError("char tokenizer: needs the corpus text to build its table")
        return CharTokenizer.from_text(text)
    if s == "byte":
        return ByteTokenizer()
    if s.startswith("tiktoken:"):
        rest = s[len("tiktoken:"):]
        if not rest:
            raise DataError("tokenizer 'tiktoken:': give a .tiktoken file path or an encoding name after 'tiktoken:'")
        return TiktokenTokenizer.from_spec(rest)
    p = Path(s).expanduser()
    if p.is_file() or s.endswith(".json"):
        return HFTokenizer(p)
    raise DataError(f"tokenizer {spec!r}: unknown; use one of {_SPECS}")


def tokenizer_from_meta(meta: dict, base_dir: str | Path | None = None) -> Any:
    """Rebuild the tokenizer described by ``meta`` (``meta.json``'s ``tokenizer`` entry, or the whole
    ``meta.json`` dict). ``base_dir``: the prepared dataset dir, where a copy of a tokenizer file lives.

    Raises:
        DataError: unknown kind, tokenizer file missing or changed, optional package missing.
    """
    if "tokenizer" in meta and isinstance(meta["tokenizer"], dict):
        meta = meta["tokenizer"]
    kind = meta.get("kind")
    if kind == "char":
        return CharTokenizer.from_meta(meta)
    if kind == "byte":
        return ByteTokenizer.from_meta(meta)
    if kind == "hf":
        return HFTokenizer.from_meta(meta, base_dir)
    if kind == "tiktoken":
        return TiktokenTokenizer.from_meta(meta, base_dir)
    raise DataError(f"meta.json: unknown tokenizer kind {kind!r} (char, byte, hf, tiktoken); re-run prepare")
