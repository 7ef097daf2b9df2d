"""Federated evaluation tasks: a candidate generation scored by nodes on their own cases.

The aggregator opens a task when a merged candidate needs the nodes' verdict
(``[gate] federated_evaluation``) and settles it from the results (see ``aggregator``);
nodes fetch the open tasks they have not answered and submit one result each.
"""

from __future__ import annotations

import math
import uuid
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from federation_grpc.errors import InvalidRequest, NotFound
from federation_grpc.hub.domain import EvaluationTaskView
from federation_grpc.hub.store import (
    EvaluationResultRow,
    EvaluationTaskRow,
    HubStore,
    as_utc,
    utcnow,
)


class EvaluationTasks:
    def __init__(self, store: HubStore) -> None:
        self.store = store

    def open(self, session: Session, candidate: int, reference: int, timeout_s: float) -> None:
        """Ask the nodes to score ``candidate`` against ``reference`` (caller's transaction)."""
        session.add(
            EvaluationTaskRow(
                task_id=str(uuid.uuid4()),
                candidate_generation=candidate,
                reference_generation=reference,
                deadline=utcnow() + timedelta(seconds=timeout_s),
            )
        )

    @staticmethod
    def open_task(session: Session) -> EvaluationTaskRow | None:
        return session.scalar(select(EvaluationTaskRow).where(EvaluationTaskRow.open))

    @staticmethod
    def results(session: Session, task_id: str) -> list[EvaluationResultRow]:
        return list(
            session.scalars(
                select(EvaluationResultRow).where(EvaluationResultRow.task_id == task_id)
            )
        )

    def is_open_for(self, candidate: int) -> bool:
        """Whether nodes may download ``candidate`` to evaluate it now."""
        with self.store.session() as session:
            task = session.scalar(
                select(EvaluationTaskRow).where(
                    EvaluationTaskRow.candidate_generation == candidate, EvaluationTaskRow.open
                )
            )
        return task is not None

    def fetch(self, node_id: str) -> list[EvaluationTaskView]:
        """The open tasks ``node_id`` has not answered, before their deadline."""
        now = utcnow()
        with self.store.session() as session:
            done = select(EvaluationResultRow.task_id).where(EvaluationResultRow.node_id == node_id)
            rows = session.scalars(
                select(EvaluationTaskRow).where(
                    EvaluationTaskRow.open, EvaluationTaskRow.task_id.not_in(done)
                )
            ).all()
            return [
                EvaluationTaskView(
                    r.task_id, r.candidate_generation, r.reference_generation, as_utc(r.deadline)
                )
                for r in rows
                if as_utc(r.deadline) > now
            ]

    def submit(
        self, node_id: str, task_id: str, candidate: float, reference: float, num_cases: int
    ) -> bool:
        """Store a node's scores; False if the task is closed or the node answered."""
        if not (math.isfinite(candidate) and math.isfinite(reference)) or num_cases < 1:
            raise InvalidRequest("scores must be finite and num_cases at least 1")
        with self.store.session() as session:
            task = session.get(EvaluationTaskRow, task_id)
            if task is None:
                raise NotFound(f"no evaluation task {task_id!r}")
            if not task.open:
                return False
            if session.get(EvaluationResultRow, (task_id, node_id)) is not None:
                return False
            session.add(
                EvaluationResultRow(
                    task_id=task_id,
                    node_id=node_id,
                    candidate_score=candidate,
                    reference_score=reference,
                    num_cases=num_cases,
                )
            )
        return True
