"""What a training round reads, shared by the trainer and the site adaptation: the
model's samples by state (pending rounds, the replay buffer, the held-out cases the
gates and the hub's federated evaluation score on), loading them, the round's policy
from ``[learning]``, and the progress hook that keeps a training job's lease.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.config import LearningSettings
from dicom_node.learning.device import resolve_device
from dicom_node.learning.evaluation import HeldOutSample, decode_any_sample
from dicom_node.learning.incremental import StoredSample, decode_sample
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.slices import SliceSample
from dicom_node.learning.training import TrainingProgress
from dicom_node.store.models import SampleState, TrainingSample

LOGGER = logging.getLogger(__name__)

HEARTBEAT_STEPS = 20  # a training job renews its lease every this many steps


def beating(beat: Callable[[], None], *hooks: Callable[[TrainingProgress], None]
            ) -> Callable[[TrainingProgress], None]:
    """A progress hook for a training job: ``hooks`` at every step, and ``beat`` (the
    job's lease heartbeat) every :data:`HEARTBEAT_STEPS` steps."""
    def hook(p: TrainingProgress) -> None:
        for each in hooks:
            each(p)
        if p.step % HEARTBEAT_STEPS == 0:
            beat()

    return hook


def policy_of(learning: LearningSettings) -> TrainingPolicy:
    """The node's round policy: ``[learning.round]`` plus what the node decides here (the
    device, its threads, the anchors' share of a batch)."""
    return learning.round.policy(num_threads=learning.threads,
                                 anchor_fraction=learning.rehearsal.anchor_fraction,
                                 device=str(resolve_device(learning.device)))


def held_out_rows(s: Session, name: str) -> list[TrainingSample]:
    """The model's held-out corrected cases (never trained on), oldest first: what the
    node's acceptance gate scores a candidate on, and what it answers the hub's
    federated evaluation tasks with."""
    return list(s.execute(select(TrainingSample).where(
        TrainingSample.model_name == name, TrainingSample.state == SampleState.HELD_OUT
    ).order_by(TrainingSample.id)).scalars())


def trained_rows(s: Session, name: str) -> list[TrainingSample]:
    """The model's replay buffer: samples trained on and not evicted, newest first."""
    return list(s.execute(select(TrainingSample).where(
        TrainingSample.model_name == name, TrainingSample.state == SampleState.TRAINED
    ).order_by(TrainingSample.id.desc())).scalars())


def load_sample(data_dir: Path, row: TrainingSample) -> StoredSample:
    return decode_sample((data_dir / row.path).read_bytes())


def load_held_out(data_dir: Path, row: TrainingSample) -> HeldOutSample:
    """A held-out case of either kind: slices (multi-head U-Net) or a whole volume
    (external network)."""
    return decode_any_sample((data_dir / row.path).read_bytes())


def replay_slices(data_dir: Path, rows: list[TrainingSample], budget: int) -> list[SliceSample]:
    """The slices of ``rows`` (newest first) within ``budget`` slices; an unreadable
    sample is skipped with a warning."""
    out: list[SliceSample] = []
    for row in rows:
        if len(out) + row.slices > budget:
            continue
        try:
            out += load_sample(data_dir, row).slice_samples()
        except OSError as exc:
            LOGGER.warning("replay sample %d unreadable: %s", row.id, exc)
    return out
