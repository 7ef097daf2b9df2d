"""Heads on a 3D MONAI encoder (``monai-heads:UNet`` with ``spatial_dims`` 3): what works
per head in 2D (groups, partial labels by head, a continual head on the frozen encoder)
works on volume windows, and the sliding-window inferer combines the heads."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from dicom_node.learning.bootstrap_3d import train_3d
from dicom_node.learning.continual import after_round, continual_policy, head_groups_changed
from dicom_node.learning.errors import ModelConfigError, TrainingError
from dicom_node.learning.label_specs import HeadSpec
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.monai_heads import MonaiMultiHead, with_monai_unet_encoder
from dicom_node.learning.network import build_model
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.preprocessing_spec import (
    IntensityStep,
    Modality,
    Preprocessing,
    VolumePreprocessing,
)
from dicom_node.learning.scores import dice_per_label
from dicom_node.learning.slices import samples_from_volume
from dicom_node.learning.training import TrainingProgress, train
from dicom_node.learning.volume_inference import segment_any
from dicom_node.learning.volume_samples import VolumeSample
from dicom_node.learning.volume_windows import prepare_volumes
from dicom_node.learning.weights import group_of, model_from_bytes, model_to_bytes

from .conftest import toy_volume

ROI = (16, 32, 32)
KIDNEYS = HeadSpec("kidneys", ("kidney_left", "kidney_right"))


@pytest.fixture
def config_3d(tiny_config: ModelConfig) -> ModelConfig:
    """The tiny config's heads on a small 3D MONAI UNet: volumes at their own grid, one
    CT window, 16x32x32 windows."""
    volume = VolumePreprocessing(intensity=(IntensityStep("window", -160, 240),),
                                 roi_size=ROI, overlap=0.25)
    config = replace(tiny_config, preprocessing=Preprocessing(modality=Modality.CT,
                                                              volume=volume))
    return with_monai_unet_encoder(config, features=8, channels=(8, 16), spatial_dims=3)


def _volume(annotated: set[str], seed: int = 0) -> VolumeSample:
    image, labels = toy_volume(seed, slices=16, rows=32, cols=32)
    return VolumeSample(image, labels, frozenset(annotated))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed_groups(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return head_groups_changed(before, model.state_dict())


def test_a_3d_encoder_has_the_same_groups_and_3d_heads(config_3d: ModelConfig) -> None:
    model = build_model(config_3d)
    assert isinstance(model, MonaiMultiHead) and config_3d.spatial_dims == 3
    assert {group_of(n) for n in model.state_dict()} == {
        "encoder", *(f"heads.{h}" for h in config_3d.head_names)}
    out = model(torch.zeros(1, 1, *ROI), ["liver", "kidneys"])
    assert out["liver"].shape == (1, 2, *ROI) and out["kidneys"].shape == (1, 3, *ROI)
    again, read = model_from_bytes(model_to_bytes(model, config_3d))
    assert read == config_3d and isinstance(again, MonaiMultiHead)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_3d_encoder_needs_a_volume_preprocessing_and_one_channel(
        config_3d: ModelConfig) -> None:
    with pytest.raises(ModelConfigError, match=r"preprocessing\.volume is required"):
        replace(config_3d, preprocessing=Preprocessing())
    data = config_3d.to_dict()
    data["network"]["args"]["in_channels"] = 2
    with pytest.raises(ModelConfigError, match="3D networks take 1 channel"):
        ModelConfig.from_dict(data)


def test_a_liver_only_volume_trains_the_encoder_and_the_liver_head_only(
        config_3d: ModelConfig) -> None:
    model = build_model(config_3d)
    before = _state(model)
    report = train(model, config_3d, prepare_volumes([_volume({"liver"})], config_3d),
                   TrainingPolicy(epochs=2, augment=False, seed=1))
    assert report.trained_heads == ("liver",) and report.steps == 2
    assert _changed_groups(before, model) == {"encoder", "heads.liver"}


def test_an_added_head_trains_alone_on_the_frozen_3d_encoder(config_3d: ModelConfig) -> None:
    """Continual classes in 3D: the kidneys added to a body/liver/spleen model are
    seeded, pending (not run), then trained alone; encoder and old heads unchanged."""
    starter = replace(config_3d, labels=config_3d.labels[:3], heads=config_3d.heads[:3])
    added = starter.with_added_head(KIDNEYS, config_3d.labels[3:], init_seed=99, added_in=1)
    model, config = model_from_bytes(model_to_bytes(build_model(starter), starter), added)
    assert config.pending_heads == ("kidneys",)
    assert set(segment_any(model, config, _volume(set()).image).entropy) == {
        "body", "liver", "spleen"}
    before = _state(model)
    sample = _volume({"kidney_left", "kidney_right"})
    policy = continual_policy(config, sample.annotated, TrainingPolicy(epochs=2, augment=False))
    report = train(model, config, prepare_volumes([sample], config), policy)
    assert report.encoder_frozen and report.trained_heads == ("kidneys",)
    assert _changed_groups(before, model) == {"heads.kidneys"}
    assert after_round(config, report).pending_heads == ()


def test_3d_heads_learn_the_toy_volume_and_the_sliding_window_combines_them(
        config_3d: ModelConfig) -> None:
    model = build_model(config_3d)
    everything = {lab.name for lab in config_3d.labels}
    train(model, config_3d, prepare_volumes([_volume(everything, s) for s in (0, 1)],
                                            config_3d),
          TrainingPolicy(epochs=60, learning_rate=3e-3, augment=False, seed=0))
    image, truth = toy_volume(2, slices=16, rows=32, cols=32)  # an unseen toy
    result = segment_any(model, config_3d, image)
    assert result.labels.shape == image.shape
    assert set(result.entropy) == set(config_3d.head_names)
    dice = dice_per_label(result.labels, truth, config_3d.label_values)
    assert dice["body"] > 0.9 and dice["liver"] > 0.8, dice


def test_slices_and_volumes_do_not_mix(config_3d: ModelConfig,
                                       tiny_config: ModelConfig) -> None:
    image, labels = toy_volume(0, slices=16, rows=32, cols=32)
    with pytest.raises(TrainingError, match="3D: it trains on volumes"):
        train(build_model(config_3d), config_3d,
              samples_from_volume(image, labels, {"liver"}, config_3d), TrainingPolicy())
    with pytest.raises(TrainingError, match="2D: it trains on slices"):
        prepare_volumes([_volume({"liver"})], tiny_config)
    with pytest.raises(TrainingError, match="not in model"):
        prepare_volumes([_volume({"pancreas"})], config_3d)


def test_the_3d_starter_reports_each_step_of_its_heads(config_3d: ModelConfig) -> None:
    """`tessera model bootstrap --arch unet3d-monai` shows the loss of the steps it runs
    (the bar read "step 0 loss nan" while a 3D heads starter trained)."""
    seen: list[TrainingProgress] = []
    everything = frozenset(lab.name for lab in config_3d.labels)
    _, report = train_3d(config_3d, [_volume(set(everything), s) for s in (0, 1)],
                         learning_rate=3e-3, time_budget_s=3.0, seed=0, device="cpu",
                         progress=seen.append)
    assert seen and seen[-1].step == report.steps, (len(seen), report.steps)
    assert all(math.isfinite(p.loss) for p in seen)
