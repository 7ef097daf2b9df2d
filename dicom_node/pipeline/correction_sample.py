"""The training sample a correction becomes: the slices it changed plus their neighbours,
cut from the source volume with the corrected labels of the structures this hospital
annotates (for the multi-head U-Net), or the whole corrected volume with its spacing and
affine (for an external network, 2D or 3D: ``learning.volume_samples``), written durably
to ``<data_dir>/samples/<SEG SOP Instance UID>.npz``; and its
place in the training set: its split (train or held out), the earlier samples of the same
series it supersedes, and whether enough samples wait to queue a training round.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.config import LearningSettings
from dicom_node.learning.incremental import cut_sample, encode_sample, with_neighbours
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.partial_labels import fill_enclosing
from dicom_node.learning.volume_samples import encode_volume_sample, volume_sample
from dicom_node.pipeline.flow import TrainingPayload, enqueue
from dicom_node.pipeline.volume import Volume
from dicom_node.store.durable import write_atomic
from dicom_node.store.files import uid_file_stem
from dicom_node.store.jobs import JobQueue
from dicom_node.store.models import Correction, SampleState, TrainingSample

LOGGER = logging.getLogger(__name__)

SAMPLES_DIR = "samples"


def write_sample(data_dir: Path, draft: Correction, volume: Volume, corrected: np.ndarray,
                 annotated: list[str], model_config: ModelConfig,
                 neighbour_slices: int) -> TrainingSample:
    """Cut and write the sample of ``draft`` (its changed slices are known); returns its
    row, not yet added to a session. The served model decides the kind: a volume sample
    for a model that trains on volumes (an external network, heads on a 3D encoder;
    ``slices`` counts the volume's), else the slice cut."""
    if model_config.trains_on_volumes:
        labels = fill_enclosing(corrected, annotated, model_config)
        data = encode_volume_sample(volume_sample(volume.pixels, labels, annotated,
                                                  volume.spacing, volume.affine))
        kept = volume.shape[0]
    else:
        keep = with_neighbours(draft.changed_slices, neighbour_slices, volume.shape[0])
        sample = cut_sample(volume.pixels.astype(np.float32), corrected, keep, annotated,
                            model_config)
        # A body segment cut around organs this hospital does not annotate leaves holes.
        sample = replace(sample, labels=fill_enclosing(sample.labels, annotated,
                                                       model_config))
        data, kept = encode_sample(sample), len(keep)
    rel = f"{SAMPLES_DIR}/{uid_file_stem(draft.seg_sop_instance_uid)}.npz"
    # Durable: the row that names it commits next, and a sample is a radiologist's work.
    write_atomic(data_dir / rel, data, durable=True)
    return TrainingSample(
        source_series_uid=draft.source_series_uid or "", model_name=draft.model_name or "",
        state=SampleState.PENDING, path=rel, slices=kept, size=len(data),
        annotated=annotated, split="train")


def sample_split(s: Session, draft: Correction, validation_every: int) -> str:
    """Every ``validation_every``-th corrected series is held out; a series keeps its split."""
    earlier = s.execute(select(Correction.split).where(
        Correction.source_series_uid == draft.source_series_uid,
        Correction.split.is_not(None)).order_by(Correction.id.desc())).scalars().first()
    if earlier:
        return earlier
    if not validation_every:
        return "train"
    n = s.execute(select(func.count(func.distinct(Correction.source_series_uid))).where(
        Correction.split.is_not(None), Correction.model_name == draft.model_name)
    ).scalar_one()
    return "validation" if (int(n) + 1) % validation_every == 0 else "train"


def supersede_samples(s: Session, source_uid: str) -> list[str]:
    """Mark the samples of series ``source_uid`` superseded; returns their files' paths."""
    rows = s.execute(select(TrainingSample).where(
        TrainingSample.source_series_uid == source_uid,
        TrainingSample.state != SampleState.SUPERSEDED)).scalars().all()
    for row in rows:
        LOGGER.info("sample %d of series %s superseded by a later correction",
                    row.id, source_uid)
        row.state = SampleState.SUPERSEDED
    return [row.path for row in rows]


def queue_training(s: Session, queue: JobQueue, settings: LearningSettings,
                   model_name: str) -> bool:
    """Queue a training round of ``model_name`` once ``train_every`` samples wait; returns
    whether one is (or already was) waiting."""
    if not settings.enabled:
        return False
    pending = s.execute(select(func.count()).select_from(TrainingSample).where(
        TrainingSample.model_name == model_name,
        TrainingSample.state == SampleState.PENDING)).scalar_one()
    if int(pending) < settings.train_every:  # autoflush counted this sample
        return False
    # A pending round will take this sample; a running one does not: the next round is
    # queued and waits for it (the queue runs one job of a kind and key at a time).
    enqueue(queue, TrainingPayload(model_name), session=s)
    return True
