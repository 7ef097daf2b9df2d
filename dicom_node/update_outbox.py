"""The update outbox as the federation agent delivers it: the rows still to send, each
attempt recorded on its row (retried with backoff, or finished: sent or dead-lettered),
and the metadata the hub is told about an update (counts and held-out Dice, no UID).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from dicom_node.config import FederationSettings
from dicom_node.store.db import Database
from dicom_node.store.models import OutboxState, UpdateOutboxItem
from federation_grpc.uploading import UpdateMetadata

LOGGER = logging.getLogger(__name__)

# The update file's sha256, in its metadata since it was written (pipeline.round_update).
PAYLOAD_SHA256 = "payload_sha256"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class OutboxEntry:
    """One pending row, read out of its session."""

    row_id: int
    update_id: str
    model: str
    base_generation: int
    path: str
    meta: dict[str, Any]
    attempts: int


class UpdateOutbox:
    """Pending updates and their delivery attempts; backoff is kept in memory (a restart
    tries every pending row at once)."""

    def __init__(self, db: Database, settings: FederationSettings) -> None:
        self.db = db
        self.settings = settings
        self._next_try: dict[int, float] = {}

    def pending(self) -> list[OutboxEntry]:
        with self.db.session() as s:
            return [OutboxEntry(r.id, r.update_id, r.model_name, r.base_generation, r.path,
                                dict(r.meta), r.attempts)
                    for r in s.execute(select(UpdateOutboxItem).where(
                        UpdateOutboxItem.state == OutboxState.PENDING)
                        .order_by(UpdateOutboxItem.id)).scalars()]

    def backing_off(self, row_id: int) -> bool:
        return time.monotonic() < self._next_try.get(row_id, 0.0)

    def retry_later(self, row_id: int, attempts: int, error: str) -> None:
        delay = min(self.settings.upload_backoff_max_s,
                    self.settings.upload_interval_s * 2 ** min(attempts, 12))
        self._next_try[row_id] = time.monotonic() + delay
        with self.db.session() as s:
            row = s.get(UpdateOutboxItem, row_id)
            if row is not None:
                row.attempts += 1
                row.last_error = error[:2000]
        LOGGER.warning("update outbox row %d not delivered (attempt %d), retry in %.0f s: %s",
                       row_id, attempts + 1, delay, error)

    def finish(self, row_id: int, state: OutboxState, note: str | None) -> None:
        self._next_try.pop(row_id, None)
        with self.db.session() as s:
            row = s.get(UpdateOutboxItem, row_id)
            if row is not None:
                row.state = state
                row.attempts += 1
                row.last_error = note
                if state == OutboxState.SENT:
                    row.sent_at = datetime.now(UTC)


def update_metadata(hub_id: str, hub_base: int, meta: dict[str, Any]) -> UpdateMetadata:
    """What the hub is told about an update: its ids, sample count, trained groups and the
    finite local figures (held-out Dice of base and candidate, cases, slices)."""
    groups = json.loads(meta.get("trained_groups", "[]"))
    validation = json.loads(meta.get("validation", "null")) or {}
    local: dict[str, float] = {}
    for which in ("base", "candidate"):
        figures = validation.get(which) or {}
        if isinstance(figures.get("mean"), int | float):
            local[f"held_out.{which}.mean"] = float(figures["mean"])
    if isinstance(validation.get("cases"), int):
        local["held_out.cases"] = float(validation["cases"])
    if str(meta.get("num_slices", "")).isdigit():
        local["num_slices"] = float(meta["num_slices"])
    sha = meta.get(PAYLOAD_SHA256)
    return UpdateMetadata(
        update_id=hub_id, base_generation=hub_base,
        num_samples=int(meta.get("num_samples", "1")), trained_groups=tuple(groups),
        local_metrics={k: v for k, v in local.items() if math.isfinite(v)},
        # an update written before the hash was kept is hashed when it is sent
        sha256=sha if isinstance(sha, str) and _HEX64.match(sha) else None)
