"""The rejection log: every refused update and candidate, with its stage and reasons.

Operators read it with ``tessera hub rejections``; a node learns the outcome of its own
update from the upload status, which carries the same reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from federation_grpc.hub.domain import RejectionView
from federation_grpc.hub.store import HubStore, RejectionRow, UpdateRow, UpdateStatus, as_utc

LOGGER = logging.getLogger(__name__)


class RejectionLog:
    def __init__(self, store: HubStore) -> None:
        self.store = store

    def record(
        self,
        session: Session,
        update_id: str,
        node_id: str,
        stage: str,
        reasons: Sequence[str],
        candidate_generation: int | None = None,
    ) -> None:
        """Log a refusal in the caller's transaction."""
        session.add(
            RejectionRow(
                update_id=update_id,
                node_id=node_id,
                stage=stage,
                reasons=list(reasons),
                candidate_generation=candidate_generation,
            )
        )
        LOGGER.warning(
            "update %s from %s rejected (%s): %s", update_id, node_id, stage, "; ".join(reasons)
        )

    def reject(
        self,
        session: Session,
        update: UpdateRow,
        stage: str,
        reasons: Sequence[str],
        candidate_generation: int | None = None,
    ) -> None:
        """Mark a stored update REJECTED with its reasons and log the refusal."""
        update.status, update.reason = UpdateStatus.REJECTED, "; ".join(reasons)
        self.record(
            session, update.update_id, update.node_id, stage, reasons, candidate_generation
        )

    def list(self, limit: int = 100) -> list[RejectionView]:
        with self.store.session() as session:
            rows = session.scalars(
                select(RejectionRow).order_by(RejectionRow.id.desc()).limit(limit or 100)
            ).all()
            return [
                RejectionView(
                    update_id=r.update_id,
                    node_id=r.node_id,
                    stage=r.stage,
                    reasons=tuple(r.reasons),
                    created_at=as_utc(r.created_at),
                    candidate_generation=-1
                    if r.candidate_generation is None
                    else r.candidate_generation,
                )
                for r in rows
            ]
