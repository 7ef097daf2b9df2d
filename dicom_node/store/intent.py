"""The index intent of a journaled instance: what its index row needs besides the bytes
(the header read at receipt, the peer, its digest), as compact JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from dicom_node.dicom.parse import InstanceHeader


@dataclass(frozen=True, slots=True)
class Peer:
    ae_title: str | None = None
    address: str | None = None
    called_ae: str | None = None


_HEADER_FIELDS = tuple(f.name for f in fields(InstanceHeader))
_PEER_FIELDS = tuple(f.name for f in fields(Peer))


def intent_of(header: InstanceHeader, peer: Peer, produced_here: bool, digest: str) -> bytes:
    # Flat dataclasses of str, int and None: a plain dict is what asdict() would build
    # through its recursive copy, in half the time (once per received instance).
    return json.dumps({"h": {n: getattr(header, n) for n in _HEADER_FIELDS},
                       "p": {n: getattr(peer, n) for n in _PEER_FIELDS},
                       "here": produced_here, "sha256": digest},
                      separators=(",", ":")).encode()


def from_intent(raw: bytes) -> tuple[InstanceHeader, Peer, bool, str]:
    doc = json.loads(raw)
    return (InstanceHeader(**doc["h"]), Peer(**doc["p"]), bool(doc["here"]),
            str(doc["sha256"]))
