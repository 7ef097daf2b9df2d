"""Segment stored series again: after the model a rule names was built or installed, or
once a refusal's cause is fixed (``tessera node reprocess``).

Only the segment rules that match a series are queued again; forward rules already
delivered it, so nothing is sent twice. Each series keeps its instances; its state goes
back to ``queued`` and the inference job reports as it would for a new series.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select

from dicom_node.config import NodeConfig, RuleAction
from dicom_node.pipeline.assembler import facts_of
from dicom_node.pipeline.flow import InferencePayload, enqueue
from dicom_node.pipeline.routing import matching_rules
from dicom_node.store.db import Database
from dicom_node.store.jobs import JobQueue
from dicom_node.store.models import Series, SeriesState

LOGGER = logging.getLogger(__name__)

# A series still arriving or already queued is left to the running pipeline.
_BUSY = (SeriesState.RECEIVING, SeriesState.QUEUED)


@dataclass(frozen=True)
class Reprocessed:
    queued: tuple[str, ...]  # series UIDs queued again
    skipped: tuple[tuple[str, str], ...]  # (series UID, why not)


def reprocess(db: Database, queue: JobQueue, config: NodeConfig, *,
              series_uids: Sequence[str] = (), refused: bool = False) -> Reprocessed:
    """Queue the segment rules of ``series_uids`` and, with ``refused``, of every refused
    series again."""
    queued: list[str] = []
    skipped: list[tuple[str, str]] = []
    with db.session() as s:
        rows = list(s.execute(select(Series).where(Series.series_uid.in_(series_uids)))
                    .scalars()) if series_uids else []
        found = {r.series_uid for r in rows}
        skipped += [(uid, "no such series") for uid in series_uids if uid not in found]
        if refused:
            rows += [r for r in s.execute(select(Series).where(
                Series.state == SeriesState.REFUSED)).scalars() if r.series_uid not in found]
        for series in rows:
            if series.state in _BUSY:
                skipped.append((series.series_uid, f"still {series.state}"))
                continue
            rules = [r for r in matching_rules(config.rules, facts_of(series))
                     if r.action is RuleAction.SEGMENT and r.model is not None]
            if not rules:
                skipped.append((series.series_uid, "no segment rule matches"))
                continue
            for rule in rules:
                assert rule.model is not None
                enqueue(queue, InferencePayload(series.series_uid, rule.name, rule.model,
                                                tuple(rule.destinations)), session=s)
            series.state, series.state_reason = SeriesState.QUEUED, None
            queued.append(series.series_uid)
            LOGGER.info("series %s queued again: %s", series.series_uid,
                        ", ".join(r.name for r in rules))
    return Reprocessed(tuple(queued), tuple(skipped))
