"""Receiving processes: concurrent associations on several CPUs (``[dicom] receivers``).

One interpreter runs one association's Python at a time, so the node's process alone
cannot take several associations faster than one. With ``receivers = N`` above 1 it
starts N - 1 receiving processes (:mod:`dicom_node.dicom.receiver_process`) and keeps
accepting every connection itself: the allowlist networks and the connection limits
are applied here, once, and each admitted connection goes to whichever receiver holds
the fewest (a receiving process on a tie, this process's own SCP only when it holds
fewer: it also runs the jobs). The socket travels as a file descriptor over a Unix
socket (``SCM_RIGHTS``); TLS, the association timeout and everything after happen in
the receiver. ``max_associations`` is shared: each receiver, this process included,
takes its part, rounded up.

A receiver that exits (killed, crashed) gives back its connections' places, and this
process replays its journal at once, so what it acknowledged is indexed even if it
never starts again; it is started again after a pause that doubles up to
:data:`MAX_RESTART_DELAY_S` (its own replay at start then finds what this process
could not apply, if anything). A
receiver's journal left by a run with more receivers than this one is replayed by the
node's process at start (:func:`replay_retired_journals`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from dicom_node.config import NodeConfig
from dicom_node.dicom.connections import Connection
from dicom_node.dicom.peer_text import escaped
from dicom_node.dicom.server import GuardedAssociationServer
from dicom_node.prometheus import add_count, count_receiver_exit, receivers_ready
from dicom_node.store.instances import InstanceStore
from dicom_node.store.journal import JournalInUse
from dicom_node.store.opening import journal_dir, receiver_journals
from federation_grpc.jsonlog import JsonFormatter

LOGGER = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 30.0
STEADY_S = 60.0      # a receiver up this long restarts after the first delay again
MESSAGE_MAX = 4096


def replay_retired_journals(config: NodeConfig, store: InstanceStore) -> int:
    """Replay, then remove, the journal of every receiver number this configuration no
    longer runs (an earlier run had more); returns the records replayed."""
    replayed = 0
    for number, directory in sorted(receiver_journals(config).items()):
        if number < config.dicom.receivers:
            continue
        try:
            replayed += store.replay_journal(directory)
        except JournalInUse:  # its receiver, outliving a killed node, applies it itself
            LOGGER.warning("receiver %d's journal is still held by its process (a node "
                           "before this one); left for a later start", number)
            continue
        shutil.rmtree(directory)
        LOGGER.info("receiver %d's journal replayed and removed (dicom.receivers is %d)",
                    number, config.dicom.receivers)
    return replayed


@dataclass(eq=False)
class _Receiver:
    number: int
    proc: subprocess.Popen[bytes] | None = None
    control: socket.socket | None = None
    ready: bool = False
    started: float = 0.0
    held: dict[int, Connection] = field(default_factory=dict)
    thread: threading.Thread | None = None


class ReceiverPool:
    """The receiving processes beside the node's own SCP; see the module docstring."""

    def __init__(self, config: NodeConfig, *, store: InstanceStore | None = None,
                 restart_delay_s: float = RESTART_DELAY_S) -> None:
        """``store``: the node's, into which the journal of a receiver that exited is
        applied at once (without it, only the receiver's next start applies it)."""
        self.config = config
        self.store = store
        self.restart_delay_s = restart_delay_s
        self._receivers = [_Receiver(n) for n in range(1, config.dicom.receivers)]
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._stopping = threading.Event()
        self._server: GuardedAssociationServer | None = None
        self._address: tuple[str, int] = (config.dicom.host, 0)

    # -- running --------------------------------------------------------------------

    def start(self, server: GuardedAssociationServer, ready_timeout_s: float = 60.0,
              ) -> ReceiverPool:
        """Start every receiver and hand ``server``'s connections to them from now on;
        waits up to ``ready_timeout_s`` for them to be ready (those that are not yet
        are handed nothing until they are)."""
        self._server = server
        self._address = (self.config.dicom.host, int(server.server_address[1]))
        for receiver in self._receivers:
            receiver.thread = threading.Thread(target=self._watch, args=(receiver,),
                                               name=f"dicom-receiver-{receiver.number}",
                                               daemon=True)
            receiver.thread.start()
        server.hand_off = self.hand
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline and self.ready() < len(self._receivers):
            time.sleep(0.05)
        if self.ready() < len(self._receivers):
            LOGGER.warning("%d of %d receiving process(es) not ready after %.0f s; the "
                           "others take the connections meanwhile",
                           len(self._receivers) - self.ready(), len(self._receivers),
                           ready_timeout_s)
        return self

    def ready(self) -> int:
        """How many receiving processes take connections now."""
        with self._lock:
            return sum(r.ready for r in self._receivers)

    def pids(self) -> dict[int, int]:
        """The process id of each running receiver, by number."""
        with self._lock:
            return {r.number: r.proc.pid for r in self._receivers
                    if r.proc is not None and r.proc.poll() is None}

    def held(self) -> dict[int, int]:
        """How many connections each ready receiver holds, by number."""
        with self._lock:
            return {r.number: len(r.held) for r in self._receivers if r.ready}

    def stopping(self) -> None:
        """The node is stopping: hand nothing more over, and a receiver that exits from
        now on (SIGTERM reaches the whole process group) is not started again."""
        self._stopping.set()
        if self._server is not None:
            self._server.hand_off = None

    def stop(self, timeout_s: float = 60.0) -> None:
        """Close every receiver's control socket (each ends its associations as the
        node's own SCP does at a stop, applies and checkpoints its journal, and exits);
        kill those still running after ``timeout_s``."""
        self.stopping()
        with self._lock:
            for receiver in self._receivers:
                _end(receiver)
        deadline = time.monotonic() + timeout_s
        for receiver in self._receivers:
            if receiver.thread is not None:
                receiver.thread.join(max(0.0, deadline - time.monotonic()))
            proc = receiver.proc
            if proc is not None and proc.poll() is None:
                LOGGER.error("receiver %d did not stop within %.0f s; killed",
                             receiver.number, timeout_s)
                proc.kill()
                proc.wait(10)

    # -- handing connections over ----------------------------------------------------

    def hand(self, request: socket.socket, address: tuple[str, int], conn: Connection,
             ) -> bool:
        """Hand an admitted connection to the ready receiver holding the fewest, unless
        this process holds fewer still; whether it was handed."""
        server = self._server
        if server is None or self._stopping.is_set():
            return False
        with self._lock:
            ready = [r for r in self._receivers if r.ready]
            if not ready:
                return False
            # This process's own: what its guard holds, less what it handed and this one.
            here = server.guard.open_connections() - sum(
                len(r.held) for r in self._receivers) - 1
            receiver = min(ready, key=lambda r: len(r.held))
            if len(receiver.held) > here:
                return False
            number = next(self._numbers)
            conn.handed = True
            receiver.held[number] = conn
            control = receiver.control
        header = json.dumps({"id": number, "address": [str(address[0]), int(address[1])]})
        try:
            assert control is not None
            # Never waits: a receiver whose socket is full is stuck; this process serves.
            socket.send_fds(control, [header.encode()], [request.fileno()],
                            socket.MSG_DONTWAIT)
        except (OSError, AssertionError) as exc:
            with self._lock:
                still_held = receiver.held.pop(number, None) is not None
            if not still_held:  # the receiver ended meanwhile and gave its places back
                LOGGER.warning("receiver %d ended while taking a connection; closed",
                               receiver.number)
                return True  # the server closes it: the peer may try again
            LOGGER.warning("receiver %d took no connection (%s); served here",
                           receiver.number, escaped(exc, 200))
            conn.handed = False
            return False
        return True

    # -- each receiver's watch thread ------------------------------------------------

    def _watch(self, receiver: _Receiver) -> None:
        delay = self.restart_delay_s
        while not self._stopping.is_set():
            try:
                spawned = self._spawn(receiver)
            except OSError as exc:  # no socket pair to be had (file descriptors)
                LOGGER.error("cannot start receiver %d: %s", receiver.number, exc)
                spawned = False
            if not spawned:
                self._stopping.wait(delay)
                delay = min(delay * 2, MAX_RESTART_DELAY_S)
                continue
            self._read(receiver)
            code = self._gone(receiver)
            if self._stopping.is_set():
                break
            count_receiver_exit()
            self._apply_left(receiver)
            if time.monotonic() - receiver.started > STEADY_S:
                delay = self.restart_delay_s
            LOGGER.error("receiver %d exited (code %s); starting it again in %.0f s",
                         receiver.number, code, delay)
            self._stopping.wait(delay)
            delay = min(delay * 2, MAX_RESTART_DELAY_S)

    def _apply_left(self, receiver: _Receiver) -> None:
        """Index now what an exited receiver acknowledged: its restart waits a while, and
        may fail again and again."""
        if self.store is None:
            return
        try:
            replayed = self.store.replay_journal(journal_dir(self.config, receiver.number))
        except JournalInUse:
            LOGGER.warning("receiver %d's journal is still held (its process has not "
                           "ended); its next start replays it", receiver.number)
            return
        except Exception as exc:  # the restart replays it; never the end of this thread
            LOGGER.error("receiver %d's journal could not be replayed here (%s); its next "
                         "start replays it", receiver.number, escaped(exc, 200))
            return
        if replayed:
            LOGGER.info("receiver %d's journal: %d record(s) it acknowledged indexed here",
                        receiver.number, replayed)

    def _spawn(self, receiver: _Receiver) -> bool:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        root = logging.getLogger()
        cmd = [sys.executable, "-m", "dicom_node.dicom.receiver_process",
               "--number", str(receiver.number), "--fd", str(theirs.fileno()),
               "--host", self._address[0], "--port", str(self._address[1]),
               "--log-level", logging.getLevelName(root.getEffectiveLevel())]
        if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
            cmd.append("--json-logs")
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, pass_fds=[theirs.fileno()])
        except OSError as exc:
            LOGGER.error("cannot start receiver %d: %s", receiver.number, exc)
            ours.close()
            theirs.close()
            return False
        theirs.close()
        with self._lock:
            receiver.proc, receiver.control = proc, ours
            receiver.started = time.monotonic()
            if self._stopping.is_set():
                _end(receiver)
        assert proc.stdin is not None
        with contextlib.suppress(OSError):  # if it died at once, the read below says so
            proc.stdin.write(self.config.model_dump_json().encode())
            proc.stdin.close()
        return True

    def _read(self, receiver: _Receiver) -> None:
        """Take the receiver's messages until it closes its end (it exited)."""
        control = receiver.control
        assert control is not None
        while True:
            try:
                message = control.recv(MESSAGE_MAX)
            except OSError:
                return
            if not message:
                return
            try:
                self._take(receiver, json.loads(message))
            except Exception as exc:  # malformed: never the end of this thread
                LOGGER.error("receiver %d sent an unreadable message (%s): %s",
                             receiver.number, escaped(exc, 200), escaped(message, 200))

    def _take(self, receiver: _Receiver, doc: Any) -> None:
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        if "closed" in doc:
            with self._lock:
                conn = receiver.held.pop(doc["closed"], None)
            if conn is not None:
                conn.release()
        elif "count" in doc:
            add_count(str(doc["count"]), tuple(doc["labels"]))
        elif "ready" in doc:
            with self._lock:
                receiver.ready = True
                receivers_ready(sum(r.ready for r in self._receivers))
            LOGGER.info("receiver %d ready (pid %s)", receiver.number, escaped(doc["ready"]))
        else:
            raise ValueError("no known field")

    def _gone(self, receiver: _Receiver) -> int | None:
        """The receiver's end closed: its connections no longer count, it is reaped."""
        with self._lock:
            receiver.ready = False
            receivers_ready(sum(r.ready for r in self._receivers))
            held, receiver.held = receiver.held, {}
            proc, control, receiver.control = receiver.proc, receiver.control, None
        for conn in held.values():
            conn.release()
        if control is not None:
            control.close()
        if proc is None:
            return None
        try:
            return proc.wait(60)
        except subprocess.TimeoutExpired:  # closed its socket but still running
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                return proc.wait(10)
            return None


def _end(receiver: _Receiver) -> None:
    """Close the node's writing side of the receiver's socket: the receiver stops."""
    if receiver.control is not None:
        with contextlib.suppress(OSError):
            receiver.control.shutdown(socket.SHUT_WR)
