"""The pipeline's edges: every job kind, the payload it carries, who queues it and who
handles it, in one table.

Stages never call each other; each writes rows and queues the next job in the same
transaction, so any worker process sharing the database can run any step and a crash
repeats a step instead of losing it. This module is the only place that names a kind.

    kind        payload            queued by                          handled by
    ----------  -----------------  ---------------------------------  ------------------
    inference   InferencePayload   SeriesAssembler (segment rule)     SegmentationJob
    export      ExportPayload      SeriesAssembler (forward rule),    Exporter
                                   SegmentationJob (the SEG)
    correction  CorrectionPayload  SeriesAssembler (a SEG series)     CorrectionJob
    training    TrainingPayload    CorrectionIntake (train_every)     IncrementalTrainer
    activate    ActivatePayload    versions.rollback                  IncrementalTrainer
    adapt       AdaptPayload       FederationAgent (a hub generation) GenerationAdapter
    quality     QualityPayload     SegmentationJob (with the SEG's    QualityJob
                                   export; deferred until its first
                                   delivery attempt ends)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Self

from sqlalchemy.orm import Session

from dicom_node.store.jobs import ClaimedJob, JobQueue

__all__ = [
    "FLOW", "ActivatePayload", "AdaptPayload", "CorrectionPayload", "Edge", "ExportPayload",
    "InferencePayload", "JobKind", "JobPayload", "QualityPayload", "TrainingPayload",
    "enqueue",
]


class JobKind(StrEnum):
    """Job kinds as stored in the ``job.kind`` column."""

    INFERENCE = "inference"
    EXPORT = "export"
    CORRECTION = "correction"
    TRAINING = "training"
    ACTIVATE = "model-activate"
    ADAPT = "generation-adapt"
    QUALITY = "quality-metrics"


@dataclass(frozen=True)
class JobPayload:
    """What a job carries; subclasses name their kind and their unique key."""

    kind: ClassVar[JobKind]

    @property
    def key(self) -> str:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in self.__dict__.items()}

    @classmethod
    def of(cls, job: ClaimedJob) -> Self:
        """The payload of a claimed job; a row of another kind or shape is a bug, said so."""
        if job.kind != cls.kind:
            raise ValueError(f"job {job.id} is a {job.kind!r} job, not {cls.kind.value!r}")
        names = cls.__dataclass_fields__
        data = {k: v for k, v in job.payload.items() if k in names}
        try:
            made = cls(**data)
        except TypeError as exc:
            raise ValueError(f"job {job.id} ({job.kind}): bad payload {job.payload!r}: "
                             f"{exc}") from exc
        return made


@dataclass(frozen=True)
class InferencePayload(JobPayload):
    kind: ClassVar[JobKind] = JobKind.INFERENCE
    series_uid: str
    rule: str
    model: str
    destinations: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "destinations", tuple(self.destinations))

    @property
    def key(self) -> str:
        return f"{self.series_uid}:{self.rule}"


@dataclass(frozen=True)
class ExportPayload(JobPayload):
    kind: ClassVar[JobKind] = JobKind.EXPORT
    series_uid: str
    destination: str

    @property
    def key(self) -> str:
        return f"{self.series_uid}:{self.destination}"


@dataclass(frozen=True)
class CorrectionPayload(JobPayload):
    kind: ClassVar[JobKind] = JobKind.CORRECTION
    series_uid: str

    @property
    def key(self) -> str:
        return self.series_uid


@dataclass(frozen=True)
class TrainingPayload(JobPayload):
    kind: ClassVar[JobKind] = JobKind.TRAINING
    model: str

    @property
    def key(self) -> str:
        return self.model


@dataclass(frozen=True)
class ActivatePayload(JobPayload):
    kind: ClassVar[JobKind] = JobKind.ACTIVATE
    model: str

    @property
    def key(self) -> str:
        return self.model


@dataclass(frozen=True)
class AdaptPayload(JobPayload):
    """Fit hub ``generation`` of ``model`` to this site; ``previous`` is the generation
    the node served before it (-1: none), kept if the new one is worse here."""

    kind: ClassVar[JobKind] = JobKind.ADAPT
    model: str
    generation: int
    previous: int = -1

    @property
    def key(self) -> str:
        return f"{self.model}:{self.generation}"


@dataclass(frozen=True)
class QualityPayload(JobPayload):
    """Quality metrics of the SEG the node made (``pipeline.quality_job``)."""

    kind: ClassVar[JobKind] = JobKind.QUALITY
    seg_sop_instance_uid: str

    @property
    def key(self) -> str:
        return self.seg_sop_instance_uid


@dataclass(frozen=True)
class Edge:
    """One row of the flow table."""

    kind: JobKind
    payload: type[JobPayload]
    queued_by: str
    handled_by: str
    max_attempts: int | None  # None: from configuration ([export] max_attempts)


FLOW: tuple[Edge, ...] = (
    Edge(JobKind.INFERENCE, InferencePayload, "SeriesAssembler", "SegmentationJob", 3),
    Edge(JobKind.EXPORT, ExportPayload, "SeriesAssembler, SegmentationJob", "Exporter", None),
    Edge(JobKind.CORRECTION, CorrectionPayload, "SeriesAssembler", "CorrectionJob", 3),
    Edge(JobKind.TRAINING, TrainingPayload, "CorrectionIntake", "IncrementalTrainer", 3),
    Edge(JobKind.ACTIVATE, ActivatePayload, "versions.rollback", "IncrementalTrainer", 5),
    Edge(JobKind.ADAPT, AdaptPayload, "FederationAgent", "GenerationAdapter", 3),
    Edge(JobKind.QUALITY, QualityPayload, "SegmentationJob", "QualityJob", 3),
)
_EDGES = {edge.kind: edge for edge in FLOW}


def enqueue(queue: JobQueue, payload: JobPayload, *, session: Session | None = None,
            max_attempts: int | None = None, unique_active: bool = True) -> int | None:
    """Queue ``payload``'s job with its kind's attempts (``max_attempts`` only where the
    table says they come from configuration)."""
    attempts = _EDGES[payload.kind].max_attempts or max_attempts
    if attempts is None:
        raise ValueError(f"{payload.kind.value} jobs take max_attempts from configuration")
    return queue.enqueue(payload.kind, payload.key, payload.to_json(), max_attempts=attempts,
                         session=session, unique_active=unique_active)
