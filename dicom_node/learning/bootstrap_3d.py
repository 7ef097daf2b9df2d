"""A 3D starter for CT: a small MONAI network trained on whole phantom volumes
(``tessera model bootstrap --arch segresnet|dynunet|unet3d-monai``), beside the shipped
2D starter.

The network sees the volume resampled to :data:`SPACING_MM` isotropic voxels and one CT
window (-160..240 HU: soft tissue, air below it), in :data:`ROI` windows: random
windows in training (MONAI's Dice-CE, :mod:`~dicom_node.learning.external_training`),
a sliding window with Gaussian blending at inference.

- ``segresnet``, ``dynunet``: the 2D starter's labels in one softmax (channel 0
  background), so the two compare label by label. An external model to the node:
  served and federated as the one group ``network``, trained from corrections by
  ``external_training``.
- ``unet3d-monai`` (:data:`HEADS_ARCH`): the 2D starter's heads on a 3D MONAI UNet
  encoder (:mod:`~dicom_node.learning.monai_heads`): groups ``encoder`` and
  ``heads.<name>``, trained by ``training.train`` on volume windows, so partial labels
  by head, continual heads and the hub's per-head merge apply as in 2D.

The time budget, not the epoch count, ends training (one window per subject and step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from dicom_node.learning.bootstrap_data import BootstrapData
from dicom_node.learning.errors import LearningError
from dicom_node.learning.external import NetworkSpec
from dicom_node.learning.external_training import train_external
from dicom_node.learning.model_config import ModelConfig, abdomen_ct_config, external_config
from dicom_node.learning.monai_heads import with_monai_unet_encoder
from dicom_node.learning.network import MultiHeadNetwork, SegmentationNetwork, build_network
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.preprocessing_spec import (
    IntensityStep,
    Modality,
    Preprocessing,
    VolumePreprocessing,
)
from dicom_node.learning.training import ProgressHook, TrainingReport, train
from dicom_node.learning.volume_samples import VolumeSample
from dicom_node.learning.volume_windows import prepare_volumes

__all__ = ["ARCHITECTURES", "HEADS_ARCH", "ROI", "SPACING_MM", "ct_3d_config", "train_3d",
           "volume_samples"]

SPACING_MM = 4.0
ROI = (64, 64, 64)
# --arch name -> (MONAI registry name, its arguments without out_channels)
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "segresnet": ("monai:SegResNet", {
        "spatial_dims": 3, "in_channels": 1, "init_filters": 8,
        "blocks_down": [1, 2, 2, 2], "blocks_up": [1, 1, 1]}),
    "dynunet": ("monai:DynUNet", {
        "spatial_dims": 3, "in_channels": 1, "kernel_size": [3, 3, 3, 3],
        "strides": [1, 2, 2, 2], "upsample_kernel_size": [2, 2, 2],
        "filters": [8, 16, 32, 64]}),
}
# --arch name of the starter's heads on a 3D MONAI UNet encoder
HEADS_ARCH = "unet3d-monai"


def ct_3d_config(arch: str, name: str | None = None) -> ModelConfig:
    """The configuration of the 3D CT starter ``arch`` (a key of :data:`ARCHITECTURES`).

    Raises
    ------
    LearningError
        ``arch`` is not one of them.
    """
    volume = VolumePreprocessing(spacing=(SPACING_MM,) * 3,
                                 intensity=(IntensityStep("window", -160, 240),),
                                 roi_size=ROI, overlap=0.25)
    preprocessing = Preprocessing(modality=Modality.CT, volume=volume)
    if arch == HEADS_ARCH:
        heads = replace(abdomen_ct_config(name=name or f"tessera-abdomen-ct-{arch}"),
                        preprocessing=preprocessing)
        return with_monai_unet_encoder(heads, spatial_dims=3)
    try:
        architecture, args = ARCHITECTURES[arch]
    except KeyError:
        raise LearningError(f"unknown --arch {arch!r}; known: unet2d-monai (the shipped "
                            f"starter), unet2d, {', '.join([*ARCHITECTURES, HEADS_ARCH])}"
                            ) from None
    labels = abdomen_ct_config().labels
    return external_config(
        name or f"tessera-abdomen-ct-{arch}", architecture,
        NetworkSpec({**args, "out_channels": len(labels) + 1}), labels, preprocessing)


def volume_samples(data: BootstrapData, config: ModelConfig, site: str,
                   indexes: Sequence[int], seed: int) -> list[VolumeSample]:
    """Whole phantom subjects, every label annotated."""
    annotated = frozenset(lab.name for lab in config.labels)
    samples = []
    for i in indexes:
        subject = data.subject(site, i, seed)
        samples.append(VolumeSample(subject.image, subject.labels, annotated,
                                    spacing=subject.spacing))
    return samples


def train_3d(config: ModelConfig, samples: Sequence[VolumeSample], *, learning_rate: float,
             time_budget_s: float, seed: int, device: str,
             progress: ProgressHook | None = None
             ) -> tuple[SegmentationNetwork, TrainingReport]:
    """A fresh network of ``config`` trained on ``samples`` until the budget ends it;
    ``progress`` is told of each step of a heads model (an external network's loop
    reports nothing)."""
    model = build_network(config)
    policy = TrainingPolicy(epochs=100_000, learning_rate=learning_rate, augment=False,
                            time_budget_s=time_budget_s, device=device, seed=seed)
    if isinstance(model, MultiHeadNetwork):
        return model, train(model, config, prepare_volumes(samples, config), policy,
                            progress=progress)
    return model, train_external(model, config, samples, policy)
