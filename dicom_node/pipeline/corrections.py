"""Correction intake: a stored SEG that corrects one of the node's AI segmentations.

    SEG stored (C-STORE, or STOW-RS via viewer_bridge: both only store it)
      --> its series completes --> ``correction`` job --> CorrectionIntake.ingest(sop uid)
      --> checks (size, own SEG, referenced series, segmented by the node, geometry)
      --> label volume aligned to the source --> Dice AI vs corrected, changed slices
      --> training sample (touched slices + neighbours) --> ``training`` job

A SEG is a correction only if it references a series the node segmented and is not
the node's own SEG (by SOP/Series UID, or by its algorithm identification). A bad
correction is already stored (it arrived like any instance); it gets a ``flagged``
Correction row and an AuditEvent with the reason, and is never trained on. An SEG
that changes nothing counts as ``accepted``.

Idempotent: one Correction row per SEG SOP Instance UID; re-running returns it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.config import LearningSettings
from dicom_node.errors import DicomNodeError, InvalidDatasetError, SeriesRefused
from dicom_node.learning.incremental import touched_slices
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.scores import dice
from dicom_node.pipeline.correction_sample import (
    queue_training,
    sample_split,
    supersede_samples,
    write_sample,
)
from dicom_node.pipeline.flow import CorrectionPayload, JobKind, enqueue
from dicom_node.pipeline.model_sources import ModelRegistry
from dicom_node.pipeline.seg import SegmentSpec
from dicom_node.pipeline.seg_read import SEG_SOP_CLASSES, read_seg_labels
from dicom_node.pipeline.segment_matching import match_segments, segment_infos
from dicom_node.pipeline.segmentation import segment_specs
from dicom_node.pipeline.stage import SeriesStage
from dicom_node.pipeline.volume import Volume, build_volume
from dicom_node.store.db import Database
from dicom_node.store.files import InstanceFiles
from dicom_node.store.instances import InstanceStore, Peer
from dicom_node.store.jobs import ClaimedJob, JobQueue
from dicom_node.store.models import (
    Correction,
    CorrectionState,
    Instance,
    SampleState,
    Segmentation,
    Series,
    TrainingSample,
)

LOGGER = logging.getLogger(__name__)


class NotACorrection(DicomNodeError):
    """Internal: ends the intake with a Correction row in ``state`` with ``reason``."""

    def __init__(self, state: CorrectionState, reason: str) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason


@dataclass(frozen=True)
class CorrectionOutcome:
    """What the intake decided about one SEG (a snapshot of its Correction row)."""

    correction_id: int
    state: CorrectionState
    reason: str | None
    dice: dict[str, float]
    changed_slices: tuple[int, ...]
    training_queued: bool = False


class CorrectionIntake(SeriesStage):
    """Turns a stored SEG instance into a Correction (and a training sample).

    Run by the ``correction`` job that the assembler queues when a SEG series completes,
    whichever way its instances arrived (C-STORE or STOW-RS).
    """

    def __init__(self, db: Database, files: InstanceFiles, store: InstanceStore,
                 queue: JobQueue, data_dir: Path, models: ModelRegistry,
                 settings: LearningSettings) -> None:
        super().__init__(db, files, store, queue, data_dir, models)
        self.settings = settings

    # -- the entry point ------------------------------------------------------------
    def ingest(self, sop_instance_uid: str, *,
               heartbeat: Callable[[], None] | None = None) -> CorrectionOutcome:
        """Decide about the stored SEG ``sop_instance_uid``.

        Raises
        ------
        DicomNodeError
            No stored instance has this UID.
        Other exceptions (a database or file error) leave nothing recorded, so a retry
        starts afresh.
        """
        beat = heartbeat or (lambda: None)
        with self.db.session() as s:
            done = s.execute(select(Correction).where(
                Correction.seg_sop_instance_uid == sop_instance_uid)).scalar_one_or_none()
            if done is not None:
                return _outcome(done)
            row = s.execute(select(Instance, Series.series_uid).join(Series).where(
                Instance.sop_instance_uid == sop_instance_uid)).first()
        if row is None:
            raise DicomNodeError(f"no stored instance {sop_instance_uid}")
        instance, seg_series_uid = row
        draft = Correction(seg_sop_instance_uid=sop_instance_uid, seg_series_uid=seg_series_uid,
                           peer_ae=instance.calling_ae, dice={}, changed_slices=[], labels=[],
                           unknown_segments=[])
        try:
            return self._evaluate(draft, instance, beat)
        except NotACorrection as exc:
            return self._finish_rejected(draft, exc)

    # -- the checks, in order ---------------------------------------------------------
    def _evaluate(self, draft: Correction, instance: Instance,
                  beat: Callable[[], None]) -> CorrectionOutcome:
        path = self.files.absolute(instance.path)
        header = self._read_header(instance, path)
        ai = self._corrected_segmentation(draft, instance, header)
        source_uid = draft.source_series_uid or ""
        model_config = self._model_config(ai.model_name)
        specs = segment_specs(model_config, include_pending=True)  # a new structure
        try:
            infos = segment_infos(header)
        except (AttributeError, IndexError, KeyError, ValueError, TypeError) as exc:
            raise _flag(f"SEG segments cannot be read: {type(exc).__name__}: "
                        f"{str(exc)[:200]}") from exc
        mapping = match_segments(infos, specs)
        draft.unknown_segments = [f"{i.number}:{_printable(i.label_name)}" for i in infos
                                  if i.number not in mapping and not i.background]
        if not mapping:
            raise _flag("no segment matches a model label: "
                        + ", ".join(draft.unknown_segments))
        volume = self._source_volume(source_uid, model_config)
        beat()
        try:
            corrected = read_seg_labels(pydicom.dcmread(path), volume, specs)[0]
        except InvalidDatasetError as exc:
            raise _flag(f"SEG cannot be used: {exc}") from exc
        except Exception as exc:  # a SEG a peer wrote must never fail the job in a loop
            LOGGER.warning("SEG %s: pixel data cannot be read", draft.seg_sop_instance_uid,
                           exc_info=True)
            raise _flag(f"SEG pixel data cannot be read: {type(exc).__name__}: "
                        f"{str(exc)[:200]}") from exc
        ai_labels = self._ai_labels(ai, volume, specs)
        beat()
        by_label = {v: k for k, v in model_config.label_values.items()}
        values = sorted(set(mapping.values()))
        draft.labels = [by_label[v] for v in values]
        if not corrected.any():
            raise _flag("SEG is empty: no segment marks any voxel")
        draft.dice = {by_label[v]: round(dice(ai_labels == v, corrected == v), 6)
                      for v in values}
        changed = touched_slices(ai_labels, corrected, values)
        draft.changed_slices = changed
        if not changed:
            draft.state = CorrectionState.ACCEPTED
            draft.reason = "AI segmentation accepted unchanged"
            return self._finish(draft, None)
        return self._record(draft, volume, corrected, model_config)

    def _read_header(self, instance: Instance, path: Path) -> pydicom.Dataset:
        """The SEG's header, within the size and frame limits; flags anything else."""
        limit = int(self.settings.max_correction_mb * 1024 * 1024)
        if instance.size > limit:
            raise _flag(f"SEG of {instance.size} bytes exceeds learning.max_correction_mb "
                        f"({self.settings.max_correction_mb} MB); not read")
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as exc:
            raise _flag(f"SEG cannot be read: {exc}") from exc
        if str(header.get("Modality", "")) != "SEG" or "SegmentSequence" not in header:
            raise _flag("not a segmentation (Modality is not SEG or no segments)")
        frames = int(header.get("NumberOfFrames", 0) or 0)
        if frames > self.settings.max_correction_frames:
            raise _flag(f"SEG has {frames} frames, more than learning.max_correction_frames "
                        f"({self.settings.max_correction_frames}); not read")
        return header

    def _corrected_segmentation(self, draft: Correction, instance: Instance,
                                header: pydicom.Dataset) -> Segmentation:
        """The node's segmentation of the series the SEG references, the SEG not being the
        node's own; records both on ``draft``."""
        own = self._own_by_uid(draft)
        if own:
            raise NotACorrection(CorrectionState.IGNORED, own)
        source_uid = _referenced_series(header)
        if source_uid is None:
            raise _flag("SEG references no source series (ReferencedSeriesSequence)")
        draft.source_series_uid = source_uid
        ai = self._latest_segmentation(source_uid)
        if ai is None:
            if not self._series_paths(source_uid):
                raise _flag(f"referenced series {source_uid} is unknown to the node")
            raise _flag(f"the node never segmented the referenced series {source_uid}")
        draft.segmentation_id, draft.model_name = ai.id, ai.model_name
        draft.ai_generation = ai.generation
        own = _own_by_algorithm(header, ai)
        if own:
            raise NotACorrection(CorrectionState.IGNORED, own)
        draft.delay_s = max(0.0, (instance.received_at - ai.created_at).total_seconds())
        return ai

    def _record(self, draft: Correction, volume: Volume, corrected: np.ndarray,
                model_config: ModelConfig) -> CorrectionOutcome:
        hospital = set(self.settings.annotated_labels) or set(model_config.label_values)
        annotated = [n for n in draft.labels if n in hospital]
        draft.state = CorrectionState.RECORDED
        if not annotated:
            draft.reason = "annotates none of learning.annotated_labels; not trained on"
            return self._finish(draft, None)
        return self._finish(draft, write_sample(self.data_dir, draft, volume,
                                                corrected, annotated, model_config,
                                                self.settings.neighbour_slices))

    # -- recording -------------------------------------------------------------------
    def _finish(self, draft: Correction, sample: TrainingSample | None) -> CorrectionOutcome:
        queued = False
        superseded: list[str] = []
        with self.db.session() as s:
            if sample is not None:
                draft.split = sample.split = sample_split(s, draft,
                                                          self.settings.validation_every)
                if sample.split == "validation":
                    sample.state = SampleState.HELD_OUT
                superseded = supersede_samples(s, draft.source_series_uid or "")
            s.add(draft)
            s.flush()
            if sample is not None:
                sample.correction_id = draft.id
                s.add(sample)
                if sample.split == "train":
                    queued = queue_training(s, self.queue, self.settings, sample.model_name)
            outcome = _outcome(draft, queued)
        for rel in superseded:
            (self.data_dir / rel).unlink(missing_ok=True)
        LOGGER.info("SEG %s: correction %s of series %s (%s); Dice %s; %d changed slices",
                    draft.seg_sop_instance_uid, draft.state, draft.source_series_uid,
                    draft.reason or "", draft.dice, len(draft.changed_slices))
        return outcome

    def _finish_rejected(self, draft: Correction, exc: NotACorrection) -> CorrectionOutcome:
        draft.state, draft.reason = exc.state, exc.reason
        # Logged first: whoever sees the row (status, a test) finds the line too.
        log = LOGGER.warning if exc.state is CorrectionState.FLAGGED else LOGGER.info
        log("SEG %s from %s: %s: %s", draft.seg_sop_instance_uid, draft.peer_ae,
            exc.state, exc.reason)
        with self.db.session() as s:  # the flag and its audit event commit together
            s.add(draft)
            if exc.state is CorrectionState.FLAGGED:
                self.store.audit("correction-flagged", exc.reason,
                                 Peer(ae_title=draft.peer_ae), draft.seg_sop_instance_uid,
                                 draft.seg_series_uid, session=s)
            s.flush()
            return _outcome(draft)

    # -- lookups ---------------------------------------------------------------------
    def _own_by_uid(self, draft: Correction) -> str | None:
        with self.db.session() as s:
            hit = s.execute(select(Segmentation.id).where(
                (Segmentation.seg_sop_instance_uid == draft.seg_sop_instance_uid)
                | (Segmentation.seg_series_uid == draft.seg_series_uid))).first()
        return "the node's own SEG (SOP/Series Instance UID)" if hit else None

    def _latest_segmentation(self, series_uid: str) -> Segmentation | None:
        with self.db.session() as s:
            return s.execute(select(Segmentation).where(Segmentation.series_uid == series_uid)
                             .order_by(Segmentation.created_at.desc(), Segmentation.id.desc())
                             ).scalars().first()

    def _series_paths(self, series_uid: str) -> list[str]:
        with self.db.session() as s:
            return list(s.execute(select(Instance.path).join(Series).where(
                Series.series_uid == series_uid)).scalars())

    def _model_config(self, name: str) -> ModelConfig:
        try:
            return self.models.get(name)[1]
        except (DicomNodeError, OSError) as exc:
            raise _flag(f"model {name!r} that produced the AI result is not installed: "
                        f"{exc}") from exc

    def _source_volume(self, series_uid: str, config: ModelConfig) -> Volume:
        paths = self._series_paths(series_uid)
        try:
            datasets = [pydicom.dcmread(self.files.absolute(p)) for p in paths]
            return build_volume(datasets,
                                allowed_modalities={config.preprocessing.modality.value})
        except SeriesRefused as exc:
            raise _flag(f"referenced series {series_uid} cannot be read as a volume: "
                        f"{exc}") from exc

    def _ai_labels(self, ai: Segmentation, volume: Volume, specs: list[SegmentSpec]
                   ) -> np.ndarray:
        with self.db.session() as s:
            rel = s.execute(select(Instance.path).where(
                Instance.sop_instance_uid == ai.seg_sop_instance_uid)).scalar_one()
        return read_seg_labels(pydicom.dcmread(self.files.absolute(rel)), volume, specs)[0]


