"""The index intent of a journaled instance: what its index row needs besides the bytes
(the header read at receipt, the peer, its digest), as compact JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from dicom_node.dicom.parse import InstanceHeader


@dataclass(frozen=True, slots=True)
class Peer:
    ae_title: str | None = None
    address: str | None = None
    called_ae: str | None = None


def intent_of(header: InstanceHeader, peer: Peer, produced_here: bool, digest: str) -> bytes:
    return json.dumps({"h": asdict(header), "p": asdict(peer), "here": produced_here,
                       "sha256": digest}, separators=(",", ":")).encode()


def from_intent(raw: bytes) -> tuple[InstanceHeader, Peer, bool, str]:
    doc = json.loads(raw)
    return (InstanceHeader(**doc["h"]), Peer(**doc["p"]), bool(doc["here"]),
            str(doc["sha256"]))
