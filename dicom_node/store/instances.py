"""The instance store: durable files plus their index rows, and the audit trail.

Duplicate rule: an instance whose SOP Instance UID is already stored is answered as
stored (Success). Its identity is the dataset, without the file meta group (which
records the sender's AE title and the node's implementation): the same dataset again,
from another AE or by STOW-RS after a C-STORE, changes nothing. A different dataset
under the same UID keeps the first version (as most PACS do by default); the newcomer
is quarantined next to a ``duplicate-conflict`` audit event so nothing is lost.
A late instance of a series that was already complete reopens it (state back to
``receiving``), so routing runs again and the outbox sends only what is new.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.dicom.meta import dataset_offset
from dicom_node.dicom.parse import InstanceHeader
from dicom_node.errors import StoreError
from dicom_node.store.applier import BatchApplier
from dicom_node.store.db import Database
from dicom_node.store.files import InstanceFiles
from dicom_node.store.instance_index import IndexItem, index_instance, index_instances
from dicom_node.store.intent import Peer, from_intent, intent_of
from dicom_node.store.journal import (
    IntakeJournal,
    JournalLeftover,
    Ticket,
    read_segment,
    sync_written,
)
from dicom_node.store.models import AuditEvent, Instance
from dicom_node.store.space import DiskWatermark

LOGGER = logging.getLogger(__name__)

__all__ = ["IngestOutcome", "InstanceStore", "Peer", "dataset_digest"]


def dataset_digest(data: bytes) -> str:
    """sha256 of a Part 10 file's dataset, after its file meta group (of all of
    ``data`` when it has none)."""
    try:
        offset = dataset_offset(data)
    except ValueError:
        offset = 0
    return hashlib.sha256(memoryview(data)[offset:]).hexdigest()


class IngestOutcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"                  # the same dataset already stored
    DUPLICATE_CONFLICT = "duplicate-conflict"  # same UID, other bytes: first kept
    JOURNALED = "journaled"  # durable in the intake journal; file and row come behind


Applied = Callable[[str, IngestOutcome], None]  # (series UID, outcome) once indexed
# What applying one received instance gave: its outcome (None: quarantined), the file
# written (to sync at the journal's checkpoint) and a conflict to record, if any.
AppliedOne = tuple[IngestOutcome | None, Path | None, str | None]


@dataclass(frozen=True, slots=True)
class Received:
    """A journaled instance waiting for its file and index row (see :meth:`receive`)."""

    ticket: Ticket
    data: bytes
    header: InstanceHeader
    peer: Peer
    digest: str
    on_applied: Applied | None = None


@contextmanager
def _journaled(journal: IntakeJournal, intent: bytes, data: bytes) -> Iterator[Ticket]:
    """Append a record and make it durable; the body applies it or hands it on, and
    whoever holds the ticket then marks it applied. If the commit or the body fails,
    the record is marked applied with nothing written, so that it holds up no
    checkpoint (the instance is not acknowledged; a start before the next checkpoint
    replays it)."""
    ticket = journal.append(intent, data)
    try:
        journal.commit(ticket.seq)
        yield ticket
    except BaseException:
        journal.applied(ticket, None)
        raise


class InstanceStore:
    """Stores received instances durably and indexes them."""

    def __init__(self, db: Database, files: InstanceFiles,
                 space: DiskWatermark | None = None) -> None:
        self.db = db
        self.files = files
        self.space = space
        self.journal: IntakeJournal | None = None
        self._applier: BatchApplier[Received] | None = None
        self._writer = threading.Lock()

    def space_refusal(self) -> str | None:
        """Why new instances are refused for lack of disk space now, or ``None``."""
        return self.space.refusal() if self.space is not None else None

    def ingest(self, data: bytes, header: InstanceHeader, peer: Peer,
               *, produced_here: bool = False, digest: str | None = None) -> IngestOutcome:
        """Make ``data`` durable, then store and index it; returns once it is durable.

        With an intake journal (:meth:`open_journal`) the one durable write is the
        journal's (group-committed); the file and index row are written behind it and
        synced at its next checkpoint. Without one, the file is fsync'd, renamed
        (directory fsync'd) and the index committed synchronously.

        ``produced_here`` marks objects the node made itself (its SEGs): their series
        is complete at once and never routed. ``digest`` is :func:`dataset_digest` of
        ``data`` when the caller has it.

        Raises
        ------
        StoreError
            The file could not be written (the caller answers 0xA700).
        sqlalchemy.exc.SQLAlchemyError
            The index could not be updated (the caller answers 0xA700).
        """
        digest = digest or dataset_digest(data)
        journal = self.journal
        if journal is None:
            return self._ingest_synced(data, header, peer, produced_here, digest)
        with _journaled(journal, intent_of(header, peer, produced_here, digest), data) as ticket:
            outcome, written = self._apply(data, header, peer, produced_here, digest)
        journal.applied(ticket, written)
        return outcome

    def receive(self, data: bytes, header: InstanceHeader, peer: Peer, *,
                digest: str | None = None, on_applied: Applied | None = None
                ) -> IngestOutcome:
        """Make ``data`` durable and return; with an intake journal its file and index
        row are written behind the return, in batches (``on_applied`` is called once they
        are), and the outcome is ``JOURNALED``. Without one, as :meth:`ingest`.

        Raises as :meth:`ingest` (the caller answers 0xA700): nothing is acknowledged
        that is not durable.
        """
        digest = digest or dataset_digest(data)
        journal, applier = self.journal, self._applier
        if journal is None or applier is None:
            outcome = self.ingest(data, header, peer, digest=digest)
            if on_applied is not None:
                on_applied(header.series_uid, outcome)
            return outcome
        with _journaled(journal, intent_of(header, peer, False, digest), data) as ticket:
            applier.put(Received(ticket, data, header, peer, digest, on_applied))
        return IngestOutcome.JOURNALED  # the applier marks it applied

    def _apply_batch(self, batch: list[Received]) -> None:
        """Files and rows of journaled instances in one transaction; if it fails, one by
        one, and an instance that still cannot be applied is quarantined with an audit
        event (it was acknowledged: its bytes are kept)."""
        done: list[AppliedOne]
        try:
            with self._writer, self.db.relaxed_session() as s:
                done = self._apply_all(s, batch)
        except Exception:
            LOGGER.warning("a batch of %d journaled instance(s) failed; applied one by one",
                           len(batch), exc_info=True)
            done = [self._apply_alone(r) for r in batch]
        for r, (outcome, path, conflict) in zip(batch, done, strict=True):
            if conflict is not None:
                self._conflict(r.data, r.header, r.peer, conflict)
            if self.journal is not None:
                self.journal.applied(r.ticket, path)
            if r.on_applied is not None and outcome is not None:
                try:
                    r.on_applied(r.header.series_uid, outcome)
                except Exception:
                    LOGGER.exception("callback failed for %s", r.header.sop_instance_uid)

    def _apply_all(self, s: Session, batch: list[Received]
                   ) -> list[AppliedOne]:
        """A batch in the caller's transaction: when none of it is indexed yet and no
        instance comes twice (the usual case), its files and then its rows in a few
        statements (:func:`index_instances`); otherwise one by one."""
        sops = [r.header.sop_instance_uid for r in batch]
        if len(set(sops)) < len(sops) or s.execute(select(Instance.id).where(
                Instance.sop_instance_uid.in_(sops)).limit(1)).first() is not None:
            return [self._apply_in(s, r.data, r.header, r.peer, False, r.digest)
                    for r in batch]
        items: list[IndexItem] = []
        done: list[AppliedOne] = []
        for r in batch:
            rel = self.files.relative_path(r.header.study_uid, r.header.series_uid,
                                           r.header.sop_instance_uid)
            done.append((IngestOutcome.STORED, self.files.place(rel, r.data), None))
            items.append(IndexItem(r.header, r.peer, rel, len(r.data), r.digest))
        index_instances(s, items)
        return done

    def _apply_alone(self, r: Received, attempts: int = 3
                     ) -> AppliedOne:
        for attempt in range(1, attempts + 1):
            try:
                with self._writer, self.db.relaxed_session() as s:
                    return self._apply_in(s, r.data, r.header, r.peer, False, r.digest)
            except Exception as exc:
                if attempt < attempts:
                    time.sleep(0.5 * attempt)
                    continue
                LOGGER.exception("cannot index %s; kept in quarantine",
                                 r.header.sop_instance_uid)
                self.quarantine(r.data, "store-failed", f"acknowledged, cannot index: {exc}",
                                r.peer, r.header.sop_instance_uid, r.header.series_uid)
        return None, None, None

    def _apply(self, data: bytes, header: InstanceHeader, peer: Peer, produced_here: bool,
               digest: str, *, repair: bool = False) -> tuple[IngestOutcome, Path | None]:
        """File and index row for a journaled instance, neither synced; idempotent.
        ``repair`` (replay) also rewrites a stored file whose bytes are not the record's."""
        # One writer at a time in this process: concurrent associations otherwise meet
        # at SQLite's write lock, whose busy handler sleeps in steps of milliseconds.
        with self._writer, self.db.relaxed_session() as s:
            outcome, path, conflict = self._apply_in(s, data, header, peer, produced_here,
                                                     digest, repair=repair)
        if conflict is not None and not repair:
            self._conflict(data, header, peer, conflict)
        return outcome, path

    def _apply_in(self, s: Session, data: bytes, header: InstanceHeader, peer: Peer,
                  produced_here: bool, digest: str, *, repair: bool = False
                  ) -> tuple[IngestOutcome, Path | None, str | None]:
        """:meth:`_apply` in the caller's transaction; the third value is the path of
        the stored first version when ``data`` conflicts with it."""
        rel = self.files.relative_path(header.study_uid, header.series_uid,
                                       header.sop_instance_uid)
        existing = s.execute(
            select(Instance.sha256, Instance.path).where(
                Instance.sop_instance_uid == header.sop_instance_uid)
        ).first()
        if existing is None:
            path = self.files.place(rel, data)
            index_instance(s, header, peer, rel, len(data), digest, produced_here)
            return IngestOutcome.STORED, path, None
        if existing.sha256 == digest or self._same_dataset(existing.path, digest):
            if repair and existing.path == rel and not self._same_dataset(rel, digest):
                return IngestOutcome.DUPLICATE, self.files.place(rel, data), None
            return IngestOutcome.DUPLICATE, None, None
        return IngestOutcome.DUPLICATE_CONFLICT, None, existing.path

    def _ingest_synced(self, data: bytes, header: InstanceHeader, peer: Peer,
                       produced_here: bool, digest: str) -> IngestOutcome:
        rel = self.files.relative_path(header.study_uid, header.series_uid,
                                       header.sop_instance_uid)
        # The bytes are on disk (fsync'd) before the index transaction; the rename into
        # place happens inside it, so an index row never points at a missing file and
        # a first version is never overwritten by a conflicting duplicate.
        staged = self.files.stage(rel, data)
        conflict: str | None = None
        try:
            with self.db.session() as s:
                existing = s.execute(
                    select(Instance.sha256, Instance.path).where(
                        Instance.sop_instance_uid == header.sop_instance_uid)
                ).first()
                if existing is not None:
                    if existing.sha256 == digest or self._same_dataset(existing.path, digest):
                        return IngestOutcome.DUPLICATE
                    conflict = existing.path
                else:
                    self.files.publish(staged, rel)
                    index_instance(s, header, peer, rel, len(data), digest, produced_here)
                    return IngestOutcome.STORED
        finally:
            staged.unlink(missing_ok=True)
        self._conflict(data, header, peer, conflict)
        return IngestOutcome.DUPLICATE_CONFLICT

    def _conflict(self, data: bytes, header: InstanceHeader, peer: Peer,
                  kept: str | None) -> None:
        self.quarantine(
            data, "duplicate-conflict",
            f"SOP Instance UID already stored with other content ({kept})",
            peer, header.sop_instance_uid, header.series_uid, status=0,
        )

    # -- the intake journal -----------------------------------------------------------

    def open_journal(self, directory: Path) -> int:
        """Replay what an earlier run left in the journal at ``directory`` (idempotent:
        a replay killed half-way is simply done again), make it durable, then journal
        every later ingest. Returns the number of records replayed."""
        space = self.space
        journal = IntakeJournal(directory, room_for=space.room_for if space else None)
        try:
            replayed = self._replay(journal)
            journal.start(self.db.sync)
        except BaseException:
            journal.abandon()  # its records stay for the next opening
            raise
        self.journal = journal
        self._applier = BatchApplier(self._apply_batch, name="intake-apply")
        return replayed

    def replay_journal(self, directory: Path) -> int:
        """Replay the journal at ``directory`` (another receiving process's, which is not
        running) into this store, make it durable and let it go, without journaling into
        it: its segments and its spare stay as they are for its process's next start.
        Returns the number of records replayed.

        Raises
        ------
        JournalInUse
            A process holds it (that process applies its own records).
        """
        leftover = JournalLeftover(directory)
        try:
            return self._replay(leftover)
        finally:
            leftover.release()

    def _replay(self, journal: JournalLeftover) -> int:
        """Apply every record of the journal's leftover segments, make the files and the
        index durable, then delete those segments."""
        replayed = 0
        written: set[Path] = set()
        for segment in journal.leftover:
            for intent, data in read_segment(segment):
                header, peer, produced_here, digest = from_intent(intent)
                _, path = self._apply(data, header, peer, produced_here, digest, repair=True)
                if path is None:
                    path = self.files.absolute(self.files.relative_path(
                        header.study_uid, header.series_uid, header.sop_instance_uid))
                written.add(path)
                replayed += 1
        if replayed:
            LOGGER.info("intake journal %s: %d record(s) replayed", journal.directory.name,
                        replayed)
        sync_written(written)
        self.db.sync()
        journal.drop_leftover()
        return replayed

    def close_journal(self) -> None:
        """Apply what was received, checkpoint and release the journal; later ingests
        are synced one by one."""
        applier, self._applier = self._applier, None
        if applier is not None:
            applier.stop()
        journal, self.journal = self.journal, None
        if journal is not None:
            journal.close()

    def settle_received(self, timeout_s: float) -> bool:
        """Write the files and rows of every instance received so far now (a sender asks
        to release: what it sent is indexed before it is answered); whether that
        finished within ``timeout_s``. Other associations go on meanwhile."""
        applier = self._applier
        return applier is None or applier.settle(timeout_s)

    def flush_received(self) -> None:
        """Write what was received so far without lingering for more (a sender aborted)."""
        if self._applier is not None:
            self._applier.flush()

    def wait_applied(self, timeout_s: float = 30.0) -> bool:
        """Whether every instance received so far has its file and row (tests, tools)."""
        applier = self._applier
        return applier is None or applier.wait_idle(timeout_s)

    def _same_dataset(self, relative: str, digest: str) -> bool:
        """Whether the stored file's dataset has ``digest`` (rows from before the digest
        covered the dataset only hold the whole file's)."""
        try:
            return dataset_digest(self.files.read(relative)) == digest
        except (OSError, StoreError):
            return False

    def quarantine(
        self,
        data: bytes,
        kind: str,
        reason: str,
        peer: Peer,
        sop_instance_uid: str | None = None,
        series_uid: str | None = None,
        *,
        status: int | None = None,
    ) -> Path | None:
        """Keep a refused payload on disk and record why; never raises."""
        path: Path | None = None
        low = self.space_refusal()
        if low is not None:  # the room left is for the index and acknowledged instances
            reason += f" (payload not kept: {low})"
        try:
            if low is None:
                path = self.files.quarantine(data, {
                    "kind": kind, "reason": reason, "status": status,
                    "peer_ae": peer.ae_title, "peer_address": peer.address,
                    "sop_instance_uid": sop_instance_uid,
                })
        except Exception:
            LOGGER.exception("could not quarantine a %s payload from %s", kind, peer.address)
        self.audit(kind, reason, peer, sop_instance_uid, series_uid, status=status,
                   quarantine_path=str(path) if path else None)
        return path

    def audit(
        self,
        kind: str,
        reason: str,
        peer: Peer | None = None,
        sop_instance_uid: str | None = None,
        series_uid: str | None = None,
        *,
        status: int | None = None,
        quarantine_path: str | None = None,
        session: Session | None = None,
    ) -> None:
        """Record an event for the operator; never raises. With ``session`` it is added
        to the caller's transaction instead (committed with the change it reports, and
        failing with it)."""
        peer = peer or Peer()
        event = AuditEvent(kind=kind, reason=reason[:2000], peer_ae=peer.ae_title,
                           peer_address=peer.address, sop_instance_uid=sop_instance_uid,
                           series_uid=series_uid, status=status,
                           quarantine_path=quarantine_path)
        if session is not None:
            session.add(event)
            return
        try:
            with self.db.session() as s:
                s.add(event)
        except Exception:
            LOGGER.exception("could not record audit event %s", kind)
