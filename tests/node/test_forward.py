"""Forward rules: delivery to a real Orthanc and to dcmtk storescp; a destination that
is down is retried and then served exactly once; after max_attempts, dead letters."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update

from dicom_node.node import Node
from dicom_node.pipeline.export import Exporter
from dicom_node.pipeline.flow import ExportPayload
from dicom_node.store.jobs import ClaimedJob
from dicom_node.store.models import Job, JobState, OutboxItem, OutboxState, Series, SeriesState
from tests.node.conftest import (
    Index,
    Orthanc,
    SeriesFiles,
    StoreSCP,
    dataset_bytes,
    forward_rule,
    make_ct_series,
    node_config_data,
    status_json,
    storescu,
    wait_until,
    write_node_config,
)
from tests.peers import free_port

pytestmark = pytest.mark.peers


def _outbox(index: Index) -> list[OutboxItem]:
    with index.db.session() as s:
        return list(s.execute(select(OutboxItem).order_by(OutboxItem.id)).scalars())


def _jobs(index: Index, kind: str = "export") -> list[Job]:
    with index.db.session() as s:
        return list(s.execute(select(Job).where(Job.kind == kind).order_by(Job.id)).scalars())


def _orthanc_has_series(orthanc: Orthanc, series_uid: str) -> bool:
    for orthanc_id in orthanc.get("/series"):
        tags = orthanc.get(f"/series/{orthanc_id}")["MainDicomTags"]
        if tags.get("SeriesInstanceUID") == series_uid:
            return True
    return False


def test_forward_rule_delivers_to_orthanc_and_storescp(
    tmp_path: Path, ct100: SeriesFiles, orthanc: Orthanc,
    storescp_factory: Callable[..., StoreSCP], start_node: Callable[..., Node],
    open_index: Callable[[Path], Index],
) -> None:
    scp = storescp_factory()
    data_dir = tmp_path / "node"
    node = start_node(node_config_data(
        data_dir,
        destinations={
            "orthanc": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
            "scp": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port},
        },
        rules=[forward_rule("ct-out", "orthanc", "scp", modality=["CT"])],
    ))
    sent = storescu(node.port, *ct100.files)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    wait_until(lambda: len(orthanc.get("/instances")) >= 100, timeout=90,
               what="100 instances in Orthanc")
    wait_until(lambda: len(scp.received()) >= 100, timeout=90,
               what="100 instances in storescp")
    index = open_index(data_dir)
    wait_until(lambda: index.series_state(ct100.series_uid) == SeriesState.FORWARDED,
               timeout=30, what="series forwarded")

    assert len(orthanc.get("/instances")) == 100
    assert orthanc.get("/statistics")["CountInstances"] == 100
    assert _orthanc_has_series(orthanc, ct100.series_uid)

    by_uid = dict(zip(ct100.sop_uids, ct100.files, strict=True))
    received = scp.received_sop_uids()
    assert sorted(received) == sorted(ct100.sop_uids)
    for path in scp.received():
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(path) == dataset_bytes(by_uid[uid])

    items = _outbox(index)
    assert len(items) == 200
    assert {i.state for i in items} == {OutboxState.SENT}
    assert Counter(i.destination for i in items) == {"orthanc": 100, "scp": 100}

    # A crash after the last delivery and before the series was marked: the job's retry
    # finds nothing left to send, sends nothing twice, and marks it.
    with node.parts.db.session() as s:
        s.execute(update(Series).where(Series.series_uid == ct100.series_uid)
                  .values(state=SeriesState.QUEUED))
    exporter = next(h for h in node.parts.handlers if isinstance(h, Exporter))
    payload = ExportPayload(ct100.series_uid, "scp")
    exporter.run(ClaimedJob(0, payload.kind, payload.key, payload.to_json(), 2, 5),
                 lambda: None)
    assert index.series_state(ct100.series_uid) == SeriesState.FORWARDED
    assert len(scp.received()) == 100


def test_rule_that_does_not_match_forwards_nothing(
    tmp_path: Path, storescp_factory: Callable[..., StoreSCP],
    start_node: Callable[..., Node], open_index: Callable[[Path], Index],
) -> None:
    series = make_ct_series(tmp_path / "ct", 3)
    scp = storescp_factory()
    data_dir = tmp_path / "node"
    node = start_node(node_config_data(
        data_dir,
        destinations={"scp": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}},
        rules=[forward_rule("mr-only", "scp", modality=["MR"])],
    ))
    assert storescu(node.port, *series.files).returncode == 0
    index = open_index(data_dir)
    wait_until(lambda: index.series_state(series.series_uid) == SeriesState.COMPLETE,
               timeout=30, what="series complete, stored only")
    assert _outbox(index) == []
    assert scp.received() == []


@pytest.mark.slow
def test_destination_down_is_retried_then_delivered_exactly_once(
    tmp_path: Path, storescp_factory: Callable[..., StoreSCP],
    start_node: Callable[..., Node], open_index: Callable[[Path], Index],
) -> None:
    series = make_ct_series(tmp_path / "ct", 20)
    port = free_port()  # nothing listens there yet
    data_dir = tmp_path / "node"
    data = node_config_data(
        data_dir, max_attempts=100, backoff_s=0.3,
        destinations={"down": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": port}},
        rules=[forward_rule("all", "down")],
    )
    node = start_node(data)
    config = write_node_config(tmp_path / "status.toml", data)
    assert storescu(node.port, *series.files).returncode == 0
    index = open_index(data_dir)

    def retried() -> bool:
        jobs = _jobs(index)
        return bool(jobs) and jobs[0].attempts >= 2 and jobs[0].state == "pending"

    wait_until(retried, timeout=60, what="export job retried twice")
    job = _jobs(index)[0]
    assert job.last_error and f"127.0.0.1:{port}" in job.last_error
    report = status_json(config)
    assert report["outbox"] == {"down": {"pending": 20}}
    assert report["jobs"]["export"].get("pending", 0) + report["jobs"]["export"].get(
        "running", 0) == 1
    assert report["series"].get(SeriesState.QUEUED) == 1

    scp = storescp_factory(port)
    wait_until(lambda: {i.state for i in _outbox(index)} == {OutboxState.SENT}, timeout=60,
               what="outbox all sent after the destination came up")
    wait_until(lambda: index.series_state(series.series_uid) == SeriesState.FORWARDED,
               timeout=30, what="series forwarded")
    # Count once no export job is left to run: a duplicate delivery could only come from
    # one (a retried or re-claimed job resending rows it already sent).
    wait_until(lambda: {j.state for j in _jobs(index)} == {JobState.DONE}, timeout=60,
               what="every export job done")
    received = Counter(scp.received_sop_uids())
    assert set(received) == set(series.sop_uids)
    assert max(received.values()) == 1, f"delivered more than once: {received.most_common(3)}"
    assert status_json(config)["outbox"] == {"down": {"sent": 20}}
    assert all(i.sent_at is not None for i in _outbox(index))


def test_pending_export_shows_its_last_error_in_status(
    tmp_path: Path, start_node: Callable[..., Node], open_index: Callable[[Path], Index],
) -> None:
    """An operator running ``tessera node status`` while a destination is down must see
    why the outbox is not draining (attempts and last error), not only counts."""
    series = make_ct_series(tmp_path / "ct", 2)
    data_dir = tmp_path / "node"
    port = free_port()
    data = node_config_data(
        data_dir, max_attempts=100, backoff_s=0.3,
        destinations={"down": {"ae_title": "NOBODY", "host": "127.0.0.1", "port": port}},
        rules=[forward_rule("all", "down")],
    )
    node = start_node(data)
    assert storescu(node.port, *series.files).returncode == 0
    index = open_index(data_dir)
    wait_until(lambda: any(j.attempts >= 2 for j in _jobs(index)), timeout=60,
               what="export job retried")
    text = json.dumps(status_json(write_node_config(tmp_path / "status.toml", data)))
    assert f"127.0.0.1:{port}" in text, "status does not say why the pending export retries"


def test_dead_letter_after_max_attempts(
    tmp_path: Path, start_node: Callable[..., Node], open_index: Callable[[Path], Index],
) -> None:
    series = make_ct_series(tmp_path / "ct", 5)
    data_dir = tmp_path / "node"
    port = free_port()
    data = node_config_data(
        data_dir, max_attempts=2, backoff_s=0.2,
        destinations={"dead": {"ae_title": "NOBODY", "host": "127.0.0.1", "port": port}},
        rules=[forward_rule("all", "dead")],
    )
    node = start_node(data)
    assert storescu(node.port, *series.files).returncode == 0
    index = open_index(data_dir)
    wait_until(lambda: [j.state for j in _jobs(index)] == ["dead"], timeout=60,
               what="export job dead")
    wait_until(lambda: {i.state for i in _outbox(index)} == {OutboxState.DEAD}, timeout=10,
               what="outbox items dead")
    job = _jobs(index)[0]
    assert job.attempts == 2

    report = status_json(write_node_config(tmp_path / "status.toml", data))
    assert report["outbox"] == {"dead": {"dead": 5}}
    dead_jobs = report["dead_letters"]["jobs"]
    assert len(dead_jobs) == 1
    assert dead_jobs[0]["kind"] == "export" and dead_jobs[0]["attempts"] == 2
    assert f"127.0.0.1:{port}" in dead_jobs[0]["reason"]
    dead_items = report["dead_letters"]["outbox"]
    assert {d["sop_instance_uid"] for d in dead_items} == set(series.sop_uids)
    assert all(d["destination"] == "dead" and d["reason"] for d in dead_items)

    # Dead letters are not "forwarded", even when a later run of the job finds nothing
    # left to send.
    exporter = next(h for h in node.parts.handlers if isinstance(h, Exporter))
    payload = ExportPayload(series.series_uid, "dead")
    claimed = ClaimedJob(job.id, payload.kind, payload.key, payload.to_json(), 2, 2)
    exporter.run(claimed, lambda: None)
    assert index.series_state(series.series_uid) == SeriesState.QUEUED
    # A job that gives up while a successor waits (items queued while it ran) leaves the
    # items to that successor; without one they are dead letters.
    with node.parts.db.session() as s:  # not due: the node's workers leave it alone
        s.execute(update(OutboxItem).values(state=OutboxState.PENDING))
        successor = node.parts.queue.enqueue(payload.kind, payload.key, payload.to_json(),
                                             session=s, unique_active=False)
        assert successor is not None
        s.execute(update(Job).where(Job.id == successor).values(
            not_before=datetime.now(UTC) + timedelta(hours=1)))
    with node.parts.db.session() as s:
        exporter.on_dead(claimed, "gave up", s)
    assert {i.state for i in _outbox(index)} == {OutboxState.PENDING}
    with node.parts.db.session() as s:
        s.execute(update(Job).where(Job.id == successor).values(state=JobState.DONE))
    with node.parts.db.session() as s:
        exporter.on_dead(claimed, "gave up", s)
    assert {i.state for i in _outbox(index)} == {OutboxState.DEAD}
