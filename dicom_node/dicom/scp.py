"""The node's DICOM SCP: C-ECHO and C-STORE, allowlist, connection limits, TCP_NODELAY.

Handlers are plain functions bound as data with their dependencies; they return
DICOM statuses and never raise. The server around them (dicom_node.dicom.server)
enforces the connection, PDU and command limits; peer-controlled text is logged
through :func:`escaped` only.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config import DicomSettings
from dicom_node.dicom.association import AssociationHooks, AssociationLimits, NodeAE
from dicom_node.dicom.connections import (
    Connection,
    ConnectionGuard,
    ConnectionLimits,
    LimitReporter,
)
from dicom_node.dicom.meta import part10
from dicom_node.dicom.parse import RefusedInstance, parse_instance
from dicom_node.dicom.peer_text import escape_library_logs, escaped
from dicom_node.dicom.server import GuardedAssociationServer, HandedAssociationServer
from dicom_node.dicom.status import Status
from dicom_node.prometheus import count_received, count_refused
from dicom_node.store.instances import IngestOutcome, InstanceStore, Peer

LOGGER = logging.getLogger(__name__)

# The received bytes are stored as they came; never decode them into a Dataset first.
_config.STORE_RECV_CHUNKED_DATASET = False
# Identifiers may carry patient data: keep them out of pynetdicom's logs.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

StoredCallback = Callable[[str, IngestOutcome], None]
OVERSIZE_KEPT_BYTES = 64 * 1024 * 1024


# How long a release waits for its association's instances to be indexed before it is
# answered anyway (they are durable in the journal either way).
SETTLE_TIMEOUT_S = 30.0


def set_nodelay(event: Event) -> None:
    """Disable Nagle on every association socket (avoids ~40 ms stalls per PDU)."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            LOGGER.debug("could not set TCP_NODELAY", exc_info=True)


def release_settles(event: Event, store: InstanceStore) -> None:
    """The peer asks to release (the reactor thread, before it answers): what was
    received so far is written and indexed first, so a sender that saw its release
    answered finds every instance in the index, not a moment later."""
    primitive = getattr(event, "primitive", None)
    if (isinstance(primitive, A_RELEASE) and primitive.result is None
            and not store.settle_received(SETTLE_TIMEOUT_S)):
        LOGGER.warning("release from %s answered before its instances were indexed "
                       "(still applying after %.0f s)",
                       escaped(peer_of(event).ae_title or ""), SETTLE_TIMEOUT_S)


def sender_gone(event: Event, store: InstanceStore) -> None:
    """The association was aborted: index what it sent without lingering for more."""
    store.flush_received()


def peer_of(event: Event) -> Peer:
    return peer_of_association(event.assoc)


def peer_of_association(assoc: Association) -> Peer:
    """Who is on the other end; the calling AE title escaped (it reaches the index, the
    audit trail and ``tessera node status``; a valid one is unchanged)."""
    req = assoc.requestor
    acc = assoc.acceptor
    calling = (req.ae_title or "").strip()
    return Peer(ae_title=escaped(calling, 16)[:16] if calling else None, address=req.address,
                called_ae=(acc.ae_title or "").strip() or None)


def handle_requested(event: Event, settings: DicomSettings, store: InstanceStore) -> None:
    """Reject an association from a peer not on the allowlist (A-ASSOCIATE-RJ)."""
    assoc = event.assoc
    primitive = assoc.requestor.primitive
    calling = ((primitive.calling_ae_title if primitive is not None else "") or "").strip()
    address = assoc.requestor.address
    if settings.allows(calling, address):
        return
    LOGGER.warning("rejecting association from %s@%s: not on the allowlist", escaped(calling),
                   escaped(address))
    store.audit("association-rejected", f"calling AE {calling!r} from {address} not allowed",
                Peer(ae_title=escaped(calling, 16)[:16], address=address))
    # permanent rejection, service-user source, calling AE title not recognised
    assoc.acse.send_reject(0x01, 0x01, 0x03)
    assoc.kill()


LOCAL_LIMIT_EXCEEDED = (0x03, 0x02)  # A-ASSOCIATE-RJ source and reason pynetdicom sends


def handle_rejected(event: Event, reporter: LimitReporter, max_associations: int) -> None:
    """Report an association rejected at ``max_associations`` (rate-limited)."""
    primitive = event.assoc.acceptor.primitive
    if primitive is None or (primitive.result_source, primitive.diagnostic) != \
            LOCAL_LIMIT_EXCEEDED:
        return
    peer = peer_of_association(event.assoc)
    reporter.report("association-limit",
                    f"{max_associations} associations already open "
                    "(dicom.max_associations); rejected, local limit exceeded",
                    peer.address, peer.ae_title)


