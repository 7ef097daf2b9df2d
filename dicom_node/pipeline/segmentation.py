"""The inference job: series -> volume -> model -> DICOM-SEG -> store -> outbox.

Idempotent: the SEG's UIDs are derived from (series, model, generation), and a
series already segmented by that generation is only re-queued for export, unless it
gained instances since (a sender that paused longer than the assembler's quiet period
completes the series twice): then it is segmented again, as a new instance of the same
SEG series (``revision``), so the SEG never covers part of a series for good.
"""

from __future__ import annotations

import gc
import io
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from sqlalchemy import Update, func, select, update
from sqlalchemy.orm import Session

from dicom_node.config import DicomSettings, InferenceSettings, RoutingRule
from dicom_node.dicom.meta import dataset_offset
from dicom_node.dicom.parse import InstanceHeader, parse_instance
from dicom_node.errors import SeriesRefused
from dicom_node.learning.device import resolve_device
from dicom_node.learning.inference import SegmentationResult
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import SegmentationNetwork
from dicom_node.learning.volume_inference import segment_any
from dicom_node.pipeline.domain import DomainVerdict, check_domain
from dicom_node.pipeline.export import queue_export
from dicom_node.pipeline.flow import InferencePayload, JobKind, QualityPayload, enqueue
from dicom_node.pipeline.model_sources import ModelRegistry, UnknownModel
from dicom_node.pipeline.quality_job import QualityInputs
from dicom_node.pipeline.seg import SegAlgorithm, SegmentSpec, build_seg
from dicom_node.pipeline.seg_template import SegTemplate, TemplateMismatch
from dicom_node.pipeline.stage import SeriesStage
from dicom_node.pipeline.volume import Volume, build_volume
from dicom_node.prometheus import OUT_OF_DOMAIN_EVENT
from dicom_node.store.db import Database
from dicom_node.store.files import InstanceFiles
from dicom_node.store.instances import InstanceStore, Peer
from dicom_node.store.jobs import ClaimedJob, JobQueue
from dicom_node.store.models import (
    Instance,
    Segmentation,
    Series,
    SeriesState,
)

LOGGER = logging.getLogger(__name__)


# Display colours (RGB) by label value; stable across generations.
_PALETTE = [(177, 122, 101), (221, 130, 101), (157, 108, 162), (185, 102, 83),
            (212, 126, 151), (144, 238, 144), (111, 184, 210), (250, 250, 210)]


def segment_specs(config: ModelConfig, *, include_pending: bool = False) -> list[SegmentSpec]:
    """One SEG segment per model label, coded as the model's config says.

    Labels of pending added heads (no trained weights yet) are left out of what the
    node writes; ``include_pending`` keeps them, to read corrections that add them.
    """
    specs = []
    labels = config.labels if include_pending else config.active_labels
    for label in sorted(labels, key=lambda lab: lab.value):
        prop = Code(label.code, label.scheme, label.meaning)
        rgb = _PALETTE[(label.value - 1) % len(_PALETTE)]
        specs.append(SegmentSpec.from_rgb(label.value, label.name,
                                          codes.SCT.AnatomicalStructure, prop, rgb))
    return specs


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a burst of object creation.

    Reading a series (10^4 data elements) and building its SEG (10^5: one functional
    group item per frame) create objects that all stay alive until the job ends, so
    the generational collector's full passes find nothing while costing more than the
    work itself (measured: SEG build 0.6-0.97 s collected, 0.26 s paused). Reference
    counting still frees everything; collection resumes, and catches up, afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _prepare_template(
    volume: Volume, specs: list[SegmentSpec], algorithm: SegAlgorithm
) -> SegTemplate:
    with collector_paused():
        return SegTemplate.prepare(volume, specs, algorithm)


