"""The quality records a node reports to the hub: numbers only, no UID, name or pixel.

- ``segmentation``: the quality metrics of one AI segmentation, with ``segmentation_seq``
  (the local row id) so that the hub can pair it with a correction's record;
- ``correction``: the Dice of a correction against the AI result, plus the metrics of the
  segmentation it corrects (the same ``segmentation_seq``);
- ``site-check``: per hub generation, the held-out Dice this node measured before, as
  received and fine-tuned, and whether it rolled the generation back.

A cursor file (the last row of each kind reported) keeps a record from being sent again,
and each record's key (``record_key``) keeps one sent twice (a call retried after the hub
took it, a cursor saved late) from being counted twice at the hub.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.pipeline.site_adaptation import (
    SITE_CHECK,
    SiteCheck,
    check_pending,
)
from dicom_node.pipeline.versions import LOCAL_FLOOR, hub_base_generation
from dicom_node.store.durable import write_atomic
from dicom_node.store.models import Correction, ModelVersion, Segmentation
from federation_grpc.hub.domain import (
    CORRECTION_RECORD,
    SEGMENTATION_RECORD,
    SITE_CHECK_RECORD,
    MetricRecord,
)

__all__ = ["load_cursor", "metric_records", "save_cursor", "site_check_records"]

_MAX_VALUES = 256  # the hub refuses records with more values
_METRICS_WAIT_S = 600.0
_METRIC_KEY_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")


def load_cursor(path: Path) -> dict[str, int]:
    """The last row reported of each kind (all 0 when none was, or the file is bad)."""
    try:
        cursor: dict[str, int] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        cursor = {"segmentation": 0, "correction": 0}
    return cursor


def save_cursor(path: Path, cursor: dict[str, int]) -> None:
    # Durable: a cursor lost to a power cut would send every record again.
    write_atomic(path, json.dumps(cursor).encode(), durable=True)


def site_check_records(s: Session, model: str, last: int) -> tuple[list[MetricRecord], int]:
    """One ``site-check`` record per hub generation of ``model`` this node checked since
    version row ``last`` (see ``pipeline.site_adaptation``), keyed by the hub's generation
    number; returns them and the new ``last``."""
    records: list[MetricRecord] = []
    for row in s.execute(select(ModelVersion).where(
            ModelVersion.id > last, ModelVersion.origin == "hub",
            ModelVersion.name == model).order_by(ModelVersion.id)).scalars():
        check = (row.metrics or {}).get(SITE_CHECK)
        if check is None and check_pending(s, row.name, row.generation):
            break  # its check is still to come
        last = row.id
        try:
            values = SiteCheck(**check).values() if check is not None else None
        except TypeError:  # a check stored by another version of the node
            values = None
        if values is not None:
            records.append(_record(SITE_CHECK_RECORD, row.id, row.generation, values))
    return records, last


def metric_records(s: Session, model: str, cursor: dict[str, int]
                   ) -> tuple[list[MetricRecord], int, int]:
    """Segmentation records (metrics) and correction records (the metrics of the
    segmentation corrected plus its Dice), both carrying ``segmentation_seq``, the
    local row id, so that the hub can pair them; no UID leaves. A segmentation whose
    metrics are still being computed holds the cursor back (for a while)."""
    records: list[MetricRecord] = []
    seg_last, corr_last = int(cursor["segmentation"]), int(cursor["correction"])
    for seg in s.execute(select(Segmentation).where(
            Segmentation.id > seg_last, Segmentation.model_name == model)
            .order_by(Segmentation.id)).scalars():
        if _metrics_pending(seg):
            break
        seg_last = seg.id
        values = _segmentation_values(seg)
        base = hub_base_generation(s, model, seg.generation)
        values["local_version"] = 1.0 if seg.generation >= LOCAL_FLOOR else 0.0
        records.append(_record(SEGMENTATION_RECORD, seg.id, base, values))
    for corr in s.execute(select(Correction).where(
            Correction.id > corr_last).order_by(Correction.id)).scalars():
        if corr.model_name != model or corr.ai_generation is None:
            corr_last = corr.id
            continue
        dice = {f"dice.{k}": v for k, v in _numbers(corr.dice).items()}
        if not dice:
            corr_last = corr.id
            continue
        linked = (s.get(Segmentation, corr.segmentation_id)
                  if corr.segmentation_id is not None else None)
        if linked is not None and _metrics_pending(linked):
            break
        corr_last = corr.id
        values = _segmentation_values(linked) if linked is not None else {}
        # Dice first: it is what makes the record worth having if space runs out.
        values = dict(list(dice.items()) + list(values.items())[:_MAX_VALUES - len(dice) - 1])
        values["local_version"] = 1.0 if corr.ai_generation >= LOCAL_FLOOR else 0.0
        records.append(_record(CORRECTION_RECORD, corr.id,
                               hub_base_generation(s, model, corr.ai_generation), values))
    return records, seg_last, corr_last


def record_key(kind: str, row_id: int) -> str:
    """The record's name at the hub, unique among this node's records: its kind and the
    local row it reports. No time goes with it (a creation time would date a patient's
    study). A database started afresh numbers its rows anew: it needs fresh credentials
    too (enrol again), or its new records would be taken for ones the hub holds."""
    return f"{kind}:{row_id}"


def _record(kind: str, row_id: int, generation: int, values: dict[str, float]) -> MetricRecord:
    """A record of ``kind`` reporting local row ``row_id``, with its key."""
    return MetricRecord(kind, generation, values, record_key(kind, row_id))


def _metrics_pending(seg: Segmentation) -> bool:
    """Metrics are computed after the SEG is delivered: wait for them, but not forever
    (a failure there must not stop reporting)."""
    if set(seg.metrics or {}) - {"domain"}:  # the quality metrics are in (the domain
        return False                           # verdict is stored before the SEG goes out)
    created = seg.created_at if seg.created_at.tzinfo else seg.created_at.replace(tzinfo=UTC)
    return (datetime.now(UTC) - created).total_seconds() < _METRICS_WAIT_S


def _segmentation_values(seg: Segmentation) -> dict[str, float]:
    values = {"segmentation_seq": float(seg.id)}
    values.update(list(_numbers(seg.metrics).items())[:_MAX_VALUES - 8])
    return values


def _numbers(values: Any) -> dict[str, float]:
    """Finite numbers under short identifier keys; anything else is left behind."""
    out: dict[str, float] = {}
    if not isinstance(values, dict):
        return out
    for key, value in values.items():
        if (isinstance(value, int | float) and not isinstance(value, bool)
                and math.isfinite(value) and 0 < len(key) <= 64
                and set(key) <= _METRIC_KEY_CHARS):
            out[key] = float(value)
    return out