def handle_echo(event: Event) -> int:
    return Status.SUCCESS


def handle_store(
    event: Event,
    store: InstanceStore,
    max_bytes: int,
    on_stored: StoredCallback | None = None,
) -> int:
    """Store one instance durably before answering; every failure has its status."""
    status = _store(event, store, max_bytes, on_stored)
    if status == Status.SUCCESS:
        count_received("dicom")
    else:
        count_refused("dicom", int(status))
    return status


def _store(event: Event, store: InstanceStore, max_bytes: int,
           on_stored: StoredCallback | None) -> int:
    peer = peer_of(event)
    if store.space_refusal() is not None:  # logged and audited once per change
        return Status.OUT_OF_RESOURCES
    try:
        dataset = event.encoded_dataset(include_meta=False)
    except Exception:
        LOGGER.exception("cannot read C-STORE data from %s@%s", escaped(peer.ae_title),
                         escaped(peer.address))
        return Status.CANNOT_UNDERSTAND
    context = event.context
    # The C-STORE-RQ's Affected SOP Instance UID (the event's request is a C-STORE).
    affected_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
    try:
        header = parse_instance(
            dataset,
            transfer_syntax_uid=str(context.transfer_syntax),
            context_sop_class_uid=str(context.abstract_syntax),
            command_sop_instance_uid=affected_uid or None,
            max_bytes=max_bytes,
        )
    except RefusedInstance as exc:
        LOGGER.warning("refused instance from %s@%s: 0x%04X %s", escaped(peer.ae_title),
                       escaped(peer.address), exc.status, escaped(exc.reason, 200))
        store.quarantine(dataset, "instance-refused", exc.reason, peer,
                         affected_uid[:64] or None,
                         status=int(exc.status))
        return int(exc.status)
    except Exception as exc:  # a decoder bug must not take the association down
        LOGGER.exception("unexpected error decoding an instance from %s", escaped(peer.address))
        store.quarantine(dataset, "instance-refused", f"cannot decode: {exc}", peer,
                         status=int(Status.CANNOT_UNDERSTAND))
        return Status.CANNOT_UNDERSTAND
    data = part10(dataset, sop_class_uid=header.sop_class_uid,
                  sop_instance_uid=header.sop_instance_uid,
                  transfer_syntax_uid=header.transfer_syntax_uid, source_ae=peer.ae_title)
    try:
        # The digest covers the dataset without file meta: hash what was received.
        # Durable on return (the intake journal's fdatasync); file and row come behind.
        outcome = store.receive(data, header, peer, digest=hashlib.sha256(dataset).hexdigest())
    except Exception as exc:
        LOGGER.exception("cannot store %s from %s", header.sop_instance_uid,
                         escaped(peer.address))
        store.audit("store-failed", f"cannot store: {exc}", peer, header.sop_instance_uid,
                    header.series_uid, status=int(Status.OUT_OF_RESOURCES))
        return Status.OUT_OF_RESOURCES
    LOGGER.debug("stored %s from %s@%s (%s)", header.sop_instance_uid, escaped(peer.ae_title),
                 escaped(peer.address), outcome)
    if on_stored is not None:
        try:
            on_stored(header.series_uid, outcome)
        except Exception:
            LOGGER.exception("on_stored callback failed for %s", header.sop_instance_uid)
    return Status.SUCCESS


