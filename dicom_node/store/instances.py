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
from dataclasses import replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from dicom_node.dicom.meta import dataset_offset
from dicom_node.dicom.parse import InstanceHeader
from dicom_node.errors import StoreError
from dicom_node.store.db import Database
from dicom_node.store.files import InstanceFiles
from dicom_node.store.intent import Peer, from_intent, intent_of
from dicom_node.store.journal import IntakeJournal, read_segment, sync_written
from dicom_node.store.models import AuditEvent, Instance, Series, SeriesState, Study
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


def _indexable(header: InstanceHeader) -> InstanceHeader:
    """``header`` as every index backend holds it. PostgreSQL refuses a NUL inside text
    and an integer beyond 32 bits (an invalid DICOM IS value), both of which SQLite
    takes: NULs are dropped, such a number is left out. The file keeps what was sent."""

    def text(value: str | None) -> str | None:
        return None if value is None else (value.replace("\x00", "") or None)

    def int32(value: int | None) -> int | None:
        return value if value is not None and -(2**31) <= value < 2**31 else None

    return replace(header, modality=text(header.modality), body_part=text(header.body_part),
                   series_description=text(header.series_description),
                   study_date=text(header.study_date),
                   series_number=int32(header.series_number),
                   instance_number=int32(header.instance_number))


class IngestOutcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"                  # the same dataset already stored
    DUPLICATE_CONFLICT = "duplicate-conflict"  # same UID, other bytes: first kept


class InstanceStore:
    """Stores received instances durably and indexes them."""

    def __init__(self, db: Database, files: InstanceFiles,
                 space: DiskWatermark | None = None) -> None:
        self.db = db
        self.files = files
        self.space = space
        self.journal: IntakeJournal | None = None
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
        ticket = journal.append(intent_of(header, peer, produced_here, digest), data)
        written: Path | None = None
        try:
            journal.commit(ticket.seq)
            outcome, written = self._apply(data, header, peer, produced_here, digest)
        finally:
            journal.applied(ticket, written)
        return outcome

    def _apply(self, data: bytes, header: InstanceHeader, peer: Peer, produced_here: bool,
               digest: str, *, repair: bool = False) -> tuple[IngestOutcome, Path | None]:
        """File and index row for a journaled instance, neither synced; idempotent.
        ``repair`` (replay) also rewrites a stored file whose bytes are not the record's."""
        rel = self.files.relative_path(header.study_uid, header.series_uid,
                                       header.sop_instance_uid)
        conflict: str | None = None
        # One writer at a time in this process: concurrent associations otherwise meet
        # at SQLite's write lock, whose busy handler sleeps in steps of milliseconds.
        with self._writer, self.db.relaxed_session() as s:
            existing = s.execute(
                select(Instance.sha256, Instance.path).where(
                    Instance.sop_instance_uid == header.sop_instance_uid)
            ).first()
            if existing is None:
                path = self.files.place(rel, data)
                self._index(s, header, peer, rel, len(data), digest, produced_here)
                return IngestOutcome.STORED, path
            if existing.sha256 == digest or self._same_dataset(existing.path, digest):
                if repair and existing.path == rel and not self._same_dataset(rel, digest):
                    return IngestOutcome.DUPLICATE, self.files.place(rel, data)
                return IngestOutcome.DUPLICATE, None
            conflict = existing.path
        if not repair:
            self._conflict(data, header, peer, conflict)
        return IngestOutcome.DUPLICATE_CONFLICT, None

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
                    self._index(s, header, peer, rel, len(data), digest, produced_here)
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
        journal = IntakeJournal(directory)
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
            LOGGER.info("intake journal: %d record(s) replayed", replayed)
        sync_written(written)
        self.db.sync()
        journal.drop_leftover()
        journal.start(self.db.sync)
        self.journal = journal
        return replayed

    def close_journal(self) -> None:
        """Checkpoint and release the journal; later ingests are synced one by one."""
        journal, self.journal = self.journal, None
        if journal is not None:
            journal.close()

    def _same_dataset(self, relative: str, digest: str) -> bool:
        """Whether the stored file's dataset has ``digest`` (rows from before the digest
        covered the dataset only hold the whole file's)."""
        try:
            return dataset_digest(self.files.read(relative)) == digest
        except (OSError, StoreError):
            return False

    def _index(self, s: Session, header: InstanceHeader, peer: Peer, rel: str, size: int,
               digest: str, produced_here: bool) -> None:
        # Core statements, not ORM objects: this runs once per received instance.
        header = _indexable(header)
        now = datetime.now(UTC)
        row = s.execute(select(Series.id, Series.state).where(
            Series.series_uid == header.series_uid)).first()
        series_id = row.id if row is not None else self._new_series(s, header, peer, now)
        s.execute(insert(Instance).values(
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            series_id=series_id,
            transfer_syntax_uid=header.transfer_syntax_uid,
            instance_number=header.instance_number,
            path=rel,
            size=size,
            sha256=digest,
            calling_ae=peer.ae_title,
            received_at=now,
        ))
        values: dict[str, Any] = {"instance_count": Series.instance_count + 1,
                                  "last_received_at": now}
        if produced_here:
            values.update(state=SeriesState.COMPLETE, completed_at=now)
        elif row is not None and row.state != SeriesState.RECEIVING:
            LOGGER.info("late instance reopens series %s (was %s)", header.series_uid,
                        row.state)
            values.update(state=SeriesState.RECEIVING, state_reason=None)
        s.execute(update(Series).where(Series.id == series_id).values(**values))

    def _new_series(self, s: Session, header: InstanceHeader, peer: Peer,
                    now: datetime) -> int:
        study_id = s.execute(select(Study.id).where(
            Study.study_uid == header.study_uid)).scalar_one_or_none()
        if study_id is None:
            study_id = s.execute(insert(Study).values(
                study_uid=header.study_uid, study_date=header.study_date, created_at=now,
            ).returning(Study.id)).scalar_one()
        return int(s.execute(insert(Series).values(
            series_uid=header.series_uid,
            study_id=study_id,
            modality=header.modality,
            body_part=header.body_part,
            series_description=header.series_description,
            series_number=header.series_number,
            sop_class_uid=header.sop_class_uid,
            calling_ae=peer.ae_title,
            called_ae=peer.called_ae,
            state=SeriesState.RECEIVING,
            instance_count=0,
            first_received_at=now,
            last_received_at=now,
        ).returning(Series.id)).scalar_one())

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
    ) -> None:
        """Record an event for the operator; never raises."""
        peer = peer or Peer()
        try:
            with self.db.session() as s:
                s.add(AuditEvent(
                    kind=kind, reason=reason[:2000], peer_ae=peer.ae_title,
                    peer_address=peer.address, sop_instance_uid=sop_instance_uid,
                    series_uid=series_uid, status=status, quarantine_path=quarantine_path,
                ))
        except Exception:
            LOGGER.exception("could not record audit event %s", kind)
