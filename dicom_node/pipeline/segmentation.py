"""The inference job: series -> volume -> model -> DICOM-SEG -> store -> outbox.

Idempotent: the SEG's UIDs are derived from (series, model, generation), and a
series already segmented by that generation is only re-queued for export.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from sqlalchemy import select, update

from dicom_node.config import NodeConfig
from dicom_node.dicom.meta import dataset_offset
from dicom_node.dicom.parse import parse_instance
from dicom_node.errors import SeriesRefused
from dicom_node.learning.inference import segment_volume
from dicom_node.learning.metrics import quality_metrics
from dicom_node.learning.model_config import ModelConfig
from dicom_node.pipeline.export import queue_export
from dicom_node.pipeline.models import ModelRegistry
from dicom_node.pipeline.seg import SegAlgorithm, SegmentSpec, build_seg
from dicom_node.pipeline.volume import build_volume
from dicom_node.store.db import Database
from dicom_node.store.files import InstanceFiles
from dicom_node.store.instances import InstanceStore, Peer
from dicom_node.store.jobs import ClaimedJob, JobQueue
from dicom_node.store.models import Instance, Segmentation, Series, SeriesState

LOGGER = logging.getLogger(__name__)

INFERENCE = "inference"

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


class SegmentationJob:
    """Job handler for ``inference`` jobs queued by segment rules."""

    kinds = (INFERENCE,)

    def __init__(self, db: Database, files: InstanceFiles, store: InstanceStore,
                 queue: JobQueue, config: NodeConfig, models: ModelRegistry) -> None:
        self.db = db
        self.files = files
        self.store = store
        self.queue = queue
        self.config = config
        self.models = models

    def run(self, job: ClaimedJob, heartbeat: Callable[[], None]) -> None:
        series_uid = job.payload["series_uid"]
        destinations = list(job.payload.get("destinations", []))
        model, mconfig = self.models.get(job.payload["model"])
        existing = self._existing(series_uid, mconfig)
        if existing is not None:
            LOGGER.info("series %s already segmented by %s gen %d; re-queueing export",
                        series_uid, mconfig.name, mconfig.generation)
            self._export(existing.seg_series_uid, existing.seg_sop_instance_uid, destinations)
            self._set_state(series_uid, SeriesState.SEGMENTED, None)
            return

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        with self.db.session() as s:
            paths = list(s.execute(select(Instance.path).join(Series).where(
                Series.series_uid == series_uid)).scalars())
        try:
            datasets = [pydicom.dcmread(self.files.absolute(p)) for p in paths]
            volume = build_volume(datasets,
                                  allowed_modalities={mconfig.preprocessing.modality.value})
        except SeriesRefused as exc:
            self._refuse(series_uid, str(exc))
            return
        timings["volume_s"] = time.perf_counter() - t0
        heartbeat()

        t1 = time.perf_counter()
        result = segment_volume(model, mconfig, volume.pixels.astype(np.float32),
                                volume.spacing)
        timings["inference_s"] = time.perf_counter() - t1
        heartbeat()

        t2 = time.perf_counter()
        seg = build_seg(volume, result.labels, segment_specs(mconfig),
                        SegAlgorithm(mconfig.name, mconfig.generation))
        buffer = io.BytesIO()
        seg.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        timings["encode_s"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        header = parse_instance(
            data[dataset_offset(data):], transfer_syntax_uid=str(seg.file_meta.TransferSyntaxUID),
            context_sop_class_uid=None, command_sop_instance_uid=None,
            max_bytes=int(self.config.dicom.max_instance_mb * 1024 * 1024))
        # A worker that died after storing the SEG but before recording it left the
        # same object (same UIDs) behind: keep that one, never a second copy.
        with self.db.session() as s:
            stored = s.execute(select(Instance.id).where(
                Instance.sop_instance_uid == header.sop_instance_uid)).first()
        if stored is None:
            self.store.ingest(data, header, Peer(ae_title=self.config.dicom.ae_title),
                              produced_here=True)
        timings["store_s"] = time.perf_counter() - t3
        with self.db.session() as s:
            s.add(Segmentation(
                series_uid=series_uid, model_name=mconfig.name, generation=mconfig.generation,
                seg_series_uid=header.series_uid, seg_sop_instance_uid=header.sop_instance_uid,
                metrics={}, timings=timings, created_at=datetime.now(UTC)))
        self._export(header.series_uid, header.sop_instance_uid, destinations)
        # Quality metrics feed monitoring, not the SEG: computed once it is on its way.
        t4 = time.perf_counter()
        metrics = quality_metrics(result.labels, result.confidence, result.entropy,
                                  result.spacing, mconfig.label_values)
        timings["metrics_s"] = time.perf_counter() - t4
        with self.db.session() as s:
            s.execute(update(Segmentation).where(
                Segmentation.seg_sop_instance_uid == header.sop_instance_uid,
            ).values(metrics=metrics, timings=timings))
        self._set_state(series_uid, SeriesState.SEGMENTED, None)
        LOGGER.info("series %s segmented by %s gen %d: %d slices in %.2f s (inference %.2f s)",
                    series_uid, mconfig.name, mconfig.generation, volume.shape[0],
                    time.perf_counter() - t0, timings["inference_s"])

    def on_dead(self, job: ClaimedJob, error: str) -> None:
        self._set_state(job.payload["series_uid"], SeriesState.FAILED, error)

    def _existing(self, series_uid: str, mconfig: ModelConfig) -> Segmentation | None:
        with self.db.session() as s:
            return s.execute(select(Segmentation).where(
                Segmentation.series_uid == series_uid,
                Segmentation.model_name == mconfig.name,
                Segmentation.generation == mconfig.generation)).scalar_one_or_none()

    def _export(self, seg_series_uid: str, seg_sop_uid: str, destinations: list[str]) -> None:
        with self.db.session() as s:
            for dest in destinations:
                queue_export(s, self.queue, seg_series_uid, dest, [seg_sop_uid],
                             self.config.export.max_attempts)

    def _refuse(self, series_uid: str, reason: str) -> None:
        LOGGER.warning("series %s refused: %s", series_uid, reason)
        self._set_state(series_uid, SeriesState.REFUSED, reason)
        self.store.audit("series-refused", reason, series_uid=series_uid)

    def _set_state(self, series_uid: str, state: SeriesState, reason: str | None) -> None:
        with self.db.session() as s:
            s.execute(update(Series).where(Series.series_uid == series_uid)
                      .values(state=state, state_reason=reason))
