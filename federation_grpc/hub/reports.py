"""The numbers nodes report (quality metrics of segmentations and corrections).

Only de-identified numbers are kept: short identifier keys and finite float values.
The quality model (``quality``) reads them back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from sqlalchemy import select

from federation_grpc.errors import InvalidRequest
from federation_grpc.hub.domain import MetricRecord
from federation_grpc.hub.store import HubStore, MetricRow

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_METRIC_RECORDS = 1000
MAX_METRIC_VALUES = 256


def check_numbers(values: dict[str, float], what: str) -> dict[str, float]:
    """Keep de-identified numbers only: short identifier keys, finite float values."""
    if len(values) > MAX_METRIC_VALUES:
        raise InvalidRequest(f"{what}: more than {MAX_METRIC_VALUES} values")
    out = {}
    for key, value in values.items():
        if not NAME_PATTERN.match(key):
            raise InvalidRequest(f"{what}: key {key[:80]!r} is not a short identifier")
        if not math.isfinite(value):
            raise InvalidRequest(f"{what}: value of {key!r} is not finite")
        out[key] = float(value)
    return out


class MetricReports:
    def __init__(self, store: HubStore) -> None:
        self.store = store

    def add(self, node_id: str, records: Sequence[MetricRecord]) -> int:
        """Check and keep a node's records, all or none; return how many were kept."""
        if len(records) > MAX_METRIC_RECORDS:
            raise InvalidRequest(f"more than {MAX_METRIC_RECORDS} metric records in one call")
        rows = []
        for record in records:
            if not NAME_PATTERN.match(record.kind):
                raise InvalidRequest(f"metric kind {record.kind[:80]!r} is not a short identifier")
            values = check_numbers(record.values, f"metric record {record.kind!r}")
            rows.append(
                MetricRow(
                    node_id=node_id, kind=record.kind, generation=record.generation, values=values
                )
            )
        with self.store.session() as session:
            session.add_all(rows)
        return len(rows)

    def records(self, kind: str | None = None) -> list[tuple[str, MetricRecord]]:
        with self.store.session() as session:
            query = select(MetricRow).order_by(MetricRow.id)
            if kind:
                query = query.where(MetricRow.kind == kind)
            return [
                (r.node_id, MetricRecord(r.kind, r.generation, dict(r.values)))
                for r in session.scalars(query)
            ]
