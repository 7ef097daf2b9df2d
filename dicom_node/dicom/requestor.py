"""pynetdicom's requestor associations without its pause race (pynetdicom 3.0.4).

The race, and the reactor that avoids it, are described in ``dicom/reactor.py``.
:func:`install` makes every requestor association of this process a
:class:`RequestorAssociation` (``pynetdicom.ae`` looks ``Association`` up each time it
associates); the node's acceptor associations are
:class:`~dicom_node.dicom.association.NodeAssociation`, built on the same reactor.
"""

from __future__ import annotations

import pynetdicom.ae
from pynetdicom.association import Association

from dicom_node.dicom.reactor import ReactorAssociation


class _AnyAssociation(type):
    """``pynetdicom.ae`` uses its name ``Association`` both to build requestors and to
    count an AE's active associations (``isinstance``): after :func:`install` every
    association must still count, the node's acceptors included."""

    def __instancecheck__(cls, instance: object) -> bool:
        return isinstance(instance, Association)


class RequestorAssociation(ReactorAssociation, metaclass=_AnyAssociation):
    """A requestor association whose reactor pauses without the race.
    ``isinstance(x, RequestorAssociation)`` holds for every pynetdicom association."""


def install() -> None:
    """Every requestor association pynetdicom makes in this process from now on is a
    :class:`RequestorAssociation` (idempotent)."""
    pynetdicom.ae.Association = RequestorAssociation  # type: ignore[misc]
