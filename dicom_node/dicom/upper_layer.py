"""pynetdicom's upper-layer (DUL) reactor, woken by events instead of polling.

pynetdicom 3's DUL thread naps ``_run_loop_delay`` whenever a turn of its loop found
nothing to do, then looks again: at its queues, at the ARTIM timer and at the socket
(``select`` with no timeout). A short nap keeps a C-STORE round trip quick but spins
the thread thousands of times a second, each turn taking the GIL from the threads
that do the work; a long nap adds its length to every round trip.

:class:`EventDrivenDUL` runs the same loop, with the same state machine, but blocks
between turns in one ``select`` on the peer's socket and a :class:`Wakeup` that any
other thread signals when it hands the reactor something to do: a primitive to send
(``send_pdu``), an event (``event_queue``), or an order to stop (``kill_dul``,
``stop_dul``). The ARTIM timer bounds the wait, and so does ``_run_loop_delay``, now
only the longest the reactor waits without a reason.

A presentation data value the association's own thread answers with (a C-STORE
response) need not travel through the reactor at all: :meth:`EventDrivenDUL.send_pdv`
writes its P-DATA-TF PDU on the calling thread while the association is established
over a plain TCP socket, saving a wake of the reactor, a turn of its state machine and
pynetdicom's PDU encoder for every instance. Every write to the peer holds one lock,
so PDUs never interleave.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, A_RELEASE_RP, A_RELEASE_RQ
from pynetdicom.transport import AssociationSocket

LOGGER = logging.getLogger(__name__)

# The longest the reactor waits with nothing to wake it (a safety net: every source of
# work signals it). An idle association turns its loop this often.
IDLE_WAIT_S = 0.05
# A P-DATA-TF PDU holding one presentation data value item (PS3.8 9.3.5): PDU type,
# reserved, PDU length; the item's length and presentation context ID.
_P_DATA_TF = struct.Struct(">BBLLB")
_ESTABLISHED = "Sta6"
_SENT_EVENTS = (evt.EVT_PDU_SENT, evt.EVT_DATA_SENT, evt.EVT_FSM_TRANSITION)
# PDUs after which no answer may follow (PS3.8 9.2: the association is ending).
_LAST_PDUS = (A_ABORT_RQ, A_RELEASE_RQ, A_RELEASE_RP)


class Wakeup:
    """A pipe one thread waits on with ``select`` and any thread signals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._closed = False

    def fileno(self) -> int:
        return self._read

    def signal(self) -> None:
        # Under the lock: once closed, the descriptor's number may belong to another file.
        with self._lock:
            if not self._closed:
                with contextlib.suppress(BlockingIOError):  # full: already signalled
                    os.write(self._write, b"\0")

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read)
                os.close(self._write)