class CorrectionJob:
    """Job handler for ``correction`` jobs: every SEG instance of a completed series."""

    kinds: tuple[JobKind, ...] = (JobKind.CORRECTION,)

    def __init__(self, intake: CorrectionIntake) -> None:
        self.intake = intake

    def run(self, job: ClaimedJob, heartbeat: Callable[[], None]) -> None:
        with self.intake.db.session() as s:
            uids = list(s.execute(select(Instance.sop_instance_uid).join(Series).where(
                Series.series_uid == CorrectionPayload.of(job).series_uid,
                Instance.sop_class_uid.in_(SEG_SOP_CLASSES))).scalars())
        for uid in uids:
            self.intake.ingest(uid, heartbeat=heartbeat)

    def on_dead(self, job: ClaimedJob, error: str, s: Session) -> None:
        self.intake.store.audit("correction-failed", error,
                                series_uid=CorrectionPayload.of(job).series_uid, session=s)


def queue_correction(s: Session, queue: JobQueue, series: Series) -> None:
    """The assembler's hook: a completed SEG series may hold corrections."""
    enqueue(queue, CorrectionPayload(series.series_uid), session=s)


# -- helpers -------------------------------------------------------------------------
def _flag(reason: str) -> NotACorrection:
    return NotACorrection(CorrectionState.FLAGGED, reason)


