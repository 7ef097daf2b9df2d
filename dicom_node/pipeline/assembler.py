"""Series assembly: a series is complete after a quiet period; then it is routed.

Completion is decided from ``last_received_at`` in the database, so several worker
processes may run the assembler; a conditional update lets exactly one of them
complete (and route) a given series.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from dicom_node.config import AssemblerSettings, RoutingRule, RuleAction
from dicom_node.pipeline.corrections import queue_correction
from dicom_node.pipeline.export import queue_export
from dicom_node.pipeline.flow import InferencePayload, enqueue
from dicom_node.pipeline.routing import SeriesFacts, matching_rules, quiet_period
from dicom_node.pipeline.seg_read import SEG_SOP_CLASSES
from dicom_node.store.db import Database
from dicom_node.store.jobs import JobQueue
from dicom_node.store.models import Instance, Series, SeriesState

LOGGER = logging.getLogger(__name__)



def facts_of(series: Series) -> SeriesFacts:
    return SeriesFacts(
        calling_ae=series.calling_ae, called_ae=series.called_ae, modality=series.modality,
        body_part=series.body_part, series_description=series.series_description,
        sop_class_uid=series.sop_class_uid,
    )


class SeriesAssembler:
    """Closes series after their quiet period and applies the routing rules to them.

    ``export_attempts`` is ``[export] max_attempts``, given to the export jobs a forward
    rule queues."""

    def __init__(self, db: Database, queue: JobQueue, settings: AssemblerSettings,
                 rules: Sequence[RoutingRule], *, export_attempts: int) -> None:
        self.db = db
        self.queue = queue
        self.settings = settings
        self.rules = tuple(rules)
        self.export_attempts = export_attempts
        periods = [r.quiet_period_s for r in self.rules if r.quiet_period_s is not None]
        self._shortest = min([settings.quiet_period_s, *periods])

    def resume_after_restart(self) -> int:
        """Give series that were receiving when the node stopped a fresh quiet period.

        The sender may be resending the rest of the series right now; nothing is
        deleted and the series completes normally afterwards.
        """
        with self.db.session() as s:
            result = s.execute(update(Series).where(Series.state == SeriesState.RECEIVING)
                               .values(last_received_at=datetime.now(UTC)))
            n = int(result.rowcount or 0)  # type: ignore[attr-defined]
        if n:
            LOGGER.info("resuming %d half-received series after restart", n)
        return n

    def tick(self, now: datetime | None = None) -> list[str]:
        """Complete and route every series whose quiet period is over."""
        now = now or datetime.now(UTC)
        with self.db.session() as s:
            candidates = s.execute(select(Series.id, Series.last_received_at).where(
                Series.state == SeriesState.RECEIVING,
                Series.last_received_at <= now - timedelta(seconds=self._shortest),
            )).all()
        done = []
        for series_id, seen in candidates:
            with self.db.session() as s:
                series = s.get(Series, series_id)
                if series is None:
                    continue
                facts = facts_of(series)
                quiet = quiet_period(self.rules, facts,
                                     self.settings.quiet_period_s)
                if seen > now - timedelta(seconds=quiet):
                    continue
                result = cast(CursorResult[Any], s.execute(update(Series).where(
                    Series.id == series_id, Series.state == SeriesState.RECEIVING,
                    Series.last_received_at == seen,
                ).values(state=SeriesState.COMPLETE, completed_at=now)))
                won = result.rowcount
                if won != 1:
                    continue  # a late instance arrived, or another process completed it
                self._route(s, series, facts)
                done.append(series.series_uid)
        return done

    def _route(self, s: Session, series: Series, facts: SeriesFacts) -> None:
        rules = matching_rules(self.rules, facts)
        s.refresh(series)
        seg = series.sop_class_uid in SEG_SOP_CLASSES
        if seg:  # a SEG (binary, fractional or label map) may correct an AI result
            queue_correction(s, self.queue, series)
        if not rules:
            LOGGER.info("series %s complete (%d instances); no rule matches: %s",
                        series.series_uid, series.instance_count,
                        "queued for the correction intake" if seg else "stored only")
            return
        sop_uids = list(s.execute(select(Instance.sop_instance_uid)
                                  .where(Instance.series_id == series.id)).scalars())
        for rule in rules:
            if rule.action is RuleAction.FORWARD:
                for dest in rule.destinations:
                    queue_export(s, self.queue, series.series_uid, dest, sop_uids,
                                 self.export_attempts)
            else:
                assert rule.model is not None  # the config refuses a segment rule without one
                enqueue(self.queue, InferencePayload(
                    series.series_uid, rule.name, rule.model, tuple(rule.destinations)),
                    session=s)
        series.state = SeriesState.QUEUED
        LOGGER.info("series %s complete (%d instances); rules: %s", series.series_uid,
                    series.instance_count, ", ".join(r.name for r in rules))