def _encode(template: Future[SegTemplate], volume: Volume, labels: np.ndarray,
            specs: list[SegmentSpec], algorithm: SegAlgorithm,
            series_description: str | None = None) -> tuple[bytes, str]:
    """The SEG's Part 10 bytes and transfer syntax: the template filled in, or, should
    the template not fit (a highdicom that writes differently) or the SEG need another
    ``series_description`` than the template's, the SEG built whole."""
    if series_description is None:
        try:
            prepared = template.result()
            return prepared.fill(labels), prepared.transfer_syntax_uid
        except TemplateMismatch as exc:
            LOGGER.warning("SEG template unusable (%s); encoding the SEG whole", exc)
    with collector_paused():
        seg = build_seg(volume, labels, specs, algorithm,
                        series_description=series_description)
        buffer = io.BytesIO()
        seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), str(seg.file_meta.TransferSyntaxUID)


@dataclass(frozen=True)
class EncodedSeg:
    """The model's result for a series and its SEG, encoded (``syntax``: its transfer
    syntax)."""

    data: bytes
    syntax: str
    result: SegmentationResult
    domain: DomainVerdict


def _series_state(series_uid: str, state: SeriesState, reason: str | None) -> Update:
    """The statement that sets a series' state, for the caller's transaction."""
    return update(Series).where(Series.series_uid == series_uid).values(
        state=state, state_reason=reason)


