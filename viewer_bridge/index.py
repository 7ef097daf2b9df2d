"""Look-ups in the node's index for DICOMweb: studies, series and instances by UID.

Every UID that comes from a URL is checked with :func:`check_uid` before it is used,
so a hostile path component is refused before it reaches the database or the disk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from dicom_node.errors import InvalidDatasetError
from dicom_node.store.db import Database
from dicom_node.store.files import InstanceFiles, check_uid
from dicom_node.store.models import Instance, Series, Study
from viewer_bridge.errors import BridgeError

LOGGER = logging.getLogger(__name__)


class BadUid(BridgeError, ValueError):
    """A UID in the request is not a valid DICOM UID (answered 400)."""


def valid_uid(value: str, name: str) -> str:
    try:
        return check_uid(value, name)
    except InvalidDatasetError as exc:
        raise BadUid(str(exc)) from None


@dataclass(frozen=True, slots=True)
class InstanceRef:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    path: Path


@dataclass(frozen=True, slots=True)
class StudyRow:
    study_uid: str
    study_date: str | None
    modalities: tuple[str, ...]
    series_count: int
    instance_count: int
    first_instance: Path | None


@dataclass(frozen=True, slots=True)
class SeriesRow:
    study_uid: str
    series_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    instance_count: int
    first_instance: Path | None


class BridgeIndex:
    """Read-only queries over the node's index, returning absolute file paths."""

    def __init__(self, db: Database, files: InstanceFiles) -> None:
        self.db = db
        self.files = files

    def _first_paths(self, series_ids: Sequence[int]) -> dict[int, Path]:
        if not series_ids:
            return {}
        first = (select(Instance.series_id, func.min(Instance.id).label("iid"))
                 .where(Instance.series_id.in_(series_ids)).group_by(Instance.series_id)
                 .subquery())
        with self.db.session() as s:
            rows = s.execute(select(Instance.series_id, Instance.path)
                             .join(first, Instance.id == first.c.iid)).all()
        return {sid: self.files.absolute(rel) for sid, rel in rows}

    def studies(self, study_uids: Sequence[str] = ()) -> list[StudyRow]:
        q = select(Study.id, Study.study_uid, Study.study_date).order_by(Study.id)
        if study_uids:
            q = q.where(Study.study_uid.in_(study_uids))
        with self.db.session() as s:
            studies = s.execute(q).all()
            ids = [row.id for row in studies]
            series = s.execute(select(Series.id, Series.study_id, Series.modality,
                                      Series.instance_count)
                               .where(Series.study_id.in_(ids)).order_by(Series.id)).all()
        firsts = self._first_paths([r.id for r in series])
        out = []
        for st in studies:
            mine = [r for r in series if r.study_id == st.id and r.instance_count > 0]
            if not mine:
                continue
            modalities = tuple(dict.fromkeys(r.modality for r in mine if r.modality))
            first = next((firsts[r.id] for r in mine if r.id in firsts), None)
            out.append(StudyRow(st.study_uid, st.study_date, modalities, len(mine),
                                sum(r.instance_count for r in mine), first))
        return out

    def series(self, study_uid: str | None = None, series_uids: Sequence[str] = ()
               ) -> list[SeriesRow]:
        q = (select(Series.id, Study.study_uid, Series.series_uid, Series.modality,
                    Series.series_number, Series.series_description, Series.instance_count)
             .join(Study, Series.study_id == Study.id)
             .where(Series.instance_count > 0).order_by(Series.id))
        if study_uid is not None:
            q = q.where(Study.study_uid == study_uid)
        if series_uids:
            q = q.where(Series.series_uid.in_(series_uids))
        with self.db.session() as s:
            rows = s.execute(q).all()
        firsts = self._first_paths([r.id for r in rows])
        return [SeriesRow(r.study_uid, r.series_uid, r.modality, r.series_number,
                          r.series_description, r.instance_count, firsts.get(r.id))
                for r in rows]

    def instances(self, study_uid: str | None = None, series_uid: str | None = None,
                  sop_uid: str | None = None) -> list[InstanceRef]:
        q = (select(Study.study_uid, Series.series_uid, Instance.sop_instance_uid,
                    Instance.sop_class_uid, Instance.transfer_syntax_uid,
                    Instance.instance_number, Instance.path)
             .join(Series, Instance.series_id == Series.id)
             .join(Study, Series.study_id == Study.id)
             .order_by(Series.id, Instance.instance_number, Instance.id))
        if study_uid is not None:
            q = q.where(Study.study_uid == study_uid)
        if series_uid is not None:
            q = q.where(Series.series_uid == series_uid)
        if sop_uid is not None:
            q = q.where(Instance.sop_instance_uid == sop_uid)
        with self.db.session() as s:
            rows = s.execute(q).all()
        return [InstanceRef(r.study_uid, r.series_uid, r.sop_instance_uid, r.sop_class_uid,
                            r.transfer_syntax_uid, r.instance_number,
                            self.files.absolute(r.path)) for r in rows]
