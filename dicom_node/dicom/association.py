"""pynetdicom's association, upper layer and DIMSE provider with the node's limits.

Subclasses, not patches, of the installed package:

- :class:`GuardedDUL`, an event-driven upper layer (``dicom/upper_layer.py``), reads
  each PDU's 6-byte header and refuses a declared length over the limit *before*
  reading the body: the negotiated maximum for P-DATA-TF on an established
  association, ``association_request_bytes`` for everything else (an A-ASSOCIATE-RQ
  from anyone, allowed or not). The peer gets an A-ABORT and the connection is
  closed; nothing of the body is buffered.
- :class:`GuardedDIMSE` answers a C-STORE whose command carries an invalid UID with
  0xA900 and a dataset over ``max_dataset_bytes`` with 0xA700 (dropping its bytes as
  they arrive), instead of aborting the association or buffering without bound.
- :class:`NodeAssociation` wires both in and tells its connection when it closes.
- :class:`NodeAE` counts only associations that have sent their A-ASSOCIATE-RQ
  against ``maximum_associations``: a socket that connected and said nothing holds
  no association slot (the connection guard closes it after its timeout).
"""

from __future__ import annotations

import logging
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, C_ECHO, C_STORE, N_EVENT_REPORT
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.utils import make_target

from dicom_node.dicom.peer_text import escaped
from dicom_node.dicom.reactor import ReactorAssociation
from dicom_node.dicom.status import Status
from dicom_node.dicom.store_response import store_response_pdv
from dicom_node.dicom.upper_layer import (
    IDLE_WAIT_S,
    EventDrivenDUL,
    SignallingQueue,
    receive_into,
)

LOGGER = logging.getLogger(__name__)

P_DATA_TF = 0x04
_PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ",
              0x04: "P-DATA-TF", 0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_COMMAND_UIDS = ("AffectedSOPClassUID", "AffectedSOPInstanceUID", "RequestedSOPClassUID",
                 "RequestedSOPInstanceUID")
C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
SOP_CLASS_NOT_SUPPORTED = 0x0122
# A P-DATA-TF PDU's header (6 bytes) and its one item's length and context ID (5).
_PDATA_OVERHEAD = 11
_PYNETDICOM_HANDLERS = "pynetdicom._handlers"  # its standard logging handlers' module
_LOGGED_EVENTS = (evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT, evt.EVT_PDU_RECV, evt.EVT_PDU_SENT)


@dataclass(frozen=True, slots=True)
class AssociationLimits:
    """Byte limits one association enforces (see the module docstring)."""

    association_request_bytes: int
    max_dataset_bytes: int


@dataclass(frozen=True, slots=True)
class AssociationHooks:
    """What the node does when a limit refuses something; each must not raise.

    ``pdu_refused(assoc, reason)``: an oversized PDU, the connection is being aborted.
    ``command_refused(assoc, status, reason, dataset)``: a DIMSE request answered with a
    failure status by this layer (the handler never saw it); ``dataset`` is what was
    kept of its data set (nothing when it was over the limit).
    """

    pdu_refused: Callable[[Association, str], None]
    command_refused: Callable[[Association, int, str, bytes], None]


def _is_uid(value: object) -> bool:
    text = str(value).rstrip("\x00 ")
    return 0 < len(text) <= 64 and _UID_RE.match(text) is not None


def invalid_command_uid(command_set: Dataset) -> str | None:
    """The first UID in a DIMSE command set that is not a valid UID, described safely."""
    for keyword in _COMMAND_UIDS:
        value = command_set.get(keyword)
        if value is not None and not _is_uid(value):
            text = str(value)
            return f"{keyword} is not a valid UID ({len(text)} characters: {escaped(text)})"
    return None


