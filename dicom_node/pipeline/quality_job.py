"""Quality metrics of a SEG the node made: their own job, after the SEG's delivery.

The figures (volumes, components, confidence, entropy: :func:`quality_metrics`) feed
monitoring and the hub's quality model, not the SEG, and cost about 0.5-1 s of CPU.
The inference job leaves what they need beside the instance store
(``<data_dir>/quality/<SEG SOP Instance UID>.npz``: the label map, and the confidence
and per-head entropy of its foreground voxels) and queues a ``quality-metrics`` job in
the transaction that queues the SEG's export. While the SEG's first delivery attempt
has not ended, the job is deferred (:class:`~dicom_node.worker.JobDeferred`: its
worker is free, the attempt not counted), so the metrics never compete with the
delivery a radiologist waits for; at most ``[export] connect_timeout_s`` after the SEG
was made it runs anyway.

The inputs are monitoring data, written without fsync: after a crash that lost them the
job records why on the segmentation (``metrics["quality"]``) and ends.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.learning.scores import quality_metrics
from dicom_node.pipeline.flow import JobKind, QualityPayload
from dicom_node.store.db import Database, after_commit
from dicom_node.store.durable import write_atomic
from dicom_node.store.files import uid_file_stem
from dicom_node.store.jobs import ClaimedJob
from dicom_node.store.models import OutboxItem, OutboxState, Segmentation
from dicom_node.worker import JobDeferred

__all__ = ["QUALITY_DIR", "QualityInputs", "QualityJob"]

LOGGER = logging.getLogger(__name__)
QUALITY_DIR = "quality"
RECHECK_S = 0.1  # how soon a deferred job looks at the delivery again


class QualityInputs:
    """What :func:`quality_metrics` reads of an inference result, kept as one file."""

    def __init__(self, data_dir: Path) -> None:
        self.folder = data_dir / QUALITY_DIR

    def path(self, seg_sop_instance_uid: str) -> Path:
        return self.folder / f"{uid_file_stem(seg_sop_instance_uid)}.npz"

    def save(self, seg_sop_instance_uid: str, labels: np.ndarray, confidence: np.ndarray,
             entropy: Mapping[str, np.ndarray], spacing: tuple[float, float, float],
             names: Mapping[str, int]) -> None:
        foreground = labels > 0  # every metric reads confidence and entropy only here
        arrays = {"labels": labels, "confidence": confidence[foreground],
                  **{f"entropy.{head}": ent[foreground] for head, ent in entropy.items()}}
        meta = {"spacing": list(spacing), "names": dict(names), "heads": list(entropy)}
        write_atomic(self.path(seg_sop_instance_uid), _npz(arrays, meta), durable=False,
                     root=self.folder.parent)

    def metrics(self, seg_sop_instance_uid: str) -> dict[str, float]:
        with np.load(self.path(seg_sop_instance_uid), allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            labels = data["labels"]
            foreground = labels > 0

            def full(values: np.ndarray) -> np.ndarray:
                out = np.zeros(labels.shape, dtype=values.dtype)
                out[foreground] = values
                return out

            entropy = {head: full(data[f"entropy.{head}"]) for head in meta["heads"]}
            return quality_metrics(labels, full(data["confidence"]), entropy,
                                   tuple(meta["spacing"]), meta["names"])

    def remove(self, seg_sop_instance_uid: str) -> None:
        self.path(seg_sop_instance_uid).unlink(missing_ok=True)


def _npz(arrays: Mapping[str, np.ndarray], meta: Mapping[str, object]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


class QualityJob:
    """Handles ``quality-metrics`` jobs: the figures onto the segmentation's row."""

    kinds: tuple[JobKind, ...] = (JobKind.QUALITY,)

    def __init__(self, db: Database, inputs: QualityInputs, *,
                 delivery_wait_s: float) -> None:
        self.db = db
        self.inputs = inputs
        self.delivery_wait_s = delivery_wait_s

    def run(self, job: ClaimedJob, heartbeat: Callable[[], None]) -> None:
        uid = QualityPayload.of(job).seg_sop_instance_uid
        with self.db.session() as s:
            seg = s.execute(select(Segmentation).where(
                Segmentation.seg_sop_instance_uid == uid)).scalar_one_or_none()
            if seg is None:
                LOGGER.warning("quality metrics: no segmentation %s; nothing to do", uid)
                self.inputs.remove(uid)
                return
            if "metrics_s" in (seg.timings or {}):  # a second job of this SEG: done
                self.inputs.remove(uid)
                return
            if self._delivery_pending(s, uid, seg.created_at):
                raise JobDeferred(RECHECK_S)
        started = time.perf_counter()
        try:
            metrics: dict[str, object] = dict(self.inputs.metrics(uid))
        except FileNotFoundError:
            LOGGER.warning("quality metrics of SEG %s: its inputs are gone (a crash before "
                           "they were written?); recorded as unavailable", uid)
            metrics = {"quality": "inputs lost"}
        elapsed = time.perf_counter() - started
        with self.db.session() as s:
            seg = s.execute(select(Segmentation).where(
                Segmentation.seg_sop_instance_uid == uid)).scalar_one()
            seg.metrics = {**metrics, **(seg.metrics or {})}
            seg.timings = {**(seg.timings or {}), "metrics_s": elapsed}
        self.inputs.remove(uid)

    def _delivery_pending(self, s: Session, uid: str, created_at: datetime) -> bool:
        """The SEG's first delivery attempt to some destination has not ended, and the
        wait has not run out."""
        if datetime.now(UTC) - created_at > timedelta(seconds=self.delivery_wait_s):
            return False
        return bool(s.scalar(
            select(func.count()).select_from(OutboxItem).where(
                OutboxItem.sop_instance_uid == uid,
                OutboxItem.state == OutboxState.PENDING, OutboxItem.attempts == 0)))

    def on_dead(self, job: ClaimedJob, error: str, s: Session) -> None:
        # Once the job is dead for good: were that commit lost, a retry needs them.
        uid = QualityPayload.of(job).seg_sop_instance_uid
        after_commit(s, lambda: self.inputs.remove(uid))
