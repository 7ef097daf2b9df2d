"""The numbers nodes report (quality metrics of segmentations and corrections).

Only de-identified numbers are kept: short identifier keys and finite float values.
The quality model (``quality``) reads them back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

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
        """Check and keep a node's records, all or none; return how many the hub holds.

        A record whose key this node has sent before (a retried call, a cursor saved
        late) is held already and not kept again; records without a key are all kept.
        """
        if len(records) > MAX_METRIC_RECORDS:
            raise InvalidRequest(f"more than {MAX_METRIC_RECORDS} metric records in one call")
        keyed: dict[str, dict[str, object]] = {}
        unkeyed: list[dict[str, object]] = []
        for record in records:
            if not NAME_PATTERN.match(record.kind):
                raise InvalidRequest(f"metric kind {record.kind[:80]!r} is not a short identifier")
            if record.key and not NAME_PATTERN.match(record.key):
                raise InvalidRequest(f"metric key {record.key[:80]!r} is not a short identifier")
            row = {
                "node_id": node_id,
                "kind": record.kind,
                "generation": record.generation,
                "values": check_numbers(record.values, f"metric record {record.kind!r}"),
                "record_key": record.key or None,
            }
            if record.key:
                keyed.setdefault(record.key, row)  # the first of a key sent twice at once
            else:
                unkeyed.append(row)
        for attempt in (1, 2):
            try:
                with self.store.session() as session:
                    held = set(session.scalars(select(MetricRow.record_key).where(
                        MetricRow.node_id == node_id, MetricRow.record_key.in_(list(keyed))
                    ))) if keyed else set()
                    new = unkeyed + [row for key, row in keyed.items() if key not in held]
                    session.add_all(MetricRow(**row) for row in new)
                break
            except IntegrityError:
                # The same report on two connections at once: the other one kept it.
                if attempt == 2:
                    raise
        return len(records)

    def records(self, kind: str | None = None) -> list[tuple[str, MetricRecord]]:
        with self.store.session() as session:
            query = select(MetricRow).order_by(MetricRow.id)
            if kind:
                query = query.where(MetricRow.kind == kind)
            return [
                (r.node_id, MetricRecord(r.kind, r.generation, dict(r.values),
                                         r.record_key or ""))
                for r in session.scalars(query)
            ]