class SignallingQueue(queue.Queue[Any]):
    """A queue that calls ``signal`` after each put."""

    def __init__(self, signal: Callable[[], None]) -> None:
        super().__init__()
        self._signal = signal

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._signal()


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL service provider, its reactor blocking until there is work."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wakeup: Wakeup | None = None
        self._reactor_ident: int | None = None
        self.event_queue = SignallingQueue(self._signal)
        self.to_provider_queue = SignallingQueue(self._signal)
        self._run_loop_delay = IDLE_WAIT_S
        self.send_lock = threading.Lock()  # held by every write to the peer
        self._ending = False  # an A-ABORT or A-RELEASE was written: no answer follows

    @property
    def raw_socket(self) -> socket.socket | None:
        """The peer's socket (TLS or not) under pynetdicom's association socket; None
        before one is attached or once pynetdicom has closed it."""
        return getattr(self.socket, "socket", None)

    def _send(self, pdu: Any) -> None:
        with self.send_lock:
            if isinstance(pdu, _LAST_PDUS):
                self._ending = True
            super()._send(pdu)

    def send_abort(self, abort: A_ABORT_RQ) -> None:
        """Write an A-ABORT past the state machine (which may be broken, or must not see
        the PDU that provoked it); nothing this association answers follows it."""
        raw = self.raw_socket
        with self.send_lock:
            self._ending = True
            if raw is not None:
                with contextlib.suppress(OSError):
                    raw.sendall(abort.encode())

    def send_pdv(self, context_id: int, pdv: bytes) -> bool:
        """Send one presentation data value (message control header and fragment) in a
        P-DATA-TF PDU on the calling thread; ``False`` when it must go through the
        reactor instead (:meth:`send_pdu`): the association is not established or is
        ending (an A-ABORT or A-RELEASE already written, even if the state machine has
        not moved yet), the transport is TLS (one SSL object is not written and read
        from two threads), or someone listens for sent PDUs or state transitions.

        Answers keep their order: the node negotiates no asynchronous operations, so a
        peer waits for each answer before its next request, and the reactor's path is
        taken only in states that never return to Sta6. A send that fails shuts the
        socket down, which the reactor reads as the transport closing (a partly written
        PDU leaves nothing to continue). The socket is closed under the same lock
        (:class:`LockedAssociationSocket`), so its descriptor cannot be closed, and its
        number handed to another connection, while this writes to it."""
        raw = self.raw_socket
        if (raw is None or isinstance(raw, ssl.SSLSocket)
                or self.state_machine.current_state != _ESTABLISHED
                or any(self.assoc.get_handlers(event) for event in _SENT_EVENTS)):
            return False
        pdu = _P_DATA_TF.pack(0x04, 0, len(pdv) + 5, len(pdv) + 1, context_id) + pdv
        with self.send_lock:
            if self._ending or raw.fileno() < 0:
                return False
            try:
                raw.sendall(pdu)
            except OSError as exc:
                LOGGER.debug("sending a P-DATA-TF failed, closing the transport: %s", exc)
                with contextlib.suppress(OSError):
                    raw.shutdown(socket.SHUT_RDWR)
        return True

    def _signal(self) -> None:
        """Wake the reactor, unless this is the reactor (it looks again anyway)."""
        wakeup = self._wakeup
        if wakeup is not None and threading.get_ident() != self._reactor_ident:
            wakeup.signal()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._signal()

    def stop_dul(self) -> bool:
        # pynetdicom's version naps _run_loop_delay at a time until the thread is gone.
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self._signal()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        return True

    def run_reactor(self) -> None:
        self._reactor_ident = threading.get_ident()
        self._wakeup = Wakeup()
        try:
            self._run_loop()
        finally:
            wakeup, self._wakeup = self._wakeup, None
            wakeup.close()

    def _run_loop(self) -> None:
        # DULServiceProvider.run_reactor (pynetdicom 3.0), its nap replaced by _wait.
        self._idle_timer.start()
        dul_ready = self.assoc._dul_ready
        idle = False
        while True:
            if not dul_ready.is_set():
                dul_ready.set()
            if idle:
                self._wait()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                self._abort_on_error()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            idle = False

    def _abort_on_error(self) -> None:
        # pynetdicom's own handling of an error in its loop: A-ABORT past the state
        # machine (which may be broken), then both reactors stop.
        LOGGER.exception("error in the upper layer's reactor, aborting the association")
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = 0x00
        self.send_abort(abort)
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True

    def _wait(self) -> None:
        """Block until the peer sent something, another thread signalled, or the ARTIM
        timer (or the idle cap) is due."""
        wakeup = self._wakeup
        assert wakeup is not None
        # A timer not running reports its whole timeout (or 1 s for none) as remaining.
        timeout = max(0.0, min(self._run_loop_delay, self.artim_timer.remaining))
        watched: list[Any] = [wakeup]
        raw = self.raw_socket
        if raw is not None and raw.fileno() >= 0:
            if isinstance(raw, ssl.SSLSocket) and raw.pending():
                return  # decrypted bytes already buffered: select would not see them
            watched.append(raw)
        try:
            ready, _, _ = select.select(watched, [], [], timeout)
        except (OSError, ValueError):
            # The socket closed under us; the loop's own look at it reports that.
            return
        if wakeup in ready:
            wakeup.clear()


def receive_into(raw: socket.socket, into: memoryview) -> int:
    """Fill ``into`` from ``raw``; the bytes read, fewer when the peer closed, the socket
    timed out or failed. pynetdicom reads 4096 bytes per call (``AssociationSocket.recv``):
    a 16 kB PDU cost four reads, each with its own poll for the socket's timeout and its
    own release of the interpreter lock; here one read takes what the network holds."""
    got = 0
    while got < len(into):
        try:
            read = raw.recv_into(into[got:])
        except OSError:
            return got
        if not read:
            return got
        got += read
    return got


class LockedAssociationSocket(AssociationSocket):
    """pynetdicom's association socket, closed under its upper layer's send lock.

    pynetdicom's state machine closes the socket on its own thread while another may be
    writing an answer (:meth:`EventDrivenDUL.send_pdv`). It is shut down first, without
    the lock (a write blocked on a peer that does not read fails at once and lets the
    lock go), then closed holding it."""

    def _shutdown_socket(self) -> None:
        sock = self.socket
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        dul = self.assoc.dul
        lock = dul.send_lock if isinstance(dul, EventDrivenDUL) else contextlib.nullcontext()
        with lock, contextlib.suppress(OSError):
            sock.close()
