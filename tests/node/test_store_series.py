"""storescu sends a CT series: indexed, stored unchanged, completed after the quiet period;
duplicate SOP Instance UIDs follow the rule documented in dicom_node/store/instances.py."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicom_node.node import Node
from dicom_node.store import applier
from dicom_node.store.models import Series, SeriesState
from tests.node.conftest import (
    Index,
    SeriesFiles,
    dataset_bytes,
    make_ct_series,
    node_config_data,
    storescu,
    wait_until,
)

pytestmark = pytest.mark.peers


def test_series_is_indexed_stored_unchanged_and_completes_after_quiet_period(
    tmp_path: Path, ct100: SeriesFiles, start_node: Callable[..., Node],
    open_index: Callable[[Path], Index],
) -> None:
    """Files are compared on the dataset bytes after the file meta group: the node
    writes its own meta group (negotiated transfer syntax, its implementation UID,
    the source AE), everything after it must be the bytes storescu sent."""
    quiet = 4.0
    data_dir = tmp_path / "node"
    node = start_node(node_config_data(data_dir, quiet_s=quiet))
    index = open_index(data_dir)

    sent = storescu(node.port, *ct100.files, options=("-v",))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    # Right after the send the quiet period is not over: still receiving.
    assert index.series_state(ct100.series_uid) == SeriesState.RECEIVING

    assert index.instance_count(ct100.series_uid) == 100
    paths = index.instance_paths()
    assert set(paths) == set(ct100.sop_uids)
    for source, uid in zip(ct100.files, ct100.sop_uids, strict=True):
        stored = paths[uid]
        assert stored.parent.parent.name == ct100.study_uid
        assert stored.parent.name == ct100.series_uid
        assert stored.name == f"{uid}.dcm"
        assert dataset_bytes(stored) == dataset_bytes(source), f"{uid} changed on the way"
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == pydicom.dcmread(source).file_meta.TransferSyntaxUID

    wait_until(lambda: index.series_state(ct100.series_uid) == SeriesState.COMPLETE,
               timeout=60, what="series complete (no rule matches: stored only)")
    with index.db.session() as s:
        series = s.execute(select(Series).where(Series.series_uid == ct100.series_uid)
                           ).scalar_one()
        assert series.instance_count == 100
        assert series.completed_at is not None
        # Completed no earlier than one quiet period after the last instance (node clock).
        assert series.completed_at >= series.last_received_at + timedelta(seconds=quiet)
    # No temporary files left behind.
    assert not list((data_dir / "instances").rglob("*.tmp"))


def _store_ok(result_stdout: str) -> int:
    return result_stdout.count("Received Store Response (Success)")


def test_identical_resend_is_success_with_one_row(
    tmp_path: Path, start_node: Callable[..., Node], open_index: Callable[[Path], Index],
) -> None:
    series = make_ct_series(tmp_path / "one", 1)
    data_dir = tmp_path / "node"
    node = start_node(node_config_data(data_dir))
    for _ in range(2):
        result = storescu(node.port, series.files[0], options=("-v",))
        assert result.returncode == 0 and _store_ok(result.stdout + result.stderr) == 1, \
            result.stdout + result.stderr
    index = open_index(data_dir)
    assert index.instance_count() == 1
    assert index.audit("duplicate-conflict") == []
    assert not list((data_dir / "quarantine").glob("*.bin"))


def test_conflicting_duplicate_keeps_first_and_quarantines_newcomer(
    tmp_path: Path, start_node: Callable[..., Node], open_index: Callable[[Path], Index],
) -> None:
    series = make_ct_series(tmp_path / "one", 1)
    first = series.files[0]
    other = copy.deepcopy(pydicom.dcmread(first))
    other.ImageComments = "same UID, other content"
    second = tmp_path / "second.dcm"
    other.save_as(second, enforce_file_format=True)
    assert dataset_bytes(second) != dataset_bytes(first)

    data_dir = tmp_path / "node"
    node = start_node(node_config_data(data_dir))
    for f in (first, second):
        result = storescu(node.port, f, options=("-v",))
        assert result.returncode == 0 and _store_ok(result.stdout + result.stderr) == 1, \
            result.stdout + result.stderr

    index = open_index(data_dir)
    assert index.instance_count() == 1
    stored = index.instance_paths()[series.sop_uids[0]]
    assert dataset_bytes(stored) == dataset_bytes(first), "the first version must be kept"
    events = index.audit("duplicate-conflict")
    assert len(events) == 1
    assert events[0].sop_instance_uid == series.sop_uids[0]
    assert events[0].quarantine_path
    kept = Path(events[0].quarantine_path)
    assert kept.parent == (data_dir / "quarantine").resolve()
    assert dataset_bytes(kept.read_bytes()) == dataset_bytes(second)
    assert kept.with_suffix(".json").exists()


@pytest.mark.parametrize("end", ["release", "abort"])
def test_an_association_s_instances_are_indexed_when_it_ends_not_after_the_linger(
    end: str, tmp_path: Path, start_node: Callable[..., Node],
    open_index: Callable[[Path], Index], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The applier lingers for a fuller batch (here a minute, so nothing else would
    index them): a release is answered only once the association's instances are
    indexed, and an abort has them indexed at once."""
    monkeypatch.setattr(applier, "LINGER_S", 60.0)
    series = make_ct_series(tmp_path / "ct", 5)
    data_dir = tmp_path / "node"
    node = start_node(node_config_data(data_dir))
    index = open_index(data_dir)
    result = storescu(node.port, *series.files,
                      options=("-v", "--abort") if end == "abort" else ("-v",))
    assert _store_ok(result.stdout + result.stderr) == 5, result.stdout + result.stderr
    if end == "release":
        assert result.returncode == 0, result.stdout + result.stderr
        assert index.sop_uids() == set(series.sop_uids), "released before it was indexed"
    else:
        wait_until(lambda: index.sop_uids() == set(series.sop_uids), timeout=20,
                   what="an aborted association's instances indexed")
