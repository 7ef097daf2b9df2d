"""Train a starter model from phantom subjects of one site and score it on held-out ones.

``BootstrapPlan.data`` picks the phantom source (:mod:`~dicom_node.learning.bootstrap_data`):
``ct`` makes the shipped abdomen starter, ``mr`` the MR head model each node builds.
Training subjects are indexes ``0..subjects-1`` of ``(site, seed)``; held-out subjects
are the next ``held_out`` indexes, whose anatomy and noise the training never saw.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dicom_node.errors import DicomNodeError
from dicom_node.learning.bootstrap_data import BootstrapData, source
from dicom_node.learning.errors import LearningError
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import MultiHeadNetwork, SegmentationNetwork, build_model
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.scores import dice_per_label
from dicom_node.learning.slices import SliceSample, samples_from_volume
from dicom_node.learning.training import ProgressHook, TrainingReport, train
from dicom_node.learning.weights import save_model

LOGGER = logging.getLogger(__name__)

STARTER_DIR = Path(__file__).resolve().parent / "starter"
# The starter's heads on a 2D MONAI UNet encoder (dicom_node.learning.monai_heads): the
# shipped starter's architecture. It scored as well as our own U-Net at sites A and B
# and better at C and D, in less time (README, "A MONAI network with heads").
MONAI_HEADS_ARCH = "unet2d-monai"
# Our own multi-head 2D U-Net: kept to serve and train the models already built with it.
UNET_ARCH = "unet2d"
TWO_D_ARCHES = (MONAI_HEADS_ARCH, UNET_ARCH)


@dataclass(frozen=True)
class BootstrapPlan:
    """``arch``: ``unet2d-monai`` (the shipped starter: heads on a 2D MONAI UNet
    encoder), ``unet2d`` (our multi-head 2D U-Net, which earlier starters used) or a 3D
    MONAI network for CT (:data:`~dicom_node.learning.bootstrap_3d.ARCHITECTURES`)."""

    data: str = "ct"
    arch: str = MONAI_HEADS_ARCH
    site: str = "A"
    subjects: int = 16
    held_out: int = 3
    seed: int = 0
    time_budget_s: float = 420.0
    input_size: int = 128
    epochs: int = 12
    batch_size: int = 8
    learning_rate: float = 2e-3
    device: str = "cpu"


@dataclass(frozen=True)
class BootstrapResult:
    model: SegmentationNetwork
    config: ModelConfig
    report: TrainingReport
    held_out_dice: dict[str, float]
    per_subject_dice: tuple[dict[str, float], ...]
    seconds: float
    path: Path | None


def collect_samples(
    config: ModelConfig,
    site: str,
    indexes: Sequence[int],
    seed: int,
    body_only_fraction: float = 0.35,
    data: BootstrapData | None = None,
) -> list[SliceSample]:
    """Fully annotated slices: all that show a structure, some of the others.

    A structure is a non-enclosing label (an organ, not the body). Slices without one
    are easy; keeping a fraction of them spends the time budget where the model still
    has something to learn, while it still sees the structure-free ends. A model with
    an enclosing label draws that fraction from the slices the enclosing label shows
    (the body); one without, from all the others (the head's ends beyond the brain).
    """
    data = data or source("ct")
    annotated = [lab.name for lab in config.labels]
    structures = np.array([lab.value for lab in config.labels if not lab.enclosing])
    has_enclosing = any(lab.enclosing for lab in config.labels)
    samples: list[SliceSample] = []
    rng = np.random.default_rng(seed)
    for i in indexes:
        subject = data.subject(site, i, seed)
        keep = [
            k
            for k in range(subject.labels.shape[0])
            if np.isin(subject.labels[k], structures).any()
            or ((subject.labels[k].any() or not has_enclosing)
                and rng.random() < body_only_fraction)
        ]
        samples += samples_from_volume(subject.image, subject.labels, annotated, config, keep)
    return samples


def evaluate(
    model: SegmentationNetwork,
    config: ModelConfig,
    site: str,
    indexes: Sequence[int],
    seed: int,
    device: str = "cpu",
    data: BootstrapData | None = None,
) -> tuple[dict[str, float], tuple[dict[str, float], ...]]:
    """3D Dice per label on fresh phantom subjects: ``(mean per label, per subject)``."""
    from dicom_node.learning.volume_inference import segment_any  # MONAI: see bootstrap()

    data = data or source("ct")
    per_subject = []
    for i in indexes:
        subject = data.subject(site, i, seed)
        result = segment_any(model, config, subject.image, subject.spacing, device=device)
        per_subject.append(dice_per_label(result.labels, subject.labels, config.label_values))
    mean = {name: float(np.mean([d[name] for d in per_subject])) for name in config.label_values}
    mean["mean"] = float(np.mean(list(mean.values())))
    return mean, tuple(per_subject)


def _train_2d(plan: BootstrapPlan, data: BootstrapData, say: Callable[[str], None],
              progress: ProgressHook | None
              ) -> tuple[MultiHeadNetwork, ModelConfig, TrainingReport]:
    """A 2D network with heads (``plan.arch``) on slices of the phantom subjects."""
    config = data.config(plan.input_size)
    if plan.arch == MONAI_HEADS_ARCH:
        from dicom_node.learning.monai_heads import with_monai_unet_encoder  # imports MONAI

        config = with_monai_unet_encoder(config)
    model = build_model(config)
    try:
        samples = collect_samples(config, plan.site, range(plan.subjects), plan.seed,
                                  data=data)
    except DicomNodeError as exc:  # the atlas package missing, say
        raise LearningError(str(exc)) from exc
    say(f"training on {len(samples)} slices (budget {plan.time_budget_s:.0f} s)")
    policy = TrainingPolicy(
        epochs=plan.epochs,
        batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        augment=True,
        time_budget_s=plan.time_budget_s,
        lr_schedule="cosine",
        device=plan.device,
        seed=plan.seed,
    )
    return model, config, train(model, config, samples, policy, progress=progress)


def bootstrap(
    plan: BootstrapPlan,
    out: Path | None = None,
    *,
    progress: ProgressHook | None = None,
    status: Callable[[str], None] | None = None,
) -> BootstrapResult:
    """Generate data, train a starter model, score it, and save it under ``out``.

    Raises
    ------
    LearningError
        Unknown ``plan.data`` or site; the MR source's Debian package is not installed
        (``AtlasNotInstalled`` is re-raised as a :class:`LearningError` naming it).
    """
    t0 = time.monotonic()
    say = status or (lambda msg: LOGGER.info("%s", msg))
    data = source(plan.data)
    data.check_site(plan.site)
    torch.manual_seed(plan.seed)
    say(f"generating {plan.subjects} phantom subjects of site {plan.site} ({data.description})")
    model: SegmentationNetwork
    if plan.arch in TWO_D_ARCHES:
        model, config, report = _train_2d(plan, data, say, progress)
    elif plan.data != "ct":
        raise LearningError(f"--arch {plan.arch} is a 3D starter for --data ct only")
    else:
        # MONAI (3 s to import) only when a 3D starter is trained: the `tessera` command
        # every node process starts through imports this module.
        from dicom_node.learning.bootstrap_3d import ct_3d_config, train_3d, volume_samples

        config = ct_3d_config(plan.arch)
        volumes = volume_samples(data, config, plan.site, range(plan.subjects), plan.seed)
        say(f"training on {len(volumes)} volumes (budget {plan.time_budget_s:.0f} s)")
        model, report = train_3d(config, volumes, learning_rate=plan.learning_rate,
                                 time_budget_s=plan.time_budget_s, seed=plan.seed,
                                 device=plan.device, progress=progress)
    say(f"scoring on {plan.held_out} held-out subjects")
    held = range(plan.subjects, plan.subjects + plan.held_out)
    mean, per_subject = evaluate(model, config, plan.site, held, plan.seed, plan.device, data)
    path = save_model(model, config, out / "model.safetensors") if out is not None else None
    return BootstrapResult(model, config, report, mean, per_subject, time.monotonic() - t0, path)