def _referenced_series(header: pydicom.Dataset) -> str | None:
    refs = header.get("ReferencedSeriesSequence") or []
    if refs and refs[0].get("SeriesInstanceUID"):
        return str(refs[0].SeriesInstanceUID)
    return None


def _own_by_algorithm(header: pydicom.Dataset, ai: Segmentation) -> str | None:
    """Every segment AUTOMATIC and identified as the model generation that made ``ai``."""
    ids = set()
    for item in header.SegmentSequence:
        if str(item.get("SegmentAlgorithmType", "")) != "AUTOMATIC":
            return None
        algo = (item.get("SegmentationAlgorithmIdentificationSequence") or [None])[0]
        name = str(item.get("SegmentAlgorithmName", ""))
        version = str(algo.get("AlgorithmVersion", "")) if algo is not None else ""
        ids.add((name, version))
    if ids == {(ai.model_name, str(ai.generation))}:
        return (f"identified as the node's own model {ai.model_name} generation "
                f"{ai.generation} (algorithm identification), not a correction")
    return None


def _printable(text: str, limit: int = 64) -> str:
    """A peer's label text as shown in status: truncated, control characters escaped."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[:limit])


def _outcome(row: Correction, queued: bool = False) -> CorrectionOutcome:
    return CorrectionOutcome(row.id, CorrectionState(row.state), row.reason, dict(row.dice or {}),
                             tuple(row.changed_slices or ()), queued)