class GuardedDUL(EventDrivenDUL):
    """The upper layer: a PDU's declared length is checked before its body is read."""

    def __init__(self, assoc: Association, limits: AssociationLimits,
                 hooks: AssociationHooks) -> None:
        super().__init__(assoc)
        self._limits = limits
        self._hooks = hooks

    def pdu_limit(self, pdu_type: int) -> int:
        if pdu_type == P_DATA_TF and self.assoc.is_established:
            return int(self.assoc.acceptor.maximum_length or self._limits.association_request_bytes)
        return self._limits.association_request_bytes

    def _read_pdu_data(self) -> None:
        # pynetdicom's version reads whatever length the header declares; this one
        # refuses an oversized PDU first. A short read (peer gone, or the connection
        # guard shut the socket) is a closed transport, logged at debug only.
        raw = self.raw_socket
        header = bytearray(6)
        if raw is None or receive_into(raw, memoryview(header)) < 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in _PDU_NAMES:
            LOGGER.warning("unknown PDU type 0x%02X from %s", pdu_type,
                           escaped(self.assoc.requestor.address))
            self.event_queue.put("Evt19")
            return
        limit = self.pdu_limit(pdu_type)
        if length > limit:
            self._refuse(f"{_PDU_NAMES[pdu_type]} PDU declares {length} bytes, over the "
                         f"limit of {limit}")
            return
        whole = bytearray(6 + length)  # the body is read into place, not appended
        whole[:6] = header
        got = receive_into(raw, memoryview(whole)[6:])
        if got != length:
            LOGGER.debug("connection from %s closed inside a PDU (%d of %d bytes)",
                         escaped(self.assoc.requestor.address), got, length)
            self.event_queue.put("Evt17")
            return
        try:
            pdu, event = self._decode_pdu(whole)
        except Exception as exc:
            LOGGER.warning("cannot decode a %s PDU from %s: %s", _PDU_NAMES[pdu_type],
                           escaped(self.assoc.requestor.address), escaped(exc, 200))
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _refuse(self, reason: str) -> None:
        """A-ABORT (service provider, invalid PDU parameter value), then close."""
        try:
            self._hooks.pdu_refused(self.assoc, reason)
        except Exception:
            LOGGER.exception("pdu_refused hook failed")
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = 0x06
        self.send_abort(abort)
        # The state machine closes the socket (AA-4/AA-5); unread bytes make it a reset.
        self.event_queue.put("Evt17")


class GuardedDIMSE(DIMSEServiceProvider):
    """DIMSE messages: an invalid command UID or an oversized data set gets a status."""

    def __init__(self, assoc: Association, limits: AssociationLimits,
                 hooks: AssociationHooks) -> None:
        super().__init__(assoc)
        self._limits = limits
        self._hooks = hooks
        self._dropped = 0  # data set bytes of the current message thrown away

    def send_msg(self, primitive: Any, context_id: int) -> None:
        # A C-STORE response is written straight to its bytes (dicom/store_response.py)
        # unless something besides pynetdicom's own (silent) logging handler listens for
        # the DIMSE message pynetdicom would build, or the peer's PDU is too small; and
        # sent on this thread when the upper layer allows (EventDrivenDUL.send_pdv).
        pdv = store_response_pdv(primitive)
        listeners = cast(list[tuple[Any, Any]], self.assoc.get_handlers(evt.EVT_DIMSE_SENT))
        if (pdv is None or (0 < self.maximum_pdu_size < len(pdv) + _PDATA_OVERHEAD)
                or any(getattr(handler, "__module__", None) != _PYNETDICOM_HANDLERS
                       for handler, _ in listeners)):
            super().send_msg(primitive, context_id)
            return
        dul = self.dul
        if isinstance(dul, EventDrivenDUL) and dul.send_pdv(context_id, pdv):
            return
        pdata = P_DATA()
        # pynetdicom checks for a list [ID, PDV] (its annotation says tuple).
        pdata.presentation_data_value_list = [[context_id, pdv]]  # type: ignore[list-item]
        self.dul.send_pdu(pdata)

    def receive_primitive(self, primitive: P_DATA) -> None:
        # Mirrors DIMSEServiceProvider.receive_primitive (pynetdicom 3.0), with the
        # node's checks between decoding a complete message and converting it.
        if self.message is None:
            self.message = DIMSEMessage()
            self._dropped = 0
        message = self.message
        try:
            complete = message.decode_msg(primitive, self.assoc)
        except Exception as exc:
            LOGGER.warning("cannot decode a DIMSE message from %s: %s",
                           escaped(self.assoc.requestor.address), escaped(exc, 200))
            self.dul.event_queue.put("Evt19")
            return
        data = message.data_set
        if isinstance(data, BytesIO) and data.tell() > self._limits.max_dataset_bytes:
            self._dropped += data.tell()
            data.seek(0)
            data.truncate()
        if not complete:
            return
        self.message = None
        context_id = cast(int, message.context_id)
        refusal = self._refusal(message)
        if refusal is not None:
            self._answer(message, context_id, *refusal)
            return
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": message})
        try:
            d_primitive = message.message_to_primitive()
        except Exception as exc:
            LOGGER.warning("invalid DIMSE message from %s, aborting: %s",
                           escaped(self.assoc.requestor.address), escaped(exc, 200))
            self.dul.event_queue.put("Evt19")
            return
        if isinstance(d_primitive, C_CANCEL) and len(self.cancel_req) < 10:
            self.cancel_req[cast(int, d_primitive.MessageIDBeingRespondedTo)] = d_primitive
        elif isinstance(d_primitive, N_EVENT_REPORT) and d_primitive.is_valid_request:
            threading.Thread(target=make_target(self.assoc._serve_request),
                             args=(d_primitive, context_id)).start()
        else:
            self.msg_queue.put((context_id, d_primitive))  # type: ignore[arg-type]

    def _refusal(self, message: DIMSEMessage) -> tuple[int, str] | None:
        command = message.command_set
        field = command.get("CommandField")
        if field not in (C_STORE_RQ, C_ECHO_RQ):
            return None
        problem = invalid_command_uid(command)
        if problem is not None:
            status = Status.DATASET_MISMATCH if field == C_STORE_RQ else SOP_CLASS_NOT_SUPPORTED
            return int(status), f"command: {problem}"
        if self._dropped:
            return int(Status.OUT_OF_RESOURCES), (
                f"data set of more than {self._limits.max_dataset_bytes} bytes "
                f"({self._dropped} received)")
        return None

    def _answer(self, message: DIMSEMessage, context_id: int, status: int, reason: str) -> None:
        command = message.command_set
        data = message.data_set
        # A data set dropped on the way is not kept in part (that would mislead).
        kept = data.getvalue() if isinstance(data, BytesIO) and not self._dropped else b""
        try:
            self._hooks.command_refused(self.assoc, status, reason, kept)
        except Exception:
            LOGGER.exception("command_refused hook failed")
        rsp: Any = C_STORE() if command.get("CommandField") == C_STORE_RQ else C_ECHO()
        message_id = command.get("MessageID")
        rsp.MessageIDBeingRespondedTo = message_id if isinstance(message_id, int) else 0
        sop_class = command.get("AffectedSOPClassUID")
        if sop_class is not None and _is_uid(sop_class):
            rsp.AffectedSOPClassUID = sop_class
        sop_instance = command.get("AffectedSOPInstanceUID")
        if isinstance(rsp, C_STORE) and sop_instance is not None and _is_uid(sop_instance):
            rsp.AffectedSOPInstanceUID = sop_instance
        rsp.Status = status
        self.send_msg(rsp, context_id)


