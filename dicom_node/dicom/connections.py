"""Who may hold a DICOM connection, and for how long before associating.

The :class:`ConnectionGuard` admits a new TCP connection only from an address some
allowlist entry's networks contain, and only while that address holds fewer than
``max_per_address`` connections and the node fewer than ``max_total``. A connection
that has not delivered its whole A-ASSOCIATE-RQ within ``association_timeout_s`` of
being accepted is shut down by the guard's watchdog thread, however slowly its bytes
trickle in.

Refusals go through a :class:`LimitReporter`: every one is counted in /metrics; the
log line and the AuditEvent row come at most once per kind and address per interval,
with the number left out since the last one.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dicom_node.dicom.peer_text import escaped
from dicom_node.prometheus import count_connection_refused
from dicom_node.store.instances import Peer

LOGGER = logging.getLogger(__name__)

AuditSink = Callable[[str, str, Peer], None]
MAX_TRACKED = 10_000  # (kind, address) pairs the reporter remembers


class LimitReporter:
    """Logs and audits refusals at the limits, rate-limited per (kind, address)."""

    def __init__(self, audit: AuditSink | None, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._audit = audit
        self._interval = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = defaultdict(int)

    def report(self, kind: str, reason: str, address: str | None,
               ae_title: str | None = None) -> None:
        count_connection_refused(kind)
        key = (kind, address or "")
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._suppressed[key] += 1
                return
            if len(self._last) >= MAX_TRACKED:  # many addresses: forget the quiet ones
                self._forget_before(now - self._interval)
            self._last[key] = now
            left_out = self._suppressed.pop(key, 0)
        if left_out:
            reason += f" ({left_out} more like this since the last report)"
        LOGGER.warning("%s from %s: %s", kind, escaped(address), escaped(reason, 300))
        if self._audit is not None:
            ae = escaped(ae_title, 16)[:16] if ae_title else None  # fits AuditEvent.peer_ae
            self._audit(kind, reason, Peer(ae_title=ae, address=address))

    def _forget_before(self, cutoff: float) -> None:
        for key in [k for k, t in self._last.items() if t < cutoff]:
            del self._last[key]
            self._suppressed.pop(key, None)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    association_timeout_s: float
    max_per_address: int
    max_total: int = 1 << 30


@dataclass(eq=False)
class Connection:
    """One accepted TCP connection, until it closes."""

    address: str
    sock: socket.socket
    opened: float
    association: Any = None          # the pynetdicom Association once created
    timed_out: bool = False
    # Handed to a receiving process, which times it out itself and says when it closes.
    handed: bool = False
    tag: int | None = None           # the node's number of a connection handed here
    _release: Callable[[Connection], None] | None = field(default=None, repr=False)

    def associated(self) -> bool:
        """Whether the whole A-ASSOCIATE-RQ has arrived, or the connection was handed to
        a receiving process (either way, this guard's timeout no longer applies)."""
        if self.handed:
            return True
        return self.association is not None and self.association.requestor.primitive is not None

    def release(self) -> None:
        """This connection no longer counts against its address (idempotent)."""
        release, self._release = self._release, None
        if release is not None:
            release(self)

    def shut(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class ConnectionGuard:
    """Admission per address and the association timeout (see the module docstring)."""

    def __init__(self, limits: ConnectionLimits, reporter: LimitReporter,
                 address_allowed: Callable[[str], bool],
                 clock: Callable[[], float] = time.monotonic,
                 on_release: Callable[[Connection], None] | None = None) -> None:
        self.limits = limits
        self.reporter = reporter
        self._address_allowed = address_allowed
        self._clock = clock
        self._on_release = on_release
        self._lock = threading.Lock()
        self._open: dict[str, set[Connection]] = defaultdict(set)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def admit(self, sock: socket.socket, address: str) -> Connection | None:
        """A tracked connection, or ``None`` when it must be closed unanswered."""
        if not self._address_allowed(address):
            self.reporter.report("association-rejected",
                                 f"address {address} is on no allowlist network "
                                 "(closed before association)", address)
            return None
        with self._lock:
            total = sum(len(v) for v in self._open.values())
            held = self._open[address]
            if len(held) < self.limits.max_per_address and total < self.limits.max_total:
                conn = Connection(address, sock, self._clock(), _release=self._forget)
                held.add(conn)
                return conn
            full = total >= self.limits.max_total
        reason = (f"{total} connections already open (dicom.max_connections)" if full else
                  f"{address} already holds {self.limits.max_per_address} connections "
                  "(dicom.max_connections_per_address)")
        self.reporter.report("connection-refused", reason, address)
        return None

    def _forget(self, conn: Connection) -> None:
        with self._lock:
            held = self._open.get(conn.address)
            if held is not None:
                held.discard(conn)
                if not held:
                    del self._open[conn.address]
        if self._on_release is not None:
            self._on_release(conn)

    def open_connections(self, address: str | None = None) -> int:
        with self._lock:
            if address is not None:
                return len(self._open.get(address, ()))
            return sum(len(v) for v in self._open.values())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="dicom-connection-guard",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and shut every connection that has not associated."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            pending = [c for held in self._open.values() for c in held if not c.associated()]
        for conn in pending:
            conn.shut()

    def _watch(self) -> None:
        period = min(0.25, self.limits.association_timeout_s / 4)
        while not self._stop.wait(period):
            self.expire()

    def expire(self) -> int:
        """Shut connections past the association timeout; returns how many."""
        now = self._clock()
        deadline = self.limits.association_timeout_s
        with self._lock:
            late = [c for held in self._open.values() for c in held
                    if not c.timed_out and not c.associated() and now - c.opened > deadline]
            for conn in late:
                conn.timed_out = True
        for conn in late:
            conn.shut()
            # Shut down, the socket no longer holds anything the peer can use.
            conn.release()
            self.reporter.report("association-timeout",
                                 f"no A-ASSOCIATE-RQ within {deadline:g} s "
                                 "(dicom.association_timeout_s); connection closed",
                                 conn.address)
        return len(late)
