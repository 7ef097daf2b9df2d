"""Export: deliver a series' outbox items to one destination, at most once each."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dicom_node.config import Destination, ExportSettings
from dicom_node.dicom.scu import AssociationFailed, OutgoingInstance, is_delivered, send_instances
from dicom_node.errors import DicomNodeError
from dicom_node.pipeline.flow import ExportPayload, JobKind, enqueue
from dicom_node.store.db import Database
from dicom_node.store.files import InstanceFiles
from dicom_node.store.jobs import ClaimedJob, JobQueue
from dicom_node.store.models import (
    Instance,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Series,
    SeriesState,
)

LOGGER = logging.getLogger(__name__)

class ExportFailed(DicomNodeError):
    pass


def queue_export(
    s: Session, queue: JobQueue, series_uid: str, destination: str,
    sop_instance_uids: list[str], max_attempts: int,
) -> int:
    """Add outbox items for instances not yet queued to ``destination``; enqueue the job."""
    already = set(s.execute(select(OutboxItem.sop_instance_uid).where(
        OutboxItem.destination == destination, OutboxItem.series_uid == series_uid,
    )).scalars())
    new = [uid for uid in sop_instance_uids if uid not in already]
    for uid in new:
        s.add(OutboxItem(destination=destination, sop_instance_uid=uid, series_uid=series_uid,
                         state=OutboxState.PENDING))
    if new:
        enqueue(queue, ExportPayload(series_uid, destination), session=s,
                max_attempts=max_attempts)
    return len(new)


class Exporter:
    """Job handler for ``export`` jobs."""

    kinds: tuple[JobKind, ...] = (JobKind.EXPORT,)

    def __init__(self, db: Database, files: InstanceFiles, settings: ExportSettings,
                 destinations: Mapping[str, Destination], calling_ae: str) -> None:
        self.db = db
        self.files = files
        self.settings = settings
        self.destinations = dict(destinations)
        self.calling_ae = calling_ae

    def run(self, job: ClaimedJob, heartbeat: Callable[[], None]) -> None:
        payload = ExportPayload.of(job)
        series_uid, dest_name = payload.series_uid, payload.destination
        destination = self.destinations.get(dest_name)
        if destination is None:
            raise ExportFailed(f"destination {dest_name!r} is no longer configured")
        with self.db.session() as s:
            rows = s.execute(
                select(OutboxItem.id, Instance.sop_instance_uid, Instance.sop_class_uid,
                       Instance.transfer_syntax_uid, Instance.path)
                .join(Instance, Instance.sop_instance_uid == OutboxItem.sop_instance_uid)
                .where(OutboxItem.series_uid == series_uid,
                       OutboxItem.destination == dest_name,
                       OutboxItem.state == OutboxState.PENDING)
                .order_by(Instance.instance_number, Instance.id)
            ).all()
        if not rows:  # delivered by an earlier attempt that stopped before the mark
            self._mark_forwarded(series_uid)
            return
        item_ids = {r.sop_instance_uid: r.id for r in rows}
        items = [OutgoingInstance(r.sop_instance_uid, r.sop_class_uid, r.transfer_syntax_uid,
                                  self.files.absolute(r.path)) for r in rows]
        failures: list[str] = []
        sent = 0

        def on_result(item: OutgoingInstance, status: int | None, error: str | None) -> None:
            nonlocal sent
            now = datetime.now(UTC)
            with self.db.session() as s:
                if is_delivered(status):
                    s.execute(update(OutboxItem).where(
                        OutboxItem.id == item_ids[item.sop_instance_uid])
                        .values(state=OutboxState.SENT, sent_at=now, last_error=None,
                                attempts=OutboxItem.attempts + 1))
                    sent += 1
                else:
                    failures.append(f"{item.sop_instance_uid}: {error}")
                    s.execute(update(OutboxItem).where(
                        OutboxItem.id == item_ids[item.sop_instance_uid])
                        .values(last_error=error, attempts=OutboxItem.attempts + 1))
            if sent % 50 == 0:
                heartbeat()

        LOGGER.info("export of series %s to %s: %d instance(s)", series_uid, dest_name,
                    len(items))
        try:
            send_instances(destination, self.calling_ae, items, on_result,
                           timeout_s=self.settings.connect_timeout_s)
        except AssociationFailed as exc:
            with self.db.session() as s:
                s.execute(update(OutboxItem).where(
                    OutboxItem.id.in_(list(item_ids.values())),
                    OutboxItem.state == OutboxState.PENDING,
                ).values(last_error=str(exc), attempts=OutboxItem.attempts + 1))
            raise ExportFailed(f"{exc} ({sent}/{len(items)} sent)") from exc
        if failures:
            raise ExportFailed(f"{len(failures)} instance(s) not delivered, e.g. {failures[0]}")
        self._mark_forwarded(series_uid)

    def on_dead(self, job: ClaimedJob, error: str, s: Session) -> None:
        """The job gave up: its undelivered items become dead letters, unless a job of
        the same destination queued meanwhile (items added while this one ran) waits to
        try them all again."""
        payload = ExportPayload.of(job)
        if s.execute(select(Job.id).where(
                Job.kind == JobKind.EXPORT, Job.key == payload.key,
                Job.state == JobState.PENDING, Job.id != job.id)).first() is not None:
            return
        s.execute(update(OutboxItem).where(
            OutboxItem.series_uid == payload.series_uid,
            OutboxItem.destination == payload.destination,
            OutboxItem.state == OutboxState.PENDING,
        ).values(state=OutboxState.DEAD, last_error=error[:2000]))

    def _mark_forwarded(self, series_uid: str) -> None:
        """``forwarded`` once every item of the series is delivered (none pending, none a
        dead letter) and no other step of it is left."""
        with self.db.session() as s:
            pending = s.execute(select(func.count()).select_from(OutboxItem).where(
                OutboxItem.series_uid == series_uid,
                OutboxItem.state.in_((OutboxState.PENDING, OutboxState.DEAD)))).scalar_one()
            other_work = s.execute(select(func.count()).select_from(Job).where(
                Job.key.startswith(f"{series_uid}:"), Job.kind != JobKind.EXPORT,
                Job.state.in_((JobState.PENDING, JobState.RUNNING)))).scalar_one()
            if pending == 0 and other_work == 0:
                s.execute(update(Series).where(
                    Series.series_uid == series_uid, Series.state == SeriesState.QUEUED)
                    .values(state=SeriesState.FORWARDED))