class NodeAssociation(ReactorAssociation):
    """An acceptor association with the node's upper layer and DIMSE provider, whose
    reactor waits for work instead of napping: a complete DIMSE message, a primitive
    from the upper layer (release, abort) or a kill wakes it at once."""

    def __init__(self, ae: AE, mode: str, limits: AssociationLimits,
                 hooks: AssociationHooks, on_close: Callable[[], None]) -> None:
        super().__init__(ae, mode)
        self._work = threading.Event()
        # Replaced before a socket is attached (it queues its first event on the DUL).
        dul = GuardedDUL(self, limits, hooks)
        dul.artim_timer.timeout = self.dul.artim_timer.timeout
        dul._idle_timer.timeout = self.dul._idle_timer.timeout
        dul.to_user_queue = SignallingQueue(self._work.set)
        self.dul = dul
        self.dimse = GuardedDIMSE(self, limits, hooks)
        self.dimse.msg_queue = SignallingQueue(self._work.set)
        self._on_close = on_close
        self.bind(evt.EVT_CONN_CLOSE, self._closed)

    def drop_silent_library_logging(self) -> None:
        """Unbind pynetdicom's standard logging handlers when its logger would discard
        what they log. They are bound to every association, log only at INFO and DEBUG,
        and run for every PDU (taking the AE's lock, shared by all associations) and
        every DIMSE message (a C-STORE's copies its whole data set to see whether there
        is one). The node's processes log pynetdicom at WARNING."""
        if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
            return
        for event in _LOGGED_EVENTS:
            bound = cast(list[tuple[Any, Any]], self.get_handlers(event))
            for handler, _ in list(bound):
                if getattr(handler, "__module__", None) == _PYNETDICOM_HANDLERS:
                    self.unbind(event, handler)

    def idle(self, served: bool) -> None:
        # After a turn that served a message, look again at once (another may wait).
        # Clearing after the wait loses nothing: the turn that follows looks at
        # everything, and what arrives after the clear sets the event again.
        if not served:
            self._work.wait(IDLE_WAIT_S)
        self._work.clear()

    def kill(self) -> None:
        self._work.set()
        super().kill()

    def _closed(self, event: evt.Event) -> None:
        self._on_close()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            self._on_close()


class NodeAE(AE):
    """The node's AE: an association holds a slot once its A-ASSOCIATE-RQ arrived."""

    @property
    def active_associations(self) -> list[Association]:
        return [a for a in super().active_associations
                if not a.is_acceptor or a.requestor.primitive is not None]
