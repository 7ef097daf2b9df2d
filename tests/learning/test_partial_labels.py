"""Partial labels on the node: declared labels -> trained heads -> update groups; the
enclosing body head; a declared label no model knows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.config import load_config
from dicom_node.errors import ConfigError
from dicom_node.learning.errors import ModelConfigError
from dicom_node.learning.incremental import train_round, trained_groups, update_artifact
from dicom_node.learning.losses import head_targets, masked_loss
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import build_model
from dicom_node.learning.partial_labels import (
    check_annotated_labels,
    declared_groups,
    fill_enclosing,
    heads_for_labels,
)
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.slices import prepare_samples, samples_from_volume
from dicom_node.learning.weights import arrays_from_bytes, group_of

from .conftest import BODY, LIVER, SPLEEN, toy_volume


def test_declared_labels_map_to_the_heads_that_own_them(tiny_config: ModelConfig) -> None:
    assert heads_for_labels(tiny_config, ["liver"]) == ("liver",)
    assert heads_for_labels(tiny_config, ["kidney_left"]) == ("kidneys",)
    assert declared_groups(tiny_config, ["spleen", "body"]) == (
        "encoder", "heads.body", "heads.spleen")
    assert declared_groups(tiny_config, ["liver"], encoder=False) == ("heads.liver",)
    assert heads_for_labels(tiny_config, []) == ()


def test_a_liver_only_round_uploads_the_encoder_and_heads_liver_only(
    any_heads_config: ModelConfig,
) -> None:
    """What a hospital with ``annotated_labels = ["liver"]`` sends: the spleen (drawn or
    not) and the body are not its labels, so their heads neither train nor travel."""
    tiny_config = any_heads_config
    model = build_model(tiny_config)
    image, labels = toy_volume(slices=4)
    samples = samples_from_volume(image, labels, {"liver"}, tiny_config)  # spleen drawn too
    candidate, report = train_round(model, tiny_config, samples, [],
                                    TrainingPolicy(epochs=1, batch_size=2, augment=False))
    groups = trained_groups(report)
    assert groups == ["encoder", "heads.liver"]
    assert groups == list(declared_groups(tiny_config, ["liver"]))
    payload, _ = update_artifact(candidate, groups, {"update_id": "x"})
    arrays, _ = arrays_from_bytes(payload)
    assert {group_of(name) for name in arrays} == {"encoder", "heads.liver"}
    before = model.state_dict()
    for name, value in candidate.state_dict().items():
        if group_of(name) in ("heads.spleen", "heads.body", "heads.kidneys"):
            assert torch.equal(value, before[name]), name


def test_unknown_annotated_label_is_refused_naming_the_key(tiny_config: ModelConfig) -> None:
    with pytest.raises(ModelConfigError, match=r"learning\.annotated_labels: 'livr' is not a "
                                               r"label of any model.*tessera-abdomen-ct: body"):
        check_annotated_labels(["liver", "livr"], [tiny_config])
    check_annotated_labels(["liver", "kidney_left"], [tiny_config])
    check_annotated_labels([], [tiny_config])  # empty: every label
    check_annotated_labels(["anything"], [])  # no model yet: checked when one loads


@pytest.mark.parametrize("value, rule", [
    ('["Liver"]', "is not a label name"),
    ('["liver", "liver"]', "labels repeat"),
    ('"liver"', "valid tuple"),
])
def test_malformed_annotated_labels_fail_at_load_naming_the_key(
    tmp_path: Path, value: str, rule: str
) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f"[learning]\nannotated_labels = {value}\n")
    with pytest.raises(ConfigError, match=rf"learning\.annotated_labels: .*{rule}"):
        load_config(path, env={})


def test_body_holes_of_unannotated_organs_are_filled(tiny_config: ModelConfig) -> None:
    """A body segment cut around the spleen, the spleen segment deleted: the hole is
    body, not outside the body."""
    _, labels = toy_volume(slices=2)
    cut = np.where(labels == SPLEEN, 0, labels).astype(np.uint8)
    filled = fill_enclosing(cut, {"body", "liver"}, tiny_config)
    assert (filled[labels == SPLEEN] == BODY).all()
    assert (filled[labels == 0] == 0).all() and (filled[labels == LIVER] == LIVER).all()
    assert (cut[labels == SPLEEN] == 0).all(), "the input is left alone"
    assert fill_enclosing(cut, {"liver"}, tiny_config) is cut  # no body annotated: as is
    assert (fill_enclosing(cut[0], {"body"}, tiny_config)[labels[0] == SPLEEN] == BODY).all()


def test_body_head_is_not_taught_that_an_unannotated_organ_is_outside_the_body(
    tiny_config: ModelConfig,
) -> None:
    _, labels = toy_volume(slices=2)
    cut = np.where(labels == SPLEEN, 0, labels).astype(np.uint8)
    spleen = torch.from_numpy(labels == SPLEEN)
    annotated = torch.tensor([[True, True, False, False, False]] * 2)  # body, liver
    raw = head_targets(torch.from_numpy(cut), annotated, tiny_config)["body"][0]
    assert (raw[spleen] == 0).all()  # what the cut map alone would teach
    fixed = fill_enclosing(cut, {"body", "liver"}, tiny_config)
    target = head_targets(torch.from_numpy(fixed), annotated, tiny_config)["body"][0]
    assert (target[spleen] == 1).all()
    # a body head that calls the spleen region body costs less with the filled map
    says_body = torch.where(torch.from_numpy(labels != 0), 9.0, -9.0)
    logits = {"body": torch.stack([-says_body, says_body], dim=1).float()}
    loss_cut = masked_loss(logits, {"body": (raw, annotated[:, :1])}, dice_weight=0)
    loss_fixed = masked_loss(logits, {"body": (target, annotated[:, :1])}, dice_weight=0)
    assert loss_cut is not None and loss_fixed is not None
    assert float(loss_fixed) < float(loss_cut)


def test_prepared_liver_only_samples_train_no_body_target(tiny_config: ModelConfig) -> None:
    image, labels = toy_volume(slices=2)
    liver_only = np.where(labels == LIVER, LIVER, 0).astype(np.uint8)
    data = prepare_samples(samples_from_volume(image, liver_only, {"liver"}, tiny_config),
                           tiny_config)
    targets = head_targets(data.labels, data.annotated, tiny_config)
    assert not bool(targets["body"][1].any()), "body is not annotated: no body loss"
    assert not bool(targets["spleen"][1].any())
