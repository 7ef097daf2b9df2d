"""The intake journal in-process (issue 24): one fdatasync covers every record written
before it (group commit), a torn tail is ignored, and replay repairs what a power cut
can leave behind (an index row whose file never reached the disk)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicom_node.dicom.meta import dataset_offset
from dicom_node.dicom.parse import InstanceHeader, parse_instance
from dicom_node.store.db import Database
from dicom_node.store.files import InstanceFiles
from dicom_node.store.instances import IngestOutcome, InstanceStore, Peer, dataset_digest
from dicom_node.store.intent import intent_of
from dicom_node.store.journal import (
    SPARE_SUFFIX,
    IntakeJournal,
    JournalInUse,
    frame,
    journal_holder,
    journal_records,
    read_segment,
)
from tests.node.conftest import make_ct_series


def header_of(data: bytes) -> InstanceHeader:
    return parse_instance(data[dataset_offset(data):], transfer_syntax_uid="1.2.840.10008.1.2.1",
                          context_sop_class_uid=None, command_sop_instance_uid=None,
                          max_bytes=1 << 30)


def make_store(tmp_path: Path) -> InstanceStore:
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    db.create_schema()
    return InstanceStore(db, InstanceFiles(tmp_path / "instances", tmp_path / "quarantine"))


def test_one_fdatasync_covers_every_record_written_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    journal = IntakeJournal(tmp_path / "intake")
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr("dicom_node.store.journal.os.fdatasync",
                        lambda fd: (synced.append(fd), real(fd))[1])
    tickets = [journal.append(b"{}", bytes([i]) * 100) for i in range(3)]
    journal.commit(tickets[0].seq)
    for ticket in tickets[1:]:
        journal.commit(ticket.seq)  # already durable: no second sync
    assert len(synced) == 1
    assert journal.fsyncs == 1 and journal.records == 3
    segment = journal.directory / f"{tickets[0].segment:012d}.journal"
    with segment.open("ab") as out:  # a record torn by a crash mid-write
        out.write(frame(b"{}", b"x" * 50, tickets[0].segment) + b"{}" + b"x" * 10)
    assert [data for _, data in read_segment(segment)] == [bytes([i]) * 100 for i in range(3)]


def test_replay_rewrites_a_file_its_index_row_points_at_but_the_disk_lost(
    tmp_path: Path,
) -> None:
    series = make_ct_series(tmp_path / "ct", 3)
    store = make_store(tmp_path)
    peer = Peer(ae_title="REPLAYTEST")
    records = []
    for path in series.files:
        data = path.read_bytes()
        header = header_of(data)
        # Indexed (the relaxed commit reached the disk) ...
        assert store.ingest(data, header, peer) == IngestOutcome.STORED
        records.append(frame(intent := intent_of(header, peer, False, dataset_digest(data)),
                             data, 1) + intent + data)
    lost = store.files.root / store.files.relative_path(
        series.study_uid, series.series_uid, series.sop_uids[1])
    lost.write_bytes(b"")  # ... but the file's data blocks did not (power cut)
    segment = tmp_path / "intake" / "000000000001.journal"
    segment.parent.mkdir(mode=0o700)
    segment.write_bytes(b"".join(records))

    assert store.open_journal(tmp_path / "intake") == 3
    try:
        assert lost.read_bytes() == series.files[1].read_bytes()
        assert not segment.exists()
        with store.db.session() as s:
            from sqlalchemy import func, select

            from dicom_node.store.models import Instance
            assert s.execute(select(func.count()).select_from(Instance)).scalar_one() == 3
        # Journaled ingest after the replay: durable on return, indexed, one record each.
        again = make_ct_series(tmp_path / "ct2", 2)
        for path in again.files:
            data = path.read_bytes()
            assert store.ingest(data, header_of(data), peer) == IngestOutcome.STORED
        assert store.journal is not None and store.journal.records == 2
    finally:
        store.close_journal()
    assert not list((tmp_path / "intake").glob("*.journal"))


def test_a_replay_that_fails_lets_the_journal_go_and_keeps_its_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node's process replays an exited receiver's journal while it keeps running: a
    replay that fails must not keep the journal's lock (the receiver could never open
    it again) nor drop a record."""
    series = make_ct_series(tmp_path / "ct", 3)
    peer = Peer(ae_title="REPLAYTEST")
    records = []
    for path in series.files:
        data = path.read_bytes()
        intent = intent_of(header_of(data), peer, False, dataset_digest(data))
        records.append(frame(intent, data, 1) + intent + data)
    directory = tmp_path / "intake-1"
    directory.mkdir(mode=0o700)
    (directory / "000000000001.journal").write_bytes(b"".join(records))
    spare = directory / f"000000000002{SPARE_SUFFIX}"
    spare.write_bytes(bytes(4096))  # its receiver's, for its next start
    assert journal_holder(directory) is None and journal_records(directory) == 3

    store = make_store(tmp_path)
    real = InstanceStore._apply
    calls: list[int] = []

    def fail_on_the_second(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk went away")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(InstanceStore, "_apply", fail_on_the_second)
    with pytest.raises(OSError, match="disk went away"):
        store.replay_journal(directory)
    assert len(calls) == 2
    assert journal_holder(directory) is None and journal_records(directory) == 3

    monkeypatch.setattr(InstanceStore, "_apply", real)
    assert store.replay_journal(directory) == 3
    assert journal_records(directory) == 0 and journal_holder(directory) is None
    # Replayed without journaling into it: no segment of its own, the spare untouched.
    assert sorted(p.name for p in directory.iterdir()) == sorted(["LOCK", spare.name])
    assert spare.stat().st_size == 4096
    with store.db.session() as s:
        from sqlalchemy import func, select

        from dicom_node.store.models import Instance
        assert s.execute(select(func.count()).select_from(Instance)).scalar_one() == 3


def test_a_journal_whose_start_fails_is_let_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(self: IntakeJournal, sync_index: object) -> None:
        raise OSError("no thread to be had")

    monkeypatch.setattr(IntakeJournal, "start", fail)
    store = make_store(tmp_path)
    with pytest.raises(OSError, match="no thread"):
        store.open_journal(tmp_path / "intake")
    assert journal_holder(tmp_path / "intake") is None


def test_the_holder_of_a_journal_is_read_without_taking_it(tmp_path: Path) -> None:
    journal = IntakeJournal(tmp_path / "intake")
    try:
        assert journal_holder(tmp_path / "intake") == os.getpid()
        with pytest.raises(JournalInUse):
            IntakeJournal(tmp_path / "intake")
        assert journal_holder(tmp_path / "intake") == os.getpid()
    finally:
        journal.close()
    assert journal_holder(tmp_path / "intake") is None
    assert journal_holder(tmp_path / "absent") is None
