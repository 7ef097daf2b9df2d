"""Federated evaluation: the hub asks, the node scores, two numbers go back.

When the hub's gate has no validation set of its own (``[gate] federated_evaluation``),
a candidate generation waits for nodes to score it. This node answers each open task
by scoring the candidate and the task's reference generation on its held-out corrected
cases (the ``held-out`` training samples: every ``validation_every``-th correction,
never trained on) with the same pooled Dice its own acceptance gate uses
(``evaluate_samples``: slices, or whole volumes for an external network), and submits
the two means with the number of cases. Nothing else leaves: no slices, no UIDs.

A node without held-out cases (or whose cases annotate no label of the model) answers
with no cases: it cannot judge, and the hub need not wait for it (``num_cases`` 0; the
hub records the candidate as not judged there). A task the hub closed meanwhile, or a
generation it no longer offers, is skipped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicom_node.learning.evaluation import HeldOutSample, decode_any_sample, evaluate_samples
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import SegmentationNetwork
from dicom_node.learning.weights import model_from_bytes
from dicom_node.pipeline.hub_generations import hub_config_for
from dicom_node.pipeline.model_sources import ModelRegistry
from dicom_node.pipeline.training_samples import held_out_rows
from dicom_node.store.db import Database
from federation_grpc.client import FederationClient
from federation_grpc.errors import FailedPrecondition, NotFound, PermissionDenied

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    task_id: str
    candidate: float
    reference: float
    cases: int


class EvaluationResponder:
    """Answers the hub's evaluation tasks for one model from this node's held-out cases."""

    def __init__(self, db: Database, models: ModelRegistry, data_dir: Path, name: str) -> None:
        self.db = db
        self.models = models
        self.data_dir = data_dir
        self.name = name
        self._settled: set[str] = set()  # answered or skipped for good
        self.rounds = 0  # answer() calls, for status and tests

    def held_out(self) -> list[HeldOutSample]:
        with self.db.session() as s:
            paths = [row.path for row in held_out_rows(s, self.name)]
        samples = []
        for path in paths:
            try:
                samples.append(decode_any_sample((self.data_dir / path).read_bytes()))
            except (OSError, ValueError, KeyError) as exc:
                LOGGER.warning("held-out sample %s unreadable, left out: %s", path, exc)
        return samples

    def answer(self, client: FederationClient,
               refused: Callable[[BaseException], bool] = lambda exc: False) -> list[Answer]:
        """Score and submit every open task not answered yet; returns what was sent.

        ``refused(exc)`` tells a refusal of the node itself (re-raised) from a refusal of
        one generation (the task is skipped).
        """
        self.rounds += 1
        tasks = [t for t in client.fetch_evaluation_tasks() if t.task_id not in self._settled]
        if not tasks:
            return []
        held = self.held_out()
        if not held:
            LOGGER.info("%d evaluation task(s) open; no held-out corrected cases to score "
                        "them on: answered as not judged here", len(tasks))
        answers = []
        scores: dict[int, float | None] = {}  # tasks of one round share their reference

        def score(generation: int) -> float | None:
            if generation not in scores:
                scores[generation] = self._score(client, generation, held)
            return scores[generation]

        for task in tasks:
            try:
                candidate = score(task.candidate_generation) if held else None
                reference = score(task.reference_generation) if held else None
                cases = len(held) if candidate is not None and reference is not None else 0
                if held and not cases:
                    LOGGER.info("evaluation task %s: the held-out cases annotate no label of "
                                "the model; answered as not judged here", task.task_id)
                accepted = client.submit_evaluation_result(
                    task.task_id, candidate or 0.0, reference or 0.0, cases)
            except (NotFound, FailedPrecondition, PermissionDenied) as exc:
                # closed meanwhile, or a generation no longer offered: nothing to answer
                if isinstance(exc, PermissionDenied) and refused(exc):
                    raise
                LOGGER.info("evaluation task %s skipped: %s", task.task_id, exc)
                self._settled.add(task.task_id)
                continue
            self._settled.add(task.task_id)
            answers.append(Answer(task.task_id, candidate or 0.0, reference or 0.0, cases))
            LOGGER.info("evaluation task %s: candidate %d scores %.4f, reference %d %.4f on "
                        "%d held-out cases (%s)", task.task_id, task.candidate_generation,
                        candidate or 0.0, task.reference_generation, reference or 0.0, cases,
                        "taken" if accepted else "no longer wanted")
        return answers

    def _score(self, client: FederationClient, generation: int,
               held: list[HeldOutSample]) -> float | None:
        model, config = self._model(client.download(generation), generation)
        mean = evaluate_samples(model, config, held).get("mean")
        return mean if mean is not None and math.isfinite(mean) else None

    def _model(self, data: bytes, generation: int) -> tuple[SegmentationNetwork, ModelConfig]:
        _, current = self.models.get(self.name)
        return model_from_bytes(data, hub_config_for("", current, generation),
                                code_dirs=self.models.code_dirs(self.name))
