"""A MONAI network as the shared encoder of named heads (``monai-heads:<Class>``): the
split into groups, the configs it refuses, and head distillation through its encoder.
Continual heads, partial labels and the rehearsal gate run on it in
``test_continual.py``, ``test_partial_labels.py`` and ``test_rehearsal.py``
(``any_heads_config``)."""

from __future__ import annotations

import pytest
import torch

from dicom_node.learning.errors import ModelConfigError
from dicom_node.learning.incremental import train_round
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.monai_heads import MonaiMultiHead
from dicom_node.learning.network import build_model
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.preprocessing import prepare_slices
from dicom_node.learning.slices import samples_from_volume
from dicom_node.learning.training import train
from dicom_node.learning.weights import group_of, model_from_bytes, model_to_bytes

from .conftest import toy_volume, with_monai_encoder

ALL = {"body", "liver", "spleen", "kidney_left", "kidney_right"}


def test_the_monai_network_is_the_encoder_and_each_head_is_its_own_group(
        tiny_config: ModelConfig) -> None:
    config = with_monai_encoder(tiny_config)
    model = build_model(config)
    assert isinstance(model, MonaiMultiHead)
    groups = {group_of(name) for name in model.state_dict()}
    assert groups == {"encoder", *(f"heads.{h}" for h in config.head_names)}
    assert all(n.startswith("encoder.network.") for n in model.state_dict()
               if group_of(n) == "encoder")
    out = model(torch.zeros(2, config.preprocessing.in_channels, 32, 32), ["liver", "kidneys"])
    assert out["liver"].shape == (2, 2, 32, 32) and out["kidneys"].shape == (2, 3, 32, 32)
    again, read = model_from_bytes(model_to_bytes(model, config))
    assert read == config and isinstance(again, MonaiMultiHead)
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name


def _edit(data: dict, where: str, value: object) -> None:
    *path, last = where.split(".")
    for key in path:
        data = data[key]
    if value is None:
        del data[last]
    else:
        data[last] = value


@pytest.mark.parametrize(("where", "value", "match"), [
    ("architecture", "monai-heads:Evil", "is not allowed"),
    ("network", None, "needs a 'network' object"),
    ("network.args.spatial_dims", 3, r"preprocessing\.volume is required"),
    ("network.args.in_channels", 1, "preprocessing gives 2"),
    ("network.args.out_channels", 6, "divisible by"),
    ("network.output", "probabilities", "features"),
])
def test_a_bad_monai_encoder_config_is_refused_naming_the_field(
        tiny_config: ModelConfig, where: str, value: object, match: str) -> None:
    data = with_monai_encoder(tiny_config).to_dict()
    _edit(data, where, value)
    with pytest.raises(ModelConfigError, match=match):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize("norm", ["batch", ["instance", {"track_running_stats": True}]])
def test_an_encoder_keeping_running_statistics_is_refused(
        tiny_config: ModelConfig, norm: object) -> None:
    """A frozen encoder must not change: batch norm's statistics would (and be merged)."""
    data = with_monai_encoder(tiny_config).to_dict()
    data["network"]["args"]["norm"] = norm
    with pytest.raises(ModelConfigError, match="running statistics"):
        build_model(ModelConfig.from_dict(data))
    data["network"]["args"]["norm"] = ["group", {"num_groups": 4}]
    assert not list(build_model(ModelConfig.from_dict(data)).buffers())


def test_distilling_the_other_heads_holds_them_while_a_liver_only_round_moves_the_encoder(
        tiny_config: ModelConfig) -> None:
    """A liver-only round changes the shared MONAI encoder under the spleen and kidney
    heads it does not train; distilling them (the node's default) keeps their outputs
    closer to where the round started than the same round without it."""
    config = with_monai_encoder(tiny_config)
    image, labels = toy_volume(seed=1, slices=8)
    model = build_model(config)
    train(model, config, samples_from_volume(image, labels, ALL, config),
          TrainingPolicy(epochs=8, batch_size=2, learning_rate=3e-3, augment=False))
    liver_image, liver_labels = toy_volume(seed=3, slices=8)
    liver_only = samples_from_volume(liver_image, liver_labels, {"liver"}, config)
    probe = prepare_slices(toy_volume(seed=5, slices=4)[0], config.preprocessing)
    others = ["spleen", "kidneys"]
    with torch.no_grad():
        start = model(probe, others)
    drift = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        policy = TrainingPolicy(epochs=4, batch_size=2, learning_rate=3e-3, augment=False,
                                distill_other_heads=weight)
        candidate, report = train_round(model, config, liver_only, [], policy)
        assert report.trained_heads == ("liver",)
        with torch.no_grad():
            after = candidate(probe, others)
        drift[weight] = sum(float((after[h].softmax(1) - start[h].softmax(1)).abs().mean())
                            for h in others)
    assert drift[1.0] < 0.8 * drift[0.0], drift