class SegmentationJob(SeriesStage):
    """Job handler for ``inference`` jobs queued by segment rules."""

    kinds: tuple[JobKind, ...] = (JobKind.INFERENCE,)

    def __init__(self, db: Database, files: InstanceFiles, store: InstanceStore,
                 queue: JobQueue, data_dir: Path, models: ModelRegistry, *,
                 inference: InferenceSettings, dicom: DicomSettings,
                 rules: Sequence[RoutingRule], export_attempts: int) -> None:
        """``dicom``: the node's own AE title and instance size limit (the SEG is stored
        like a received instance); ``rules``: for their ``out_of_domain`` action."""
        super().__init__(db, files, store, queue, data_dir, models)
        self.inference = inference
        self.dicom = dicom
        self.rules = tuple(rules)
        self.export_attempts = export_attempts
        self.quality = QualityInputs(data_dir)

    def run(self, job: ClaimedJob, heartbeat: Callable[[], None]) -> None:
        """Series -> volume -> model -> DICOM-SEG, stored like any instance, then its
        export and quality metrics queued."""
        payload = InferencePayload.of(job)
        series_uid, destinations = payload.series_uid, list(payload.destinations)
        try:
            model, mconfig = self.models.get(payload.model)
        except UnknownModel as exc:  # retrying cannot help: refused, with the reason
            self._refuse(series_uid, f"rule {payload.rule!r}: {exc}")
            return
        hold = self._holds_out_of_domain(payload.rule)  # the rule's out_of_domain action
        existing = self._existing(series_uid, mconfig)
        revision = 0
        if existing is not None:
            revision = self._revision(series_uid, existing)
            if not revision:
                self._requeue(series_uid, mconfig, existing, hold, destinations)
                return

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        read = self._read_volume(series_uid, mconfig)
        if read is None:
            return
        volume, instances = read
        timings["volume_s"] = time.perf_counter() - t0
        heartbeat()
        seg = self._segment(series_uid, model, mconfig, volume, hold, heartbeat,
                            timings, revision)
        header = self._store_seg(seg, timings)
        # Quality metrics feed monitoring, not the SEG: their own job, after delivery.
        # Their inputs are kept before the row, so a retry after a crash finds them.
        result = seg.result
        self.quality.save(header.sop_instance_uid, result.labels, result.confidence,
                          result.entropy, result.spacing, mconfig.label_values)
        self._record(series_uid, mconfig, header, seg.domain, timings,
                     {"source_instances": instances, "revision": revision}, hold)
        if not seg.domain.in_domain and hold:
            destinations = []  # held back: the SEG is stored, status says why
        self._export(header.series_uid, header.sop_instance_uid, destinations, quality=True)
        LOGGER.info("series %s segmented by %s gen %d: %d slices in %.2f s (inference %.2f s)",
                    series_uid, mconfig.name, mconfig.generation, volume.shape[0],
                    time.perf_counter() - t0, timings["inference_s"])

    def _read_volume(self, series_uid: str, mconfig: ModelConfig
                     ) -> tuple[Volume, int] | None:
        """The series as one volume, with the number of instances it was read from;
        None (and the series refused) if it cannot be."""
        with self.db.session() as s:
            paths = list(s.execute(select(Instance.path).join(Series).where(
                Series.series_uid == series_uid)).scalars())
        try:
            with collector_paused():
                datasets = [pydicom.dcmread(self.files.absolute(p)) for p in paths]
                return build_volume(
                    datasets, allowed_modalities={mconfig.preprocessing.modality.value}
                ), len(paths)
        except SeriesRefused as exc:
            self._refuse(series_uid, str(exc))
            return None

    def _segment(self, series_uid: str, model: SegmentationNetwork, mconfig: ModelConfig,
                 volume: Volume, hold: bool, heartbeat: Callable[[], None],
                 timings: dict[str, float], revision: int = 0) -> EncodedSeg:
        """Run the model and encode its SEG; the SEG's template is built while it runs."""
        specs = segment_specs(mconfig)
        algorithm = SegAlgorithm(mconfig.name, mconfig.generation, revision=revision)
        with ThreadPoolExecutor(1, thread_name_prefix="seg-template") as pool:
            # The SEG is encoded while the model runs; only its pixels wait for it.
            template = pool.submit(_prepare_template, volume, specs, algorithm)
            t1 = time.perf_counter()
            result = segment_any(model, mconfig, volume.pixels.astype(np.float32),
                                 volume.spacing, affine=volume.affine,
                                 device=resolve_device(self.inference.device),
                                 amp=self.inference.amp)
            timings["inference_s"] = time.perf_counter() - t1
            heartbeat()
            domain = check_domain(result.labels, volume.spacing, mconfig.label_values,
                                  self.inference.min_structure_fraction)
            if not domain.in_domain:
                LOGGER.warning("series %s: %s gen %d: %s (SEG marked%s)", series_uid,
                               mconfig.name, mconfig.generation, domain.reason,
                               ", held back" if hold else "")
            t2 = time.perf_counter()
            data, syntax = _encode(template, volume, result.labels, specs, algorithm,
                                   None if domain.in_domain else
                                   f"OUT OF DOMAIN? SEG {mconfig.name} gen {mconfig.generation}")
        timings["encode_s"] = time.perf_counter() - t2
        return EncodedSeg(data, syntax, result, domain)

    def _store_seg(self, seg: EncodedSeg, timings: dict[str, float]) -> InstanceHeader:
        """Store the SEG as an instance of this node (once: a retry finds the first)."""
        t3 = time.perf_counter()
        header = parse_instance(
            seg.data[dataset_offset(seg.data):], transfer_syntax_uid=seg.syntax,
            context_sop_class_uid=None, command_sop_instance_uid=None,
            max_bytes=int(self.dicom.max_instance_mb * 1024 * 1024))
        # A worker that died after storing the SEG but before recording it left the
        # same object (same UIDs) behind: keep that one, never a second copy.
        with self.db.session() as s:
            stored = s.execute(select(Instance.id).where(
                Instance.sop_instance_uid == header.sop_instance_uid)).first()
        if stored is None:
            self.store.ingest(seg.data, header, Peer(ae_title=self.dicom.ae_title),
                              produced_here=True)
        timings["store_s"] = time.perf_counter() - t3
        return header

    def _record(self, series_uid: str, mconfig: ModelConfig, header: InstanceHeader,
                domain: DomainVerdict, timings: dict[str, float],
                coverage: dict[str, int], hold: bool) -> None:
        """The segmentation's row (a revision replaces the row of the SEG it supersedes:
        one per series, model and generation), with the out-of-domain event when there is
        one: a retry after a crash records both or neither, never a second event."""
        metrics = {"domain": domain.to_json(), **coverage}
        with self.db.session() as s:
            if not domain.in_domain:
                action = "hold" if hold else "send"
                self.store.audit(OUT_OF_DOMAIN_EVENT, f"{mconfig.name} gen "
                                 f"{mconfig.generation}: {domain.reason} ({action})",
                                 series_uid=series_uid, session=s)
            row = s.execute(select(Segmentation).where(
                Segmentation.series_uid == series_uid,
                Segmentation.model_name == mconfig.name,
                Segmentation.generation == mconfig.generation)).scalar_one_or_none()
            if row is None:
                s.add(Segmentation(
                    series_uid=series_uid, model_name=mconfig.name,
                    generation=mconfig.generation, seg_series_uid=header.series_uid,
                    seg_sop_instance_uid=header.sop_instance_uid, metrics=metrics,
                    timings=timings, created_at=datetime.now(UTC)))
            else:
                row.seg_series_uid, row.seg_sop_instance_uid = (header.series_uid,
                                                                header.sop_instance_uid)
                row.metrics, row.timings = metrics, timings
                row.created_at = datetime.now(UTC)
            s.execute(_series_state(series_uid, SeriesState.SEGMENTED, None))

    def _requeue(self, series_uid: str, mconfig: ModelConfig, existing: Segmentation,
                 hold: bool, destinations: list[str]) -> None:
        """The series is segmented already (sent again, or a retry after a crash between
        the row and its export): queue what the first run would have, no more. A SEG held
        back as out of domain stays held; its quality metrics are queued while their
        inputs are still on disk."""
        domain = (existing.metrics or {}).get("domain") or {}
        held = domain.get("in_domain") is False and hold
        LOGGER.info("series %s already segmented by %s gen %d; %s", series_uid, mconfig.name,
                    mconfig.generation, "its SEG stays held back" if held
                    else "re-queueing export")
        uid = existing.seg_sop_instance_uid
        self._export(existing.seg_series_uid, uid, [] if held else destinations,
                     quality=self.quality.path(uid).exists())
        self._set_state(series_uid, SeriesState.SEGMENTED, None)

    def _holds_out_of_domain(self, rule_name: str) -> bool:
        rule = next((r for r in self.rules if r.name == rule_name), None)
        return rule is not None and rule.out_of_domain == "hold"

    def on_dead(self, job: ClaimedJob, error: str, s: Session) -> None:
        s.execute(_series_state(InferencePayload.of(job).series_uid, SeriesState.FAILED, error))

    def _revision(self, series_uid: str, existing: Segmentation) -> int:
        """0 when ``existing`` covers the series as it is now; else the next revision (the
        series gained instances since). A row from before coverage was recorded counts as
        covering the series."""
        metrics = existing.metrics or {}
        covered = int(metrics.get("source_instances") or 0)
        with self.db.session() as s:
            now = s.execute(select(func.count(Instance.id)).join(Series).where(
                Series.series_uid == series_uid)).scalar_one()
        if not covered or now <= covered:
            return 0
        revision = int(metrics.get("revision") or 0) + 1
        LOGGER.warning("series %s gained %d instance(s) since its SEG by %s gen %d was made "
                       "from %d: segmented again (revision %d)", series_uid, now - covered,
                       existing.model_name, existing.generation, covered, revision)
        return revision

    def _existing(self, series_uid: str, mconfig: ModelConfig) -> Segmentation | None:
        with self.db.session() as s:
            return s.execute(select(Segmentation).where(
                Segmentation.series_uid == series_uid,
                Segmentation.model_name == mconfig.name,
                Segmentation.generation == mconfig.generation)).scalar_one_or_none()

    def _export(self, seg_series_uid: str, seg_sop_uid: str, destinations: list[str], *,
                quality: bool = False) -> None:
        """Queue the SEG's delivery (and, for a SEG just made, its quality metrics) in
        one transaction."""
        with self.db.session() as s:
            for dest in destinations:
                queue_export(s, self.queue, seg_series_uid, dest, [seg_sop_uid],
                             self.export_attempts)
            if quality:
                enqueue(self.queue, QualityPayload(seg_sop_uid), session=s)

    def _refuse(self, series_uid: str, reason: str) -> None:
        LOGGER.warning("series %s refused: %s", series_uid, reason)
        with self.db.session() as s:  # the state and its event commit together
            self.store.audit("series-refused", reason, series_uid=series_uid, session=s)
            s.execute(_series_state(series_uid, SeriesState.REFUSED, reason))

    def _set_state(self, series_uid: str, state: SeriesState, reason: str | None) -> None:
        with self.db.session() as s:
            s.execute(_series_state(series_uid, state, reason))
