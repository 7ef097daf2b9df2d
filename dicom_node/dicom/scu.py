"""C-STORE SCU: sends stored instances unchanged (no decode, exact transfer syntax)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import AE, _config, evt

from dicom_node.config import Destination
from dicom_node.dicom.requestor import install as install_requestor
from dicom_node.dicom.scp import set_nodelay
from dicom_node.errors import DicomNodeError

LOGGER = logging.getLogger(__name__)

# Send the stored bytes as they are, in PDU-sized chunks, never re-encoded.
_config.STORE_SEND_CHUNKED_DATASET = True

_DELIVERED = {0x0000, 0xB000, 0xB006, 0xB007}
_MAX_CONTEXTS = 128


@dataclass(frozen=True, slots=True)
class OutgoingInstance:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path


class AssociationFailed(DicomNodeError):
    """The destination could not be reached or refused/aborted the association."""


ResultCallback = Callable[[OutgoingInstance, int | None, str | None], None]


def _batches(items: Sequence[OutgoingInstance]) -> list[list[OutgoingInstance]]:
    """Split so that each association needs at most 128 presentation contexts."""
    batches: list[list[OutgoingInstance]] = []
    current: list[OutgoingInstance] = []
    contexts: set[tuple[str, str]] = set()
    for item in items:
        pair = (item.sop_class_uid, item.transfer_syntax_uid)
        if pair not in contexts and len(contexts) == _MAX_CONTEXTS:
            batches.append(current)
            current, contexts = [], set()
        contexts.add(pair)
        current.append(item)
    if current:
        batches.append(current)
    return batches


def send_instances(
    destination: Destination,
    calling_ae: str,
    items: Sequence[OutgoingInstance],
    on_result: ResultCallback,
    *,
    timeout_s: float = 30.0,
) -> None:
    """Send ``items`` to ``destination``; ``on_result(item, status, error)`` per instance.

    ``status`` is the peer's DIMSE status (delivered when in 0x0000/0xB000/0xB006/0xB007)
    or ``None`` with ``error`` when no response came.

    Raises
    ------
    AssociationFailed
        The association could not be established or broke; instances already
        reported through ``on_result`` stay reported.
    """
    install_requestor()  # pynetdicom's requestor, without its pause race
    for batch in _batches(items):
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = timeout_s
        ae.dimse_timeout = timeout_s
        ae.network_timeout = timeout_s
        ae.connection_timeout = timeout_s
        for sop_class, ts in sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in batch}):
            ae.add_requested_context(sop_class, [ts])
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
        if not assoc.is_established:
            # pynetdicom reports a refused TCP connection as an abort: only a peer that
            # answered can have rejected or aborted.
            why = "rejected" if assoc.is_rejected else "unreachable or aborted"
            raise AssociationFailed(
                f"association with {destination.ae_title}@{destination.host}:"
                f"{destination.port} {why}"
            )
        try:
            accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                        for cx in assoc.accepted_contexts}
            for item in batch:
                if (item.sop_class_uid, item.transfer_syntax_uid) not in accepted:
                    on_result(item, None, f"destination did not accept {item.sop_class_uid} "
                                          f"in {item.transfer_syntax_uid}")
                    continue
                status = assoc.send_c_store(item.path)
                if not assoc.is_established:
                    on_result(item, None, "association lost while sending")
                    raise AssociationFailed("association lost while sending")
                code = int(getattr(status, "Status", -1)) if status else None
                if code is None or code < 0:
                    on_result(item, None, "no response to C-STORE")
                    raise AssociationFailed("no response to C-STORE (timeout or abort)")
                on_result(item, code, None if code in _DELIVERED else f"status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()


def is_delivered(status: int | None) -> bool:
    return status is not None and status in _DELIVERED
