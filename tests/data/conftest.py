from __future__ import annotations

from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[2] / "moetrain" / "data" / "corpus" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return CORPUS.read_text(encoding="utf-8")


@pytest.fixture()
def small_text(corpus_text) -> str:
    """~8 KB of Shakespeare plus non-ASCII characters and CRLF line ends (round trips must keep them)."""
    return corpus_text[:8000] + "\r\nCafé — naïve ünïcødé 🎉 ∑\r\n" + corpus_text[8000:8400]


@pytest.fixture()
def small_file(tmp_path, small_text) -> Path:
    p = tmp_path / "small.txt"
    p.write_bytes(small_text.encode("utf-8"))
    return p
