"""Files and index rows written behind the acknowledgement (issue 24): the applier
applies in batches, holds the associations back when too much waits, applies everything
before it stops; an instance that cannot be indexed is quarantined with its reason, the
others of its batch are indexed, and the journal can still checkpoint."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicom_node.errors import StoreError
from dicom_node.store import instances
from dicom_node.store.applier import BatchApplier
from dicom_node.store.instances import IngestOutcome, Peer
from dicom_node.store.models import AuditEvent, Instance
from tests.node.conftest import make_ct_series
from tests.node.test_journal_replay import header_of, make_store


def test_the_applier_batches_holds_back_and_applies_everything_before_it_stops() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def apply(batch: list[int]) -> None:
        gate.wait(30)
        batches.append(batch)

    applier: BatchApplier[int] = BatchApplier(apply, name="test-apply", max_waiting=3,
                                              max_batch=1)
    for i in range(4):  # one held by the blocked thread, three waiting
        applier.put(i)
    blocked = threading.Thread(target=applier.put, args=(4,))
    blocked.start()
    blocked.join(0.5)
    assert blocked.is_alive(), "a put beyond max_waiting waits for room"
    gate.set()
    blocked.join(30)
    assert not blocked.is_alive()
    applier.stop()
    assert [b for b in batches] == [[0], [1], [2], [3], [4]] and applier.applied == 5
    with pytest.raises(StoreError, match="stopping"):
        applier.put(5)

    gate.clear()
    batches.clear()
    together: BatchApplier[int] = BatchApplier(apply, name="test-batch", max_batch=64)
    together.put(0)  # the thread takes it and waits at the gate ...
    while together.idle():
        threading.Event().wait(0.01)
    for i in range(1, 10):  # ... while nine gather
        together.put(i)
    gate.set()
    together.stop()
    assert batches[1:] == [list(range(1, 10))] or batches == [list(range(10))]


def test_the_applier_lingers_for_a_fuller_batch_until_someone_waits_for_it() -> None:
    batches: list[list[int]] = []
    lingering: BatchApplier[int] = BatchApplier(batches.append, name="test-linger",
                                                linger_s=60.0)
    for i in range(3):
        lingering.put(i)
    threading.Event().wait(0.3)
    assert batches == [], "a small batch lingers for more"
    assert lingering.settle(30), "a settle cuts the linger short and waits for the batch"
    assert batches == [[0, 1, 2]]
    lingering.put(3)
    lingering.flush()  # an aborted sender: applied without anyone waiting for it
    for _ in range(300):
        if lingering.applied == 4:
            break
        threading.Event().wait(0.1)
    assert batches == [[0, 1, 2], [3]]
    lingering.put(4)
    lingering.stop()  # a stop applies what waits, lingering or not
    assert batches[-1] == [4] and lingering.applied == 5


def test_a_put_that_neither_starts_nor_fills_a_batch_wakes_nobody(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every wake of the applier thread is a context switch and a turn for the GIL; while
    it lingers, the associations' puts must not wake it one by one."""
    looks = [0]
    full_or_wanted = BatchApplier._full_or_wanted

    def counted(self: BatchApplier[int]) -> bool:
        looks[0] += 1
        return full_or_wanted(self)

    monkeypatch.setattr(BatchApplier, "_full_or_wanted", counted)
    batches: list[list[int]] = []
    applier: BatchApplier[int] = BatchApplier(batches.append, name="test-quiet",
                                              linger_s=60.0, max_batch=64)
    applier.put(0)
    for _ in range(300):  # the first record woke it: it is lingering now
        if looks[0]:
            break
        threading.Event().wait(0.01)
    for i in range(1, 40):  # spaced as an association's instances are
        applier.put(i)
        threading.Event().wait(0.005)
    threading.Event().wait(0.3)
    lingering_looks = looks[0]
    assert applier.settle(30)
    assert batches == [list(range(40))]
    assert lingering_looks <= 2, f"the applier looked {lingering_looks} times for 40 puts"
    for i in range(40, 104):  # a full batch is due at once, linger or not
        applier.put(i)
    for _ in range(300):
        if applier.applied >= 104:
            break
        threading.Event().wait(0.1)
    assert batches[1] == list(range(40, 104))
    applier.stop()


def test_an_instance_that_cannot_be_indexed_is_quarantined_and_its_batch_indexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    series = make_ct_series(tmp_path / "ct", 4)
    store = make_store(tmp_path)
    store.open_journal(tmp_path / "intake")
    bad = series.sop_uids[2]
    real, real_many = instances.index_instance, instances.index_instances

    def index(s, header, *args):  # type: ignore[no-untyped-def]
        if header.sop_instance_uid == bad:
            raise ValueError("the index refuses this row")
        return real(s, header, *args)

    def index_many(s, items):  # type: ignore[no-untyped-def]
        if any(item.header.sop_instance_uid == bad for item in items):
            raise ValueError("the index refuses this row")
        return real_many(s, items)

    monkeypatch.setattr(instances, "index_instance", index)
    monkeypatch.setattr(instances, "index_instances", index_many)
    monkeypatch.setattr(instances.time, "sleep", lambda s: None)  # the retries' pauses
    told: list[tuple[str, IngestOutcome]] = []
    try:
        for path in series.files:
            data = path.read_bytes()
            outcome = store.receive(data, header_of(data), Peer(ae_title="BEHIND"),
                                    on_applied=lambda *a: told.append(a))
            assert outcome == IngestOutcome.JOURNALED
        assert store.wait_applied(60)
        with store.db.session() as s:
            uids = set(s.execute(select(Instance.sop_instance_uid)).scalars())
            events = list(s.execute(select(AuditEvent).where(
                AuditEvent.kind == "store-failed")).scalars())
        assert uids == set(series.sop_uids) - {bad}
        (event,) = events
        assert event.sop_instance_uid == bad and "the index refuses this row" in event.reason
        kept = list((tmp_path / "quarantine").rglob("*"))
        assert any(p.is_file() and p.read_bytes() == series.files[2].read_bytes()
                   for p in kept), kept
        assert sorted(o for _, o in told) == [IngestOutcome.STORED] * 3
        assert store.journal is not None and store.journal.checkpoint() >= 1
    finally:
        store.close_journal()
    with store.db.session() as s:
        assert s.execute(select(func.count()).select_from(Instance)).scalar_one() == 3


def test_an_ingest_that_fails_is_not_acknowledged_and_holds_up_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """STOW-RS's synchronous path: the record is journaled, the index refuses it, the
    caller sees the error (no acknowledgement), and the journal still checkpoints."""
    series = make_ct_series(tmp_path / "ct", 2)
    store = make_store(tmp_path)
    store.open_journal(tmp_path / "intake")

    def refuse(*args: object) -> None:
        raise ValueError("the index refuses this row")

    try:
        first = series.files[0].read_bytes()
        monkeypatch.setattr(instances, "index_instance", refuse)
        with pytest.raises(ValueError, match="refuses"):
            store.ingest(first, header_of(first), Peer(ae_title="STOW"))
        monkeypatch.undo()
        second = series.files[1].read_bytes()
        assert store.ingest(second, header_of(second), Peer(ae_title="STOW")) == (
            IngestOutcome.STORED)
        assert store.journal is not None
        assert store.journal.checkpoint(timeout_s=5) >= 1, "the failed record holds it up"
    finally:
        store.close_journal()
    with store.db.session() as s:
        assert set(s.execute(select(Instance.sop_instance_uid)).scalars()) == {
            series.sop_uids[1]}
