"""MONAI networks by registry name + JSON, 3D sliding-window inference, Dice-CE training
with partial-label masking (issue 23)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dicom_node.learning.errors import ModelConfigError, TrainingError, WeightsError
from dicom_node.learning.external import NetworkSpec, sha256_file
from dicom_node.learning.external_training import marginal_log_probs, train_external
from dicom_node.learning.label_specs import LabelSpec
from dicom_node.learning.model_config import ModelConfig, external_config
from dicom_node.learning.network import build_network
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.preprocessing_spec import (
    IntensityStep,
    Modality,
    Preprocessing,
    VolumePreprocessing,
)
from dicom_node.learning.volume_inference import segment_any
from dicom_node.learning.volume_samples import VolumeSample
from dicom_node.learning.volume_windows import class_balanced_window
from dicom_node.learning.weights import (
    apply_groups,
    extract_groups,
    load_model,
    model_from_bytes,
    model_to_bytes,
    save_model,
)

LABELS = (LabelSpec("liver", 1, "10200004", "Liver"), LabelSpec("spleen", 2, "78961009", "Spleen"))
VOLUME_PP = Preprocessing(volume=VolumePreprocessing(
    orientation="RAS", spacing=(2.0, 2.0, 2.0),
    intensity=(IntensityStep("window", -160, 240),), roi_size=(32, 32, 32)))

NETWORKS = {
    "monai:UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                   "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
    "monai:SegResNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                        "init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
    "monai:DynUNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                      "kernel_size": [3, 3, 3], "strides": [1, 2, 2],
                      "upsample_kernel_size": [2, 2], "filters": [8, 16, 32]},
}


def config_for(architecture: str, args: dict | None = None) -> ModelConfig:
    return external_config("monai-test", architecture,
                           NetworkSpec(args or NETWORKS[architecture]), LABELS, VOLUME_PP)


def oblique_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """Slices along -y (coronal, posterior to anterior flipped), rows along z, cols along x."""
    affine = np.eye(4)
    affine[:3, 0] = np.array([0.0, -1.0, 0.0]) * spacing[0]
    affine[:3, 1] = np.array([0.0, 0.0, -1.0]) * spacing[1]
    affine[:3, 2] = np.array([1.0, 0.0, 0.0]) * spacing[2]
    return affine


@pytest.mark.parametrize("architecture", sorted(NETWORKS))
def test_monai_network_round_trips_through_json_and_safetensors(architecture: str) -> None:
    config = config_for(architecture)
    assert ModelConfig.from_json(config.to_json()) == config
    assert config.parameter_groups() == ("network",)
    model = build_network(config)
    again, again_config = model_from_bytes(model_to_bytes(model, config))
    assert again_config == config
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model.eval()(x)["network"], again(x)["network"])
    assert all(name.startswith("network.") for name in again.state_dict())


def test_2d_monai_network_segments_slice_by_slice() -> None:
    args = {"spatial_dims": 2, "in_channels": 2, "out_channels": 3,
            "channels": [8, 16], "strides": [2]}
    config = external_config("monai-2d", "monai:UNet", NetworkSpec(args), LABELS,
                             Preprocessing(input_size=32))
    model = build_network(config)
    volume = np.random.default_rng(0).normal(0, 100, (5, 40, 48)).astype(np.float32)
    result = segment_any(model, config, volume)
    assert result.labels.shape == volume.shape


@pytest.mark.parametrize(("architecture", "args", "message"), [
    ("monai:__import__", None, "not allowed"),
    ("monai:Classifier", None, "not allowed"),
    ("monai:UNet", {"spatial_dims": 4, "in_channels": 1, "out_channels": 3}, "2 or 3"),
    ("monai:UNet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                    "channels": [8, 16], "strides": [2]}, "output channels"),
    ("torchscript:abc", {"spatial_dims": 3, "in_channels": 1, "out_channels": 3},
     "torchscript:<sha256>"),
])
def test_bad_external_configs_are_refused(architecture: str, args: dict | None,
                                          message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        config_for(architecture, args or NETWORKS["monai:UNet"])


def test_external_config_keeps_one_head_and_no_added_heads() -> None:
    data = config_for("monai:UNet").to_dict()
    data["heads"] = {"liver": ["liver"], "spleen": ["spleen"]}
    with pytest.raises(ModelConfigError, match="one head 'network'"):
        ModelConfig.from_dict(data)


class ThresholdNetwork(nn.Module):
    """Probability of "label 1" = 1 where the input is positive: geometry made visible."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(50.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.gain * x)
        return torch.cat([1 - p, p], dim=1)


