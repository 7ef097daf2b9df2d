"""pynetdicom's association server with the node's connection hygiene.

Subclasses of :class:`ThreadedAssociationServer` and its request handler:

- the listen backlog is ``listen_backlog`` (pynetdicom keeps socketserver's 5);
- every accepted connection passes the :class:`ConnectionGuard` (allowlist network,
  per-address limit) before a thread is spent on it, and gets a socket timeout so a
  read never blocks for ever;
- TLS handshakes run in the connection's own thread, not in the accept loop, so one
  silent TLS client cannot stall every other connection;
- each association is a :class:`NodeAssociation` (PDU and DIMSE limits) that releases
  its connection from the guard when it closes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_node.dicom.association import AssociationHooks, AssociationLimits, NodeAssociation
from dicom_node.dicom.connections import Connection, ConnectionGuard
from dicom_node.dicom.peer_text import escaped
from dicom_node.dicom.upper_layer import LockedAssociationSocket

LOGGER = logging.getLogger(__name__)


class GuardedRequestHandler(RequestHandler):
    """Starts a :class:`NodeAssociation` for one admitted connection."""

    server: GuardedAssociationServer

    def handle(self) -> None:
        conn = self.server.take_connection(self.request)
        if conn is None:  # not admitted through verify_request: nothing to serve
            self._close()
            return
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.do_handshake()
            except (OSError, ValueError) as exc:
                self.server.guard.reporter.report(
                    "tls-handshake-failed", f"TLS handshake failed: {exc}", conn.address)
                conn.release()
                self._close()
                return
        try:
            assoc = self._create_association(conn)
            conn.association = assoc
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
        except BaseException:  # e.g. no thread to be had: the place is given back
            conn.release()
            raise

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            self.request.shutdown(socket.SHUT_RDWR)
        self.request.close()

    def _create_association(self, conn: Connection | None = None) -> NodeAssociation:  # type: ignore[override]
        # pynetdicom's RequestHandler._create_association, building a NodeAssociation.
        server = self.server
        assoc = NodeAssociation(self.ae, MODE_ACCEPTOR, server.limits, server.hooks,
                                on_close=conn.release if conn is not None else _nothing)
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(LockedAssociationSocket(assoc, client_socket=self.request))
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = acceptor_contexts(server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:  # type: ignore[misc]
                    assoc.bind(event, handler, args)
        assoc.drop_silent_library_logging()
        return assoc


def acceptor_contexts(contexts: list[Any]) -> list[Any]:
    """An association's own copy of the server's presentation contexts.

    pynetdicom deep-copies them for every association. The node supports every storage
    SOP class in every transfer syntax (171 contexts, 39 syntaxes each), and a deep copy
    builds each of those 6,800 UIDs again, validating each with a regular expression:
    51-82 ms of CPU per association, measured. Negotiation only reads the acceptor's
    contexts (it answers with contexts of its own), so each is copied shallowly: its
    attributes are its own, the UIDs (immutable) and the list of transfer syntaxes are
    shared with the server's, and so with the AE's: a running AE must not be given
    another transfer syntax for a context it supports (``add_supported_context``)."""
    return [copy.copy(context) for context in contexts]


def _nothing() -> None:
    return None


# (the accepted socket, the peer's address, its admitted connection) -> handed or not
HandOff = Callable[[socket.socket, tuple[str, int], Connection], bool]


class GuardedAssociationServer(ThreadedAssociationServer):
    """The SCP's listening socket; see the module docstring."""

    daemon_threads = True

    def __init__(self, ae: Any, address: tuple[str, int], ae_title: str, contexts: list[Any],
                 ssl_context: ssl.SSLContext | None = None,
                 evt_handlers: list[Any] | None = None, *, guard: ConnectionGuard,
                 limits: AssociationLimits, hooks: AssociationHooks, backlog: int,
                 socket_timeout_s: float) -> None:
        self.request_queue_size = backlog
        self.guard = guard
        self.limits = limits
        self.hooks = hooks
        self.socket_timeout_s = socket_timeout_s
        self._admitted: dict[Any, Connection] = {}
        self._admitted_lock = threading.Lock()
        # With receiving processes (dicom_node.dicom.receiver_pool): whether one took an
        # admitted connection; if not, this process serves it.
        self.hand_off: HandOff | None = None
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers,
                         request_handler=GuardedRequestHandler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.settimeout(self.socket_timeout_s)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        conn = self.guard.admit(request, str(client_address[0]))
        if conn is None:
            return False
        with self._admitted_lock:
            self._admitted[request] = conn
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        hand_off = self.hand_off
        if hand_off is not None:
            with self._admitted_lock:
                conn = self._admitted.get(request)
            if conn is not None and hand_off(request, client_address, conn):
                self.take_connection(request)
                request.close()  # this process's copy only: the receiver serves it
                return
        super().process_request(request, client_address)

    def take_connection(self, request: Any) -> Connection | None:
        with self._admitted_lock:
            return self._admitted.pop(request, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        LOGGER.exception("error serving a DICOM connection from %s",
                         escaped(client_address[0] if client_address else None))
        conn = self.take_connection(request)
        if conn is not None:
            conn.release()

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)
        self.server_close()
        self.guard.stop()
        if self in self.ae._servers:
            self.ae._servers.remove(self)


