"""Hostile input at the bridge: bad STOW bodies, path traversal, no token. Every refusal
is a 4xx with a reason, stores nothing, and the bridge keeps serving."""

from __future__ import annotations

import http.client
import io

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from dicom_node.store.models import Instance
from tests.viewer.conftest import BridgeNode, json_body

BOUNDARY = "hostile-boundary"
RELATED = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def part10(path: str = "CT_small.dcm") -> bytes:
    out = io.BytesIO()
    pydicom.dcmread(get_testdata_file(path)).save_as(out, enforce_file_format=True)
    return out.getvalue()


def body(*parts: tuple[bytes, str]) -> bytes:
    chunks = [f"--{BOUNDARY}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
              for data, ctype in parts]
    return b"".join(chunks) + f"--{BOUNDARY}--\r\n".encode()


def count(bridge: BridgeNode) -> int:
    with bridge.node.parts.db.session() as s:
        return int(s.execute(select(func.count()).select_from(Instance)).scalar_one())


def stow(bridge: BridgeNode, data: bytes, ctype: str = RELATED) -> tuple[int, dict, bytes]:
    return bridge.request("/dicomweb/studies", method="POST", data=data,
                          headers={"Content-Type": ctype})


@pytest.mark.parametrize("case", ["wrong-content-type", "json-parts", "broken-multipart",
                                  "no-boundary", "oversized"])
def test_bad_stow_requests_get_a_4xx_with_a_reason_and_store_nothing(
    bridge: BridgeNode, case: str
) -> None:
    before = count(bridge)
    good = body((part10(), "application/dicom"))
    if case == "wrong-content-type":
        status, _, reply = stow(bridge, good, "application/json")
        assert status == 415
    elif case == "json-parts":
        status, _, reply = stow(bridge, good, RELATED.replace("application/dicom",
                                                              "application/dicom+json"))
        assert status == 415
    elif case == "broken-multipart":
        status, _, reply = stow(bridge, good[: len(good) // 2])  # cut mid-instance
        assert status == 400
    elif case == "no-boundary":
        status, _, reply = stow(bridge, good, 'multipart/related; type="application/dicom"')
        assert status == 400
    else:  # the bridge fixture allows 1 MB
        status, _, reply = stow(bridge, body((b"\0" * (2 << 20), "application/dicom")))
        assert status == 413
    assert json_body(reply)["error"]
    assert count(bridge) == before
    assert bridge.request("/healthz", auth=False)[0] == 200


def test_non_dicom_part_fails_alone_and_the_good_part_is_stored(bridge: BridgeNode) -> None:
    good = part10("MR_small.dcm")
    uid = str(pydicom.dcmread(io.BytesIO(good)).SOPInstanceUID)
    status, headers, reply = stow(bridge, body((b"%PDF-1.4 not dicom", "application/dicom"),
                                               (good, "application/dicom"),
                                               (b"{}", "application/json")))
    assert status == 202
    doc = json_body(reply)
    assert [i["00081155"]["Value"][0] for i in doc["00081199"]["Value"]] == [uid]
    reasons = [i["00081197"]["Value"][0] for i in doc["00081198"]["Value"]]
    assert reasons == [0xC210, 0x0122]
    assert "not a DICOM Part 10" in headers["warning"]
    status, _, reply = stow(bridge, body((b"garbage" * 50, "application/dicom")))
    assert status == 409
    assert json_body(reply)["00081198"]["Value"][0]["00081197"]["Value"] == [0xC210]


@pytest.mark.parametrize(("path", "expected"), [
    # A UID segment that is not a DICOM UID reaches its route: 400 with the reason (BadUid).
    ("/dicomweb/studies/1.2.3/series/4.5/instances/..", 400),
    ("/dicomweb/studies/1.2.3.%00/series", 400),
    # The server decodes %2F before routing and does not fold `..`: extra segments make a
    # path that no route has, 404, never a file.
    ("/dicomweb/studies/..%2F..%2F..%2Fetc%2Fpasswd/metadata", 404),
    ("/dicomweb/studies/1.2.3/series/..%2F..%2F..%2Fnode.db", 404),
    ("/dicomweb/studies/1.2.3/series/4.5/instances/..%2Fx/frames/1", 404),
    ("/dicomweb/studies/../../etc/passwd", 404),
])
def test_path_traversal_in_uids_is_refused(bridge: BridgeNode, path: str,
                                           expected: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", bridge.node.http_port, timeout=30)
    conn.request("GET", path, headers={"Authorization": f"Bearer {bridge.token}"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    assert resp.status == expected, (resp.status, data[:200])
    if expected == 400:
        assert b"UID" in data, data[:200]  # the reason names what was wrong
    assert b"root:" not in data and b"SQLite" not in data


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", "Basic dGVzdDp0ZXN0"])
def test_requests_without_a_valid_token_are_refused(
    bridge: BridgeNode, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    for method, path in (("GET", "/dicomweb/studies"), ("POST", "/dicomweb/studies"),
                         ("GET", "/status")):
        status, hdrs, reply = bridge.request(path, method=method, headers=headers, auth=False,
                                             data=b"" if method == "POST" else None)
        assert status == 401, path
        assert "Bearer" in hdrs["www-authenticate"]
        assert "token" in json_body(reply)["error"]


def test_login_cookie_authenticates_the_browser(bridge: BridgeNode) -> None:
    import urllib.parse

    form = urllib.parse.urlencode({"token": bridge.token, "next": "//evil.example/"}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", bridge.node.http_port, timeout=30)
    conn.request("POST", "/login", body=form,
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 303
    assert resp.getheader("Location") == "/"  # never off-site
    cookie = resp.getheader("Set-Cookie") or ""
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    status, _, _ = bridge.request("/dicomweb/studies", auth=False,
                                  headers={"Cookie": cookie.split(";")[0]})
    assert status == 200
    bad = urllib.parse.urlencode({"token": "nope"}).encode()
    conn.request("POST", "/login", body=bad,
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 401
    conn.close()
