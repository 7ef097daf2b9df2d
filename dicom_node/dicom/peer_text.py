"""Peer-controlled text made safe for one log line.

AE titles, UIDs, addresses and reasons arrive from the network: a newline in an AE
title would forge a log line, a NUL would corrupt a plain-text log, a 5000-digit UID
would flood it. Every such value goes through :func:`escaped` before it is logged.
"""

from __future__ import annotations

DEFAULT_LIMIT = 64


def escaped(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """``value`` as printable ASCII on one line, at most ``limit`` characters of it.

    Control characters, backslashes and non-ASCII are written as Python escapes
    (``\\n``, ``\\x00``, ``\\u00e9``); a longer value is cut and says how much was left
    out (``...(+4936)``). ``None`` is ``-``; bytes are read as Latin-1.
    """
    if value is None:
        return "-"
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).decode("latin-1")
    else:
        text = str(value)
    cut = text[:limit]
    out = cut.encode("unicode_escape").decode("ascii")
    if len(text) > limit:
        out += f"...(+{len(text) - limit})"
    return out
