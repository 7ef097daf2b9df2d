"""Each association's presentation contexts: its own objects, without re-validating
every UID of the server's (see ``dicom_node.dicom.server.acceptor_contexts``)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from dicom_node.config.sections import DicomSettings
from dicom_node.dicom.scp import build_ae
from dicom_node.dicom.server import acceptor_contexts
from dicom_node.store.models import Instance
from tests.node.conftest import make_ct_series, node_config_data, storescu, wait_until

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"


def test_an_association_gets_its_own_contexts_over_the_same_uids() -> None:
    server = build_ae(DicomSettings()).supported_contexts
    assert len(server) > 100  # every storage SOP class, each in every transfer syntax
    copies = acceptor_contexts(server)
    assert len(copies) == len(server)
    for mine, theirs in zip(copies, server, strict=True):
        assert mine is not theirs
        # Not rebuilt: a deep copy makes (and validates) every UID again.
        assert mine.abstract_syntax is theirs.abstract_syntax
        assert all(a is b for a, b in zip(mine.transfer_syntax, theirs.transfer_syntax,
                                          strict=True))
        assert (mine.scu_role, mine.scp_role) == (theirs.scu_role, theirs.scp_role)
    copies[0].context_id, copies[0].result = 1, 0x00
    assert (server[0].context_id, server[0].result) == (None, None)


def test_a_running_association_holds_its_own_contexts_over_the_servers_uids(
        start_node, tmp_path: Path) -> None:
    """What an accepted association holds is built by ``acceptor_contexts``: new context
    objects over the very UID objects of the server's (a deep copy rebuilds them)."""
    node = start_node(node_config_data(tmp_path / "node"))
    ae = AE(ae_title="SHARED")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TESSERA")
    assert assoc.is_established
    try:
        server = node.scp.server
        accepted = wait_until(lambda: server.active_associations, timeout=10,
                              what="the node's side of the association")
        held = accepted[0].acceptor.supported_contexts
        assert len(held) == len(server.contexts)
        for mine, theirs in zip(held, server.contexts, strict=True):
            assert mine is not theirs
            assert mine.abstract_syntax is theirs.abstract_syntax
    finally:
        assoc.release()


@pytest.mark.peers
def test_concurrent_associations_each_negotiate_their_own_transfer_syntax(
        start_node, open_index, tmp_path: Path) -> None:
    """Two storescu at once, one proposing only Implicit VR Little Endian, the other only
    Explicit VR Big Endian: each instance is stored in what its association accepted."""
    data_dir = tmp_path / "node"
    node = start_node(node_config_data(data_dir))
    sends = {IMPLICIT_LE: ("-xi",), EXPLICIT_BE: ("-xb",)}
    series = {syntax: make_ct_series(tmp_path / syntax, 5) for syntax in sends}
    results = {}

    def send(syntax: str) -> None:
        results[syntax] = storescu(node.port, *series[syntax].files, options=sends[syntax])

    threads = [threading.Thread(target=send, args=(s,)) for s in sends]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for syntax, done in results.items():
        assert done.returncode == 0, (syntax, done.stderr[-2000:])
    index = open_index(data_dir)
    wait_until(lambda: index.instance_count() == 10, timeout=30, what="10 instances indexed")
    with index.db.session() as s:
        stored = dict(s.execute(select(Instance.sop_instance_uid,
                                       Instance.transfer_syntax_uid)).all())
    for syntax, files in series.items():
        assert {stored[uid] for uid in files.sop_uids} == {syntax}
