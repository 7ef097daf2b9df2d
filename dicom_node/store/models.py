"""SQLAlchemy 2.0 typed models of the node's index.

The index holds UIDs, DICOM codes and states; it never holds patient names, IDs or
birth dates (those stay inside the instance files).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every engine (SQLite stores naive values)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class SeriesState(StrEnum):
    RECEIVING = "receiving"   # instances arriving; quiet period not yet over
    COMPLETE = "complete"     # quiet period over; no rule matched: stored only
    QUEUED = "queued"         # routed: jobs queued for it
    FORWARDED = "forwarded"   # forward-only rules, every instance delivered
    SEGMENTED = "segmented"
    REFUSED = "refused"       # cannot be processed (geometry, modality...); reason kept
    FAILED = "failed"


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(128))
    series_number: Mapped[int | None] = mapped_column(Integer)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    called_ae: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING)
    state_reason: Mapped[str | None] = mapped_column(Text)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")

    __table_args__ = (Index("ix_series_state_last", "state", "last_received_at"),)


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(300))  # relative to the instance root
    size: Mapped[int] = mapped_column(Integer)
    # Of the dataset after the file meta group: the instance's identity for duplicates
    # (the meta group records who sent it and how). Rows written before 2026-12 hold
    # the whole file's digest; InstanceStore compares the file itself for those.
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    DEAD = "dead"   # gave up after max_attempts; reason in last_error


class Job(Base):
    """A unit of work with a lease: claimed by one worker at a time, retried on failure."""

    __tablename__ = "job"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(200), index=True)  # what the job is about
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    not_before: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_job_claim", "state", "kind", "not_before"),)


class OutboxState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class OutboxItem(Base):
    """One instance to deliver to one destination; delivered at most once when acknowledged."""

    __tablename__ = "outbox_item"

    id: Mapped[int] = mapped_column(primary_key=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), default=OutboxState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("destination", "sop_instance_uid", name="uq_outbox_dest_sop"),
        Index("ix_outbox_state_dest", "state", "destination"),
    )


class AuditEvent(Base):
    """Something an operator should see: refusals, quarantines, conflicts."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    peer_ae: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    series_uid: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    quarantine_path: Mapped[str | None] = mapped_column(String(300))


class Segmentation(Base):
    """An AI segmentation the node produced: which series, model generation, SEG, metrics."""

    __tablename__ = "segmentation"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    generation: Mapped[int] = mapped_column(Integer)
    seg_series_uid: Mapped[str] = mapped_column(String(64))
    seg_sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("series_uid", "model_name", "generation",
                                       name="uq_segmentation_series_model_gen"),)


# -- learning from corrections --------------------------------------------------------------

class CorrectionState(StrEnum):
    RECORDED = "recorded"   # a usable correction; its sample waits for / went to training
    ACCEPTED = "accepted"   # the radiologist saved the AI result unchanged
    FLAGGED = "flagged"     # unusable (reason kept); stored, never trained on
    IGNORED = "ignored"     # not a correction (the node's own SEG coming back)


class Correction(Base):
    """A SEG from a viewer that corrects an AI segmentation of the node, and what it changed."""

    __tablename__ = "correction"

    id: Mapped[int] = mapped_column(primary_key=True)
    seg_sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    seg_series_uid: Mapped[str] = mapped_column(String(64))
    source_series_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    segmentation_id: Mapped[int | None] = mapped_column(ForeignKey("segmentation.id"))
    model_name: Mapped[str | None] = mapped_column(String(64))
    ai_generation: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    split: Mapped[str | None] = mapped_column(String(16))  # train / validation
    dice: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # label -> AI vs corrected
    changed_slices: Mapped[list[int]] = mapped_column(JSON, default=list)
    labels: Mapped[list[str]] = mapped_column(JSON, default=list)  # model labels it annotates
    unknown_segments: Mapped[list[str]] = mapped_column(JSON, default=list)
    delay_s: Mapped[float | None] = mapped_column(Float)
    peer_ae: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class SampleState(StrEnum):
    PENDING = "pending"        # not trained on yet
    TRAINED = "trained"        # used by a round; now part of the replay buffer
    HELD_OUT = "held-out"      # validation split: never trained on
    SUPERSEDED = "superseded"  # a later correction of the same series replaced it
    EVICTED = "evicted"        # dropped from the replay buffer (size budget)


class TrainingSample(Base):
    """Touched slices (plus neighbours) of one correction, as an npz blob under data_dir."""

    __tablename__ = "training_sample"

    id: Mapped[int] = mapped_column(primary_key=True)
    correction_id: Mapped[int] = mapped_column(ForeignKey("correction.id"), unique=True)
    source_series_uid: Mapped[str] = mapped_column(String(64), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    split: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)
    path: Mapped[str] = mapped_column(String(300))  # relative to data_dir
    slices: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    annotated: Mapped[list[str]] = mapped_column(JSON, default=list)
    trained_generation: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ModelVersionState(StrEnum):
    SERVING = "serving"
    CANDIDATE = "candidate"
    REJECTED = "rejected"   # held-out Dice fell by more than the margin
    RETIRED = "retired"     # served before; a rollback target


class ModelVersion(Base):
    """A generation of a model known to this node, with its lineage."""

    __tablename__ = "model_version"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    generation: Mapped[int] = mapped_column(Integer)
    parent_generation: Mapped[int | None] = mapped_column(Integer)
    origin: Mapped[str] = mapped_column(String(16))  # shipped / configured / built / local / hub
    path: Mapped[str | None] = mapped_column(String(400))
    state: Mapped[str] = mapped_column(String(16), index=True)
    update_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    samples: Mapped[int] = mapped_column(Integer, default=0)
    sample_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (UniqueConstraint("name", "generation", name="uq_model_version_gen"),)


class UpdateOutboxItem(Base):
    """A local update (changed parameter groups + metadata) waiting to go to the hub."""

    __tablename__ = "update_outbox"

    id: Mapped[int] = mapped_column(primary_key=True)
    update_id: Mapped[str] = mapped_column(String(64), unique=True)
    model_name: Mapped[str] = mapped_column(String(64))
    base_generation: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(400))  # safetensors; metadata JSON beside it
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default=OutboxState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
