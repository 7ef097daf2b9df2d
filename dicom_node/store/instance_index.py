"""The index rows of a received instance: its study and series (made on first sight)
and the instance row, in the caller's transaction; values every backend can hold."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import Table, insert, select, update
from sqlalchemy.orm import Session

from dicom_node.dicom.parse import InstanceHeader
from dicom_node.store.intent import Peer
from dicom_node.store.models import Instance, Series, SeriesState, Study

LOGGER = logging.getLogger(__name__)

# The instance row's insert, built once and on the table, not the mapped class: through a
# session, an insert of the class with a list of rows is ORM bulk persistence, and one with
# .values() is compiled per call (in process, in-memory SQLite: 110 and 310 us per row
# alone, 19 us in batches of 16; on the table 36, and 12 in batches of 16).
_INSERT_INSTANCE = insert(cast(Table, Instance.__table__))


def indexable(header: InstanceHeader) -> InstanceHeader:
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


class IndexItem(NamedTuple):
    """A new instance to index: its header, sender, file (relative), size and digest."""

    header: InstanceHeader
    peer: Peer
    rel: str
    size: int
    digest: str


def index_instance(s: Session, header: InstanceHeader, peer: Peer, rel: str, size: int,
                   digest: str, produced_here: bool) -> None:
    # Core statements, not ORM objects: this runs once per received instance.
    header = indexable(header)
    now = datetime.now(UTC)
    row = s.execute(select(Series.id, Series.state).where(
        Series.series_uid == header.series_uid)).first()
    series_id = row.id if row is not None else _new_series(s, header, peer, now)
    s.execute(_INSERT_INSTANCE,
              _instance_values(IndexItem(header, peer, rel, size, digest), series_id, now))
    _count(s, series_id, row, header.series_uid, 1, produced_here, now)


def index_instances(s: Session, items: Sequence[IndexItem]) -> None:
    """The rows of several received instances, none indexed yet and no two alike, in
    the caller's transaction: a statement or two per series and one for all the
    instance rows, where :func:`index_instance` takes four per instance."""
    now = datetime.now(UTC)
    by_series: dict[str, list[IndexItem]] = {}
    for item in items:
        item = IndexItem(indexable(item.header), item.peer, item.rel, item.size, item.digest)
        by_series.setdefault(item.header.series_uid, []).append(item)
    known = {row.series_uid: row for row in s.execute(
        select(Series.series_uid, Series.id, Series.state).where(
            Series.series_uid.in_(list(by_series))))}
    rows = []
    for uid, members in by_series.items():
        row = known.get(uid)
        series_id = (row.id if row is not None
                     else _new_series(s, members[0].header, members[0].peer, now))
        rows += [_instance_values(m, series_id, now) for m in members]
        _count(s, series_id, row, uid, len(members), False, now)
    s.execute(_INSERT_INSTANCE, rows)


def _instance_values(item: IndexItem, series_id: int, now: datetime) -> dict[str, Any]:
    header = item.header
    return {"sop_instance_uid": header.sop_instance_uid,
            "sop_class_uid": header.sop_class_uid, "series_id": series_id,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "instance_number": header.instance_number, "path": item.rel,
            "size": item.size, "sha256": item.digest, "calling_ae": item.peer.ae_title,
            "received_at": now}


def _count(s: Session, series_id: int, row: Any, series_uid: str, added: int,
           produced_here: bool, now: datetime) -> None:
    """Count ``added`` instances into the series; a late one reopens it."""
    values: dict[str, Any] = {"instance_count": Series.instance_count + added,
                              "last_received_at": now}
    if produced_here:
        values.update(state=SeriesState.COMPLETE, completed_at=now)
    elif row is not None and row.state != SeriesState.RECEIVING:
        LOGGER.info("late instance reopens series %s (was %s)", series_uid, row.state)
        values.update(state=SeriesState.RECEIVING, state_reason=None)
    s.execute(update(Series).where(Series.id == series_id).values(**values))


def _new_series(s: Session, header: InstanceHeader, peer: Peer,
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
