"""The one error type of moetrain.data."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(Exception):
    """A data problem the user can fix: a missing, empty, truncated or mismatched file, an unknown or
    unavailable tokenizer, a split too small for the sequence length.

    The message is one line that names the file (or setting) and says what to do about it; CLIs print it
    as ``error: <message>`` and exit with code 2, without a traceback.
    """
