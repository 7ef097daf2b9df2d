"""Rehearsal anchors: made locally from the phantom, mixed into batches, gate a round."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.config import LearningSettings, NodeConfig, RehearsalSettings, load_config
from dicom_node.errors import ConfigError
from dicom_node.learning import rehearsal
from dicom_node.learning.errors import TrainingError
from dicom_node.learning.incremental import StoredSample, copy_model, cut_sample
from dicom_node.learning.label_specs import HeadSpec, LabelSpec
from dicom_node.learning.model_config import ModelConfig, UNetHyperparameters, abdomen_ct_config
from dicom_node.learning.network import build_model
from dicom_node.learning.policy import RehearsalPlan, TrainingPolicy
from dicom_node.learning.rehearsal import AnchorGate, anchor_set, anchor_slices
from dicom_node.learning.slices import samples_from_volume
from dicom_node.learning.training import train
from dicom_node.phantom.ct import generate_subject
from dicom_node.pipeline.training_samples import policy_of
from tests.learning.conftest import toy_volume

ALL = {"body", "liver", "spleen", "kidney_left", "kidney_right"}
ONE = RehearsalPlan(site="A", subjects=1, seed=5)


def test_anchor_slices_are_the_phantoms_own_slices_and_labels() -> None:
    config = abdomen_ct_config(input_size=64)
    (anchor,) = anchor_set(config, ONE)
    subject = generate_subject("A", 0, 5)
    organs = (subject.labels > 1).reshape(subject.labels.shape[0], -1).any(axis=1)
    assert set(np.flatnonzero(organs)) <= set(anchor.slices.tolist())  # every organ slice
    others = sorted(set(anchor.slices.tolist()) - set(np.flatnonzero(organs)))
    assert 0 < len(others) <= (~organs).sum() // rehearsal.BODY_STRIDE + 1  # some body-only
    np.testing.assert_array_equal(anchor.image, subject.image[anchor.slices])
    np.testing.assert_array_equal(anchor.labels, subject.labels[anchor.slices])
    assert anchor.image.dtype == np.int16 and anchor.mr_range is None
    assert set(anchor.annotated) == ALL
    assert len(anchor_slices([anchor])) == anchor.image.shape[0]


def test_anchors_are_deterministic_and_cached() -> None:
    config = abdomen_ct_config(input_size=64)
    first = anchor_set(config, ONE)
    assert anchor_set(config.with_generation(7), ONE) is first  # cached across generations
    rehearsal._anchor_set.cache_clear()
    again = anchor_set(config, ONE)
    assert again is not first
    np.testing.assert_array_equal(again[0].image, first[0].image)
    np.testing.assert_array_equal(again[0].labels, first[0].labels)
    assert anchor_set(config, replace(ONE, fraction=0.0)) == ()  # off
    assert anchor_set(config, replace(ONE, site="")) == ()


def test_phantom_labels_map_to_the_models_labels_by_name() -> None:
    config = ModelConfig(
        name="liver-only", generation=0,
        labels=(LabelSpec("body", 1, "38266002", "Entire body", enclosing=True),
                LabelSpec("liver", 7, "10200004", "Liver"),
                LabelSpec("pancreas", 9, "15776009", "Pancreas")),
        heads=(HeadSpec("body", ("body",)), HeadSpec("liver", ("liver",)),
               HeadSpec("pancreas", ("pancreas",))))
    (anchor,) = anchor_set(config, ONE)
    subject = generate_subject("A", 0, 5)
    assert anchor.annotated == ("body", "liver")  # the phantom has no pancreas
    truth = subject.labels[anchor.slices]
    assert set(np.unique(anchor.labels)) == {0, 1, 7}
    np.testing.assert_array_equal(anchor.labels == 7, truth == 2)
    # structures the model lacks (spleen, kidneys) lie in the body, its enclosing label
    np.testing.assert_array_equal(anchor.labels == 1, (truth > 0) & (truth != 2))
    liver = (subject.labels == 2).reshape(subject.labels.shape[0], -1).any(axis=1)
    assert set(np.flatnonzero(liver)) <= set(anchor.slices.tolist())


@pytest.mark.parametrize(("options", "match"), [
    ({"site": "E"}, "rehearsal site"),
    ({"subjects": 0}, "subjects"),
    ({"fraction": 1.0}, "fraction"),
    ({"margin": -0.1}, "margin"),
])
def test_rehearsal_plan_is_validated(options: dict, match: str) -> None:
    with pytest.raises(TrainingError, match=match):
        RehearsalPlan(**options)


def test_mr_models_refuse_a_site_the_atlas_lacks() -> None:
    from dicom_node.learning.preprocessing_spec import Modality, Preprocessing

    config = replace(abdomen_ct_config(), preprocessing=Preprocessing(modality=Modality.MR))
    with pytest.raises(TrainingError, match="MR rehearsal site"):
        anchor_set(config, RehearsalPlan(site="D"))


def test_anchors_fill_their_share_of_every_batch(tiny_config: ModelConfig) -> None:
    image, labels = toy_volume(slices=4)
    new = samples_from_volume(image, labels, {"liver"}, tiny_config)
    anchors = samples_from_volume(image, labels, ALL, tiny_config)
    policy = TrainingPolicy(epochs=1, batch_size=4, anchor_fraction=0.5, augment=False)
    report = train(build_model(tiny_config), tiny_config, new, policy, anchors=anchors)
    assert report.steps == 2  # 4 new samples, 2 per batch beside 2 anchors
    assert set(report.trained_heads) == {"liver"}  # anchors do not widen the trained heads
    both = replace(policy, replay_fraction=0.25, anchor_fraction=0.25)
    report = train(build_model(tiny_config), tiny_config, new, both, replay=anchors,
                   anchors=anchors)
    assert report.steps == 2
    with pytest.raises(TrainingError, match="anchor_fraction"):
        TrainingPolicy(anchor_fraction=1.0)
    with pytest.raises(TrainingError, match="a batch needs new samples"):
        TrainingPolicy(replay_fraction=0.5, anchor_fraction=0.5)


def _trained(config: ModelConfig) -> tuple[torch.nn.Module, StoredSample]:
    image, labels = toy_volume(seed=1, slices=8)
    model = build_model(config)
    policy = TrainingPolicy(epochs=20, batch_size=2, learning_rate=3e-3, augment=False)
    train(model, config, samples_from_volume(image, labels, ALL, config), policy)
    held_image, held_labels = toy_volume(seed=2, slices=6)
    return model, cut_sample(held_image, held_labels, range(6), ALL, config)


def test_the_anchor_gate_refuses_a_round_that_forgets(
    any_heads_config: ModelConfig, monkeypatch: pytest.MonkeyPatch,
) -> None:
    tiny_config = any_heads_config
    base, anchors = _trained(tiny_config)
    calls = []
    real = rehearsal.evaluate_slices
    monkeypatch.setattr(rehearsal, "evaluate_slices",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    gate = AnchorGate([anchors], margin=0.02, stride=1)
    same = copy_model(base, tiny_config)
    kept = gate.check(base, tiny_config, same, tiny_config)
    assert kept.accepted and kept.verdict.startswith("anchors:")
    assert kept.candidate["mean"] == pytest.approx(kept.base["mean"])
    forgot = copy_model(base, tiny_config)
    torch.manual_seed(3)
    for p in forgot.heads["liver"].parameters():  # the liver head forgets what it knew
        torch.nn.init.normal_(p, std=0.5)
    refused = gate.check(base, tiny_config, forgot, tiny_config)
    assert not refused.accepted
    assert refused.candidate["liver"] < refused.base["liver"] - 0.02
    assert "fell by" in refused.verdict and "anchors" in refused.verdict
    assert len(calls) == 3  # the base was scored once, not once per check


def test_the_gate_scores_a_strided_subset() -> None:
    sample = StoredSample(np.zeros((10, 4, 4), np.int16), np.zeros((10, 4, 4), np.uint8),
                          np.arange(10), ("liver",))
    gate = AnchorGate([sample], margin=0.02, stride=4)
    assert gate.slices[0].slices.tolist() == [0, 4, 8]
    with pytest.raises(TrainingError, match="stride"):
        AnchorGate([sample], margin=0.02, stride=0)


# -- [learning] keys -----------------------------------------------------------------------
def test_the_nodes_defaults_turn_rehearsal_on_and_policy_follows() -> None:
    node = NodeConfig()
    plan = node.learning.rehearsal.plan()
    assert plan.enabled and plan.site == "A"
    assert policy_of(node.learning).anchor_fraction == node.learning.rehearsal.fraction > 0
    off = NodeConfig.model_validate({"learning": {"rehearsal": {"site": ""}}})
    assert not off.learning.rehearsal.plan().enabled
    assert policy_of(off.learning).anchor_fraction == 0.0


def test_distillation_of_other_heads_is_on_by_default_and_configurable() -> None:
    assert policy_of(NodeConfig().learning).distill_other_heads == 1.0
    off = NodeConfig.model_validate({"learning": {"round": {"distill_other_heads": 0}}})
    assert policy_of(off.learning).distill_other_heads == 0.0
    with pytest.raises(ValueError, match="distill_other_heads"):
        NodeConfig.model_validate({"learning": {"round": {"distill_other_heads": -1}}})


@pytest.mark.parametrize(("toml", "match"), [
    ('[learning.rehearsal]\nsite = "E"', r"learning\.rehearsal: site .*phantom site"),
    ("[learning.rehearsal]\nsubjects = 0", r"learning\.rehearsal: subjects"),
    ("[learning.rehearsal]\nfraction = 1.5", r"learning\.rehearsal: fraction"),
    ("[learning.rehearsal]\nmargin = -0.5", r"learning\.rehearsal: margin"),
    ("[learning.round]\nreplay_fraction = 0.8\n[learning.rehearsal]\nfraction = 0.3",
     r"batch needs new samples"),
    # the keys as they were before [learning.round] / [learning.rehearsal] (deprecated)
    ('[learning]\nrehearsal_site = "E"', r"learning\.rehearsal: site .*phantom site"),
    ("[learning]\nreplay_fraction = 0.8\nrehearsal_fraction = 0.3",
     r"batch needs new samples"),
])
def test_bad_rehearsal_keys_fail_with_the_key_named(tmp_path: Path, toml: str, match: str
                                                    ) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f"{toml}\n")
    with pytest.raises(ConfigError, match=match):
        load_config(path, env={})


def test_learning_settings_accept_rehearsal_off() -> None:
    assert LearningSettings(rehearsal=RehearsalSettings(site="")).rehearsal.site == ""
    tiny = replace(abdomen_ct_config(input_size=32),
                   hyperparameters=UNetHyperparameters(channels=(8, 16, 32), norm_groups=4))
    assert anchor_set(tiny, replace(ONE, site="")) == ()