@dataclass
class RunningSCP:
    ae: AE
    server: GuardedAssociationServer

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def shutdown(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()


def build_ae(settings: DicomSettings) -> AE:
    ae = NodeAE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_kb * 1024
    ae.network_timeout = settings.network_timeout_s
    # How long an acceptor waits for the A-ASSOCIATE-RQ (and the ARTIM timer).
    ae.acse_timeout = settings.association_timeout_s
    ae.dimse_timeout = settings.network_timeout_s
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
    return ae


def server_ssl_context(settings: DicomSettings) -> ssl.SSLContext | None:
    """The SCP's TLS context when ``tls_cert``/``tls_key`` are set (TLS 1.2 or later)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_ca is not None:
        context.load_verify_locations(settings.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def association_hooks(store: InstanceStore, reporter: LimitReporter) -> AssociationHooks:
    """What the association layer does at its limits: report, count, quarantine."""

    def pdu_refused(assoc: Association, reason: str) -> None:
        peer = peer_of_association(assoc)
        reporter.report("pdu-oversized", reason, peer.address, peer.ae_title)

    def command_refused(assoc: Association, status: int, reason: str, dataset: bytes) -> None:
        peer = peer_of_association(assoc)
        LOGGER.warning("refused request from %s@%s: 0x%04X %s", escaped(peer.ae_title),
                       escaped(peer.address), status, escaped(reason, 200))
        count_refused("dicom", status)
        store.quarantine(dataset, "instance-refused", reason, peer, status=status)

    return AssociationHooks(pdu_refused=pdu_refused, command_refused=command_refused)


def start_scp(
    settings: DicomSettings,
    store: InstanceStore,
    on_stored: StoredCallback | None = None,
    *,
    share: int = 1,
) -> RunningSCP:
    """Start the SCP in background threads; ``settings.port`` 0 lets the OS pick.
    ``share``: how many receiving processes share ``max_associations`` (this one takes
    its part, rounded up)."""
    reporter = LimitReporter(store.audit, settings.limit_report_interval_s)
    guard = ConnectionGuard(
        ConnectionLimits(settings.association_timeout_s, settings.max_connections_per_address,
                         settings.max_connections),
        reporter, settings.allows_address)
    return _serve(settings, store, on_stored, reporter, guard, share,
                  (settings.host, settings.port), GuardedAssociationServer)


def serve_handed(settings: DicomSettings, store: InstanceStore, control: socket.socket,
                 address: tuple[str, int], *, share: int,
                 ) -> tuple[RunningSCP, threading.Event]:
    """Start the SCP of a receiving process: it serves what the node's process hands it
    over ``control`` (``address``: where the node listens). The event is set once the
    node's process has closed its end."""
    reporter = LimitReporter(store.audit, settings.limit_report_interval_s)
    holder: list[HandedAssociationServer] = []

    def closed(conn: Connection) -> None:
        if conn.tag is not None and holder:
            holder[0].closed(conn.tag)

    # The node's process applied the allowlist networks and the connection limits.
    guard = ConnectionGuard(ConnectionLimits(settings.association_timeout_s, 1 << 30),
                            reporter, lambda _address: True, on_release=closed)
    running = _serve(settings, store, None, reporter, guard, share, address,
                     HandedAssociationServer, control=control)
    holder.append(cast(HandedAssociationServer, running.server))
    return running, holder[0].ended


def _serve(settings: DicomSettings, store: InstanceStore, on_stored: StoredCallback | None,
           reporter: LimitReporter, guard: ConnectionGuard, share: int,
           address: tuple[str, int], server_class: type[GuardedAssociationServer],
           **server_args: Any) -> RunningSCP:
    escape_library_logs("pynetdicom")
    ae = build_ae(settings)
    ae.maximum_associations = -(-settings.max_associations // share)
    max_bytes = int(settings.max_instance_mb * 1024 * 1024)
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, set_nodelay),
        (evt.EVT_REQUESTED, handle_requested, [settings, store]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [store, max_bytes, on_stored]),
        (evt.EVT_ACSE_RECV, release_settles, [store]),
        (evt.EVT_ABORTED, sender_gone, [store]),
        (evt.EVT_REJECTED, handle_rejected, [reporter, ae.maximum_associations]),
    ]
    context = server_ssl_context(settings)
    server = cast(GuardedAssociationServer, ae.make_server(
        address, ssl_context=context, evt_handlers=handlers,
        server_class=server_class, guard=guard,
        # A data set over the instance limit is refused (0xA700) either way; up to
        # OVERSIZE_KEPT_BYTES past the limit it is still kept whole for the quarantine,
        # beyond that its bytes are dropped as they arrive so memory stays bounded.
        limits=AssociationLimits(settings.max_association_request_kb * 1024,
                                 max_bytes + OVERSIZE_KEPT_BYTES),
        hooks=association_hooks(store, reporter), backlog=settings.listen_backlog,
        socket_timeout_s=settings.network_timeout_s, **server_args))
    guard.start()
    threading.Thread(target=server.serve_forever, name="dicom-scp-accept",
                     daemon=True).start()
    if server_class is GuardedAssociationServer:
        LOGGER.info("DICOM SCP %s listening on %s:%s%s", settings.ae_title, settings.host,
                    server.server_address[1], " (TLS)" if context else "")
    return RunningSCP(ae, server)
