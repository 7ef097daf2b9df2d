"""Duplicates are judged on the dataset, not on the file meta group the node writes
(which records the sender's AE title): the same instance from another AE changes
nothing; another dataset under the same UID is still kept apart (test_store_series)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import update

from dicom_node.node import Node
from dicom_node.store.models import Instance
from tests.node.conftest import (
    Index,
    dataset_bytes,
    make_ct_series,
    node_config_data,
    storescu,
)

pytestmark = pytest.mark.peers


def test_resend_from_another_ae_is_a_quiet_success(
    tmp_path: Path, start_node: Callable[..., Node], open_index: Callable[[Path], Index],
) -> None:
    series = make_ct_series(tmp_path / "ct", 2)
    data_dir = tmp_path / "node"
    node = start_node(node_config_data(data_dir))
    first = storescu(node.port, *series.files, calling_ae="MODALITY")
    assert first.returncode == 0, first.stdout + first.stderr
    # The PACS forwards the same study later, under its own AE title, with dcmtk ...
    again = storescu(node.port, *series.files, calling_ae="PACS", options=("-v",))
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("Received Store Response (Success)") + \
        again.stderr.count("Received Store Response (Success)") == 2
    # ... and a workstation with pynetdicom.
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TESSERA")
    assert assoc.is_established
    try:
        for path in series.files:
            status = assoc.send_c_store(path)
            assert status and int(status.Status) == 0x0000
    finally:
        assoc.release()

    index = open_index(data_dir)
    assert index.instance_count() == 2
    assert index.audit("duplicate-conflict") == []
    assert not list((data_dir / "quarantine").glob("*.bin"))
    for uid, path in index.instance_paths().items():
        source = series.files[series.sop_uids.index(uid)]
        assert dataset_bytes(path) == dataset_bytes(source)


def test_instance_indexed_with_a_whole_file_digest_is_still_recognised(
    tmp_path: Path, start_node: Callable[..., Node], open_index: Callable[[Path], Index],
) -> None:
    """Rows written before the digest covered the dataset only hold the whole file's:
    the stored file's dataset is compared instead."""
    series = make_ct_series(tmp_path / "ct", 1)
    data_dir = tmp_path / "node"
    node = start_node(node_config_data(data_dir))
    assert storescu(node.port, series.files[0], calling_ae="MODALITY").returncode == 0
    index = open_index(data_dir)
    stored = index.instance_paths()[series.sop_uids[0]]
    with index.db.session() as s:
        s.execute(update(Instance).values(
            sha256=hashlib.sha256(stored.read_bytes()).hexdigest()))
    assert storescu(node.port, series.files[0], calling_ae="PACS").returncode == 0
    assert index.audit("duplicate-conflict") == []
    assert not list((data_dir / "quarantine").glob("*.bin"))
