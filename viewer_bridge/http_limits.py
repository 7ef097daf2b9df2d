"""uvicorn's HTTP/1.1 protocol with a header timeout and a connection cap.

uvicorn times out idle keep-alive connections, but not one that opened and is still
sending its request head: 300 such connections stayed open for minutes, each holding
a file descriptor in the process that also runs the DICOM SCP. This subclass closes a
connection whose request head is not complete ``header_timeout_s`` after it connected
(or after its previous response), and closes at once a connection beyond
``max_connections`` open ones; uvicorn's own ``limit_concurrency`` answers 503 to
requests at that limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from dicom_node.dicom.peer_text import escaped

LOGGER = logging.getLogger(__name__)
REPORT_INTERVAL_S = 60.0


class _Reports:
    """One warning per kind per interval, with the number left out."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.left_out: dict[str, int] = {}

    def warn(self, kind: str, message: str, client: Any) -> None:
        now = time.monotonic()
        if now - self.last.get(kind, -REPORT_INTERVAL_S) < REPORT_INTERVAL_S:
            self.left_out[kind] = self.left_out.get(kind, 0) + 1
            return
        self.last[kind] = now
        more = self.left_out.pop(kind, 0)
        LOGGER.warning("%s (from %s)%s", message, escaped(client[0] if client else None),
                       f"; {more} more since the last report" if more else "")


def guarded_h11(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """An :class:`H11Protocol` subclass with these limits (uvicorn's ``http=``)."""
    reports = _Reports()

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                reports.warn("http-connection-refused",
                             f"HTTP connection closed: {max_connections} already open "
                             "(http.max_connections)", self.client)
                transport.close()
                return
            self._watch_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()
            super().connection_lost(exc)

        def _watch_head(self) -> None:
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._head_late)
            elif not waiting:
                self._stop_timer()

        def _stop_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _head_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self.conn.trailing_data[0] or self.timeout_keep_alive_task is None:
                    reports.warn("http-header-timeout",
                                 f"HTTP connection closed: no complete request head within "
                                 f"{header_timeout_s:g} s (http.header_timeout_s)", self.client)
                self.transport.close()

    return GuardedH11Protocol