class HandedAssociationServer(GuardedAssociationServer):
    """The SCP of a receiving process: it listens on no port but serves the connections
    the node's process hands it over ``control``, a Unix socket (the connection's file
    descriptor and a JSON header ``{"id": n, "address": [host, port]}`` per message).

    Each handed connection passes this process's own guard, whose only limit is the
    association timeout (the node's process admitted it); when one closes,
    ``on_closed`` gets the node's number for it. ``ended`` is set once the node's
    process has closed its end of ``control``.
    """

    def __init__(self, *args: Any, control: socket.socket, **kwargs: Any) -> None:
        self.control = control
        self.ended = threading.Event()
        self._numbers: dict[Any, int] = {}
        super().__init__(*args, **kwargs)
        assert self.socket is not None
        self.socket.close()  # never bound: the node's process listens
        self.socket = control

    def server_bind(self) -> None:
        return None

    def server_activate(self) -> None:
        return None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        try:
            message, fds, _, _ = socket.recv_fds(self.control, HANDED_HEADER_MAX, 1)
        except OSError:
            message, fds = b"", []
        if not message and not fds:
            self.ended.set()
            time.sleep(0.05)  # until shut down: serve_forever would spin on the EOF
            raise OSError("the node's process closed the receiver's control socket")
        sock = socket.socket(fileno=fds[0]) if fds else None
        try:
            number, address = _handed_header(message)
        except (ValueError, RecursionError) as exc:
            if sock is not None:
                sock.close()
            LOGGER.error("receiver: unreadable hand-off from the node (%s)",
                         escaped(type(exc).__name__ + ": " + str(exc), 200))
            raise OSError("unreadable hand-off") from exc
        if sock is None:
            LOGGER.error("receiver: connection %d came without its socket", number)
            self.closed(number)
            raise OSError("hand-off without a socket")
        try:
            sock.settimeout(self.socket_timeout_s)
            if self.ssl_context:
                sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                    do_handshake_on_connect=False)
        except OSError:  # e.g. reset by the peer already: its place is given back
            sock.close()
            self.closed(number)
            raise
        with self._admitted_lock:
            self._numbers[sock] = number
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        admitted = super().verify_request(request, client_address)
        with self._admitted_lock:
            number = self._numbers.pop(request)
            conn = self._admitted.get(request)
        if conn is not None:
            conn.tag = number  # reported closed by the guard's on_release
        else:
            self.closed(number)
        return admitted

    def closed(self, number: int) -> None:
        """Tell the node's process that its connection ``number`` is closed."""
        with contextlib.suppress(OSError):
            self.control.send(json.dumps({"closed": number}).encode())


HANDED_HEADER_MAX = 1024


def _handed_header(message: bytes) -> tuple[int, tuple[str, int]]:
    """The node's number and peer address of a handed connection; ValueError if the
    message is not one."""
    doc = json.loads(message)
    if not isinstance(doc, dict):
        raise ValueError(f"not a hand-off: {message[:80]!r}")
    number, address = doc.get("id"), doc.get("address")
    if (not isinstance(number, int) or not isinstance(address, list) or len(address) != 2
            or not isinstance(address[0], str) or not isinstance(address[1], int)):
        raise ValueError(f"not a hand-off: {message[:80]!r}")
    return number, (address[0], address[1])
