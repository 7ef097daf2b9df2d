"""Continual classes on the node: a pending head is seeded identically everywhere, is not
run until trained, trains alone on the frozen encoder, and never learns from samples
that do not annotate it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dicom_node.learning.continual import (
    after_round,
    continual_policy,
    head_groups_changed,
    init_head_arrays,
)
from dicom_node.learning.errors import ModelConfigError, WeightsError
from dicom_node.learning.incremental import cut_sample, evaluate_slices
from dicom_node.learning.inference import segment_volume
from dicom_node.learning.label_specs import HeadSpec, LabelSpec
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import build_model
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.slices import samples_from_volume
from dicom_node.learning.training import train
from dicom_node.learning.weights import model_from_bytes, model_to_bytes
from dicom_node.pipeline.segmentation import segment_specs

from .conftest import KIDNEY_LEFT, KIDNEY_RIGHT, toy_volume

KIDNEYS = HeadSpec("kidneys", ("kidney_left", "kidney_right"))
KIDNEY_LABELS = (LabelSpec("kidney_left", KIDNEY_LEFT, "18639004", "Left kidney"),
                 LabelSpec("kidney_right", KIDNEY_RIGHT, "9846003", "Right kidney"))


@pytest.fixture
def starter_config(any_heads_config: ModelConfig) -> ModelConfig:
    """The tiny config without kidneys: body, liver, spleen."""
    return replace(any_heads_config, labels=any_heads_config.labels[:3],
                   heads=any_heads_config.heads[:3])


@pytest.fixture
def added(starter_config: ModelConfig) -> ModelConfig:
    return starter_config.with_added_head(KIDNEYS, KIDNEY_LABELS, init_seed=99, added_in=1)


def _starter_bytes(config: ModelConfig) -> bytes:
    return model_to_bytes(build_model(config), config)


def test_added_head_round_trips_and_is_pending(added: ModelConfig) -> None:
    assert added.pending_heads == ("kidneys",)
    assert added.active_head_names == ("body", "liver", "spleen")
    assert [lab.name for lab in added.active_labels] == ["body", "liver", "spleen"]
    assert ModelConfig.from_json(added.to_json()) == added
    trained = added.with_trained_heads(["kidneys"])
    assert trained.pending_heads == () and trained.continual_heads == ("kidneys",)
    assert "kidneys" in trained.active_head_names
    assert ModelConfig.from_json(trained.to_json()) == trained


def test_bad_added_head_records_are_refused(added: ModelConfig) -> None:
    data = added.to_dict()
    data["added_heads"] = {"pancreas": {"init_seed": 1, "trained": False}}
    with pytest.raises(ModelConfigError, match=r"added_heads\.pancreas is not a head"):
        ModelConfig.from_dict(data)
    data["added_heads"] = {"kidneys": {"init_seed": 1, "trained": "no"}}
    with pytest.raises(ModelConfigError, match="trained must be true or false"):
        ModelConfig.from_dict(data)
    data["added_heads"] = {"kidneys": {"init_seed": -1}}
    with pytest.raises(ModelConfigError, match="init_seed"):
        ModelConfig.from_dict(data)


def test_every_node_seeds_a_pending_head_identically(
    starter_config: ModelConfig, added: ModelConfig
) -> None:
    data = _starter_bytes(starter_config)
    torch.manual_seed(1)
    a, _ = model_from_bytes(data, added)
    torch.manual_seed(2)  # torch's own RNG state does not matter
    b, _ = model_from_bytes(data, added)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    other, _ = model_from_bytes(data, replace(added, added_heads=(
        replace(added.added_heads[0], init_seed=100),)))
    assert not torch.equal(a.heads["kidneys"].out.weight, other.heads["kidneys"].out.weight)
    arrays = init_head_arrays(a, "kidneys", 99)
    assert set(arrays) == {k for k in a.state_dict() if k.startswith("heads.kidneys.")}
    w = arrays["heads.kidneys.out.weight"]
    assert w.dtype == np.float32 and 0 < np.abs(w).max() <= 1 / np.sqrt(8)


def test_an_active_head_without_weights_is_an_error(
    starter_config: ModelConfig, added: ModelConfig
) -> None:
    with pytest.raises(WeightsError, match=r"missing tensors.*heads\.kidneys"):
        model_from_bytes(_starter_bytes(starter_config), added.with_trained_heads(["kidneys"]))


def test_a_pending_head_never_reaches_the_label_map_or_the_seg(
    starter_config: ModelConfig, added: ModelConfig
) -> None:
    model, _ = model_from_bytes(_starter_bytes(starter_config), added)
    with torch.no_grad():  # a head that would claim every voxel with certainty
        model.heads["kidneys"].out.bias.copy_(torch.tensor([-50.0, 50.0, -50.0]))
    volume, _ = toy_volume(slices=2)
    pending = segment_volume(model, added, volume)
    assert KIDNEY_LEFT not in np.unique(pending.labels)
    assert set(pending.entropy) == {"body", "liver", "spleen"}
    active = segment_volume(model, added.with_trained_heads(["kidneys"]), volume)
    assert (active.labels == KIDNEY_LEFT).mean() > 0.9  # the same head, once active, claims
    assert [s.name for s in segment_specs(added)] == ["body", "liver", "spleen"]
    specs = segment_specs(added, include_pending=True)
    assert [(s.name, s.property_type.value) for s in specs][-2:] == [
        ("kidney_left", "18639004"), ("kidney_right", "9846003")]


def test_a_round_on_the_new_labels_trains_only_the_new_head_on_the_frozen_encoder(
    starter_config: ModelConfig, added: ModelConfig
) -> None:
    model, _ = model_from_bytes(_starter_bytes(starter_config), added)
    volume, labels = toy_volume(slices=4)
    samples = samples_from_volume(volume, labels, ["kidney_left", "kidney_right"], added)
    policy = continual_policy(added, ["kidney_left", "kidney_right"],
                              TrainingPolicy(epochs=2, batch_size=4, augment=False))
    assert policy.heads == ("kidneys",) and policy.freeze_encoder
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = train(model, added, samples, policy)
    assert report.trained_heads == ("kidneys",) and report.encoder_frozen
    assert head_groups_changed(before, model.state_dict()) == {"heads.kidneys"}
    candidate = after_round(added, report)
    assert candidate.pending_heads == ()
    held = [cut_sample(volume, labels, range(4), ["kidney_left", "kidney_right"], added)]
    assert set(evaluate_slices(model, candidate, held)) == {"kidney_left", "kidney_right", "mean"}


def test_a_site_that_does_not_annotate_the_new_labels_never_trains_the_new_head(
    starter_config: ModelConfig, added: ModelConfig
) -> None:
    model, _ = model_from_bytes(_starter_bytes(starter_config), added)
    volume, labels = toy_volume(slices=4)  # kidneys are in the image, but not annotated
    samples = samples_from_volume(volume, labels, ["body", "liver"], added)
    policy = continual_policy(added, ["body", "liver"], TrainingPolicy(epochs=1, batch_size=4))
    assert policy.heads is None and not policy.freeze_encoder
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = train(model, added, samples, policy)
    assert "kidneys" not in report.trained_heads
    changed = head_groups_changed(before, model.state_dict())
    assert "heads.kidneys" not in changed and "encoder" in changed
    assert after_round(added, report).pending_heads == ("kidneys",)
