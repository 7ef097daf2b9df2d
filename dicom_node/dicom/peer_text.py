"""Peer-controlled text made safe for one log line.

AE titles, UIDs, addresses and reasons arrive from the network: a newline in an AE
title would forge a log line, a NUL would corrupt a plain-text log, a 5000-digit UID
would flood it. Every such value goes through :func:`escaped` before it is logged.
"""

from __future__ import annotations

import logging

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


class EscapedMessages(logging.Filter):
    """Rewrites a record's message through :func:`escaped` (for libraries' loggers)."""

    def __init__(self, limit: int = 1000) -> None:
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is left for logging to report
            return True
        record.msg = escaped(message, self.limit)
        record.args = None
        return True


def escape_library_logs(prefix: str = "pynetdicom") -> None:
    """Escape every message of the loggers under ``prefix`` (idempotent).

    pynetdicom logs what peers send (an invalid AE title, a UID) verbatim; logger
    filters are not inherited, so each of its module loggers gets one.
    """
    import pynetdicom  # noqa: F401  (its module loggers exist once it is imported)

    for name in [prefix, *logging.Logger.manager.loggerDict.copy()]:
        if name != prefix and not name.startswith(prefix + "."):
            continue
        logger = logging.getLogger(name)
        if not any(isinstance(f, EscapedMessages) for f in logger.filters):
            logger.addFilter(EscapedMessages())