def scripted_threshold(tmp: Path) -> tuple[Path, str]:
    path = tmp / "threshold.pt"
    torch.jit.script(ThresholdNetwork()).save(str(path))
    return path, sha256_file(path)


def threshold_config(sha: str, spacing: tuple[float, float, float] | None) -> ModelConfig:
    pp = Preprocessing(modality=Modality.MR, volume=VolumePreprocessing(
        orientation="RAS", spacing=spacing, roi_size=(16, 16, 16), overlap=0.5))
    return external_config("threshold", f"torchscript:{sha}",
                           NetworkSpec({"spatial_dims": 3, "in_channels": 1, "out_channels": 2},
                                       output="probabilities"),
                           [LabelSpec("brain", 1, "12738006", "Brain")], pp)


def test_3d_inference_keeps_the_input_grid_through_reorientation(tmp_path: Path) -> None:
    """An oblique-free but permuted, flipped acquisition: the label map lands on the
    input's voxels exactly (sliding window with overlap, Gaussian blending, RAS and back)."""
    script, sha = scripted_threshold(tmp_path)
    (tmp_path / "torchscript").mkdir()
    script.rename(tmp_path / "torchscript" / f"{sha}.pt")
    config = threshold_config(sha, None)
    model = build_network(config, [tmp_path])
    rng = np.random.default_rng(1)
    volume = np.where(rng.random((21, 30, 26)) < 0.3, 1.0, -1.0).astype(np.float32)
    volume[:5, :7, :3] = 1.0  # an asymmetric block: a flip or transpose would move it
    result = segment_any(model, config, volume, (3.0, 1.0, 1.0),
                         affine=oblique_affine((3.0, 1.0, 1.0)))
    np.testing.assert_array_equal(result.labels, (volume > 0).astype(np.uint8))


def test_3d_inference_resamples_to_the_model_spacing_and_back(tmp_path: Path) -> None:
    script, sha = scripted_threshold(tmp_path)
    (tmp_path / "torchscript").mkdir()
    script.rename(tmp_path / "torchscript" / f"{sha}.pt")
    config = threshold_config(sha, (1.5, 1.5, 1.5))
    model = build_network(config, [tmp_path])
    volume = -np.ones((24, 40, 40), np.float32)
    volume[6:18, 10:30, 12:26] = 1.0
    result = segment_any(model, config, volume, (2.0, 1.0, 1.0),
                         affine=oblique_affine((2.0, 1.0, 1.0)))
    truth = (volume > 0).astype(np.uint8)
    agree = (result.labels == truth).mean()
    assert agree > 0.98, agree
    assert result.labels[12, 20, 19] == 1 and result.labels[2, 2, 2] == 0


def test_torchscript_is_loaded_only_from_the_local_file_whose_hash_matches(
        tmp_path: Path) -> None:
    script, sha = scripted_threshold(tmp_path)
    config = threshold_config(sha, None)
    with pytest.raises(ModelConfigError, match="not installed on this node"):
        build_network(config, [tmp_path])
    installed = tmp_path / "torchscript" / f"{sha}.pt"
    installed.parent.mkdir()
    installed.write_bytes(script.read_bytes() + b"tampered")
    with pytest.raises(ModelConfigError, match="sha256 is"):
        build_network(config, [tmp_path])


def test_dynunet_shared_tensors_are_stored_once_and_restored() -> None:
    config = config_for("monai:DynUNet")
    model = build_network(config)
    names = set(model.state_dict())
    assert not any(".skip_layers." in n for n in names)  # DynUNet's second names
    again, _ = model_from_bytes(model_to_bytes(model, config))
    skip = again.network.skip_layers.downsample.conv1.conv.weight  # type: ignore[union-attr]
    assert torch.equal(skip, model.network.skip_layers.downsample.conv1.conv.weight)  # type: ignore[union-attr]


