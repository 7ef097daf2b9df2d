"""The C-STORE response the node writes itself (``dicom.store_response``) is byte for
byte what pynetdicom would encode, and anything it does not cover is left to
pynetdicom."""

from __future__ import annotations

from typing import Any

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from dicom_node.dicom.status import Status
from dicom_node.dicom.store_response import store_response_pdv

CT = "1.2.840.10008.5.1.4.1.1.2"


def primitive(**fields: Any) -> C_STORE:
    rsp = C_STORE()
    for name, value in fields.items():
        setattr(rsp, name, value)
    return rsp


def pynetdicom_pdv(rsp: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    [pdata] = list(message.encode_msg(1, 16384))
    [(_, pdv)] = pdata.presentation_data_value_list
    return bytes(pdv)


@pytest.mark.parametrize("fields", [
    # As pynetdicom's SCP answers: the request's Message ID copied, an odd UID padded.
    {"MessageID": 7, "MessageIDBeingRespondedTo": 7, "AffectedSOPClassUID": CT,
     "AffectedSOPInstanceUID": "1.2.3.45", "Status": Status.SUCCESS},
    {"MessageIDBeingRespondedTo": 65535, "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.1.4",
     "AffectedSOPInstanceUID": "1.2.3.4", "Status": 0xA700},
    {"MessageIDBeingRespondedTo": 1, "AffectedSOPClassUID": CT, "Status": 0xB000},
    {"MessageIDBeingRespondedTo": 1, "Status": 0xC210},  # no UIDs (an unreadable request)
], ids=["success", "out-of-resources", "warning", "cannot-understand"])
def test_the_response_bytes_are_pynetdicoms(fields: dict[str, Any]) -> None:
    assert store_response_pdv(primitive(**fields)) == pynetdicom_pdv(primitive(**fields))


@pytest.mark.parametrize("response", [
    primitive(MessageIDBeingRespondedTo=1, Status=0xA900, ErrorComment="mismatch"),
    primitive(MessageIDBeingRespondedTo=1, Status=0xC000, OffendingElement=[0x00100010]),
    primitive(MessageID=3, AffectedSOPClassUID=CT, AffectedSOPInstanceUID="1.2"),  # a request
    C_ECHO(),
], ids=["error-comment", "offending-element", "request", "echo"])
def test_what_it_does_not_cover_goes_pynetdicoms_way(response: object) -> None:
    assert store_response_pdv(response) is None