def test_federation_moves_the_network_group_by_name(tmp_path: Path) -> None:
    config = config_for("monai:UNet")
    a, b = build_network(config), build_network(config)
    arrays = extract_groups(a, ["network"])
    assert set(arrays) == set(a.state_dict())
    assert apply_groups(b, config, arrays) == {"network"}
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    with pytest.raises(WeightsError, match="unknown parameter groups"):
        extract_groups(a, ["encoder"])
    path = save_model(b, config, tmp_path / "m" / "model.safetensors")
    assert json.loads(path.with_suffix(".json").read_text())["architecture"] == "monai:UNet"
    loaded, _ = load_model(path)
    assert set(loaded.state_dict()) == set(b.state_dict())


def test_marginal_loss_merges_unannotated_channels_into_background() -> None:
    logits = torch.randn(1, 3, 4, 4, 4)
    merged = marginal_log_probs(logits, torch.tensor([True, False]))
    p = logits.softmax(dim=1)
    assert merged.shape[1] == 2
    torch.testing.assert_close(merged.exp()[:, 0], p[:, 0] + p[:, 2])
    torch.testing.assert_close(merged.exp()[:, 1], p[:, 1])


def _blob_sample(seed: int, annotated: frozenset[str]) -> VolumeSample:
    rng = np.random.default_rng(seed)
    image = rng.normal(-50, 20, (16, 32, 32)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[4:12, 4:16, 4:16] = 1
    labels[4:12, 18:28, 18:28] = 2
    image[labels == 1] += 150
    image[labels == 2] += 250
    kept = np.where(np.isin(labels, [LABELS[i].value for i in range(2)
                                     if LABELS[i].name in annotated]), labels, 0)
    return VolumeSample(image, kept.astype(np.uint8), annotated, (2.0, 1.0, 1.0),
                        oblique_affine((2.0, 1.0, 1.0)))


def test_dice_ce_training_with_partial_labels_learns_the_annotated_label() -> None:
    torch.manual_seed(0)
    pp = Preprocessing(volume=replace(VOLUME_PP.volume, roi_size=(16, 16, 16)))
    config = replace(config_for("monai:UNet"), preprocessing=pp)
    model = build_network(config)
    samples = [_blob_sample(i, frozenset({"liver"})) for i in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = train_external(model, config, samples, TrainingPolicy(
        epochs=8, learning_rate=1e-2, augment=False, seed=0))
    assert report.trained_heads == ("network",) and report.steps == 16
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    probe = _blob_sample(9, frozenset({"liver", "spleen"}))
    result = segment_any(model, config, probe.image, probe.spacing, affine=probe.affine)
    liver = probe.labels == 1
    assert (result.labels[liver] == 1).mean() > 0.7


def test_training_that_needs_separate_heads_is_refused() -> None:
    config = config_for("monai:UNet")
    model = build_network(config)
    samples = [_blob_sample(0, frozenset({"liver"}))]
    for policy in (TrainingPolicy(freeze_encoder=True), TrainingPolicy(heads=("liver",)),
                   TrainingPolicy(distill_other_heads=0.5)):
        with pytest.raises(TrainingError, match="multi-head U-Net"):
            train_external(model, config, samples, policy)


def test_training_windows_visit_a_small_structure_as_often_as_the_background() -> None:
    """A 4-voxel organ in a corner of a 32^3 volume: class-balanced windows of 8^3 hold it
    in about half the draws (two classes shown); a uniform window would in ~2 %."""
    x = torch.zeros(1, 1, 32, 32, 32)
    y = torch.zeros(1, 32, 32, 32, dtype=torch.long)
    y[0, 30:32, 30:32, 0] = 1
    gen = torch.Generator().manual_seed(7)
    hits = 0
    for _ in range(200):
        wx, wy = class_balanced_window(x, y, (8, 8, 8), gen)
        assert tuple(wx.shape) == (1, 1, 8, 8, 8) and tuple(wy.shape) == (1, 8, 8, 8)
        hits += bool((wy == 1).any())
    assert 70 <= hits <= 130
    small = torch.zeros(1, 1, 4, 4, 4)  # smaller than the window: padded
    wx, wy = class_balanced_window(small, torch.zeros(1, 4, 4, 4, dtype=torch.long),
                                   (8, 8, 8), gen)
    assert tuple(wx.shape) == (1, 1, 8, 8, 8) and int(wy.sum()) == 0
