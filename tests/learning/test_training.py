"""Masked (marginal) loss, frozen encoder, augmentation and a short training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dicom_node.learning.batches import augment_batch
from dicom_node.learning.errors import TrainingError
from dicom_node.learning.inference import segment_volume
from dicom_node.learning.label_specs import HeadSpec, LabelSpec
from dicom_node.learning.losses import (
    conditional_distillation_loss,
    distillation_loss,
    head_targets,
    masked_loss,
)
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import build_model
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.scores import dice_per_label
from dicom_node.learning.slices import prepare_samples, samples_from_volume
from dicom_node.learning.thread_tuning import ThreadTuner
from dicom_node.learning.training import train

from .conftest import BODY, KIDNEY_LEFT, KIDNEY_RIGHT, LIVER, toy_volume

ALL = ("body", "liver", "spleen", "kidney_left", "kidney_right")


def _grads_after_loss(config: ModelConfig, annotated: set[str]) -> dict[str, float]:
    """Gradient norm per parameter group after one backward of the masked loss."""
    model = build_model(config)
    image, labels = toy_volume(slices=2)
    data = prepare_samples(samples_from_volume(image, labels, annotated, config), config)
    logits = model(data.images.float())  # every head runs
    loss = masked_loss(logits, head_targets(data.labels, data.annotated, config))
    assert loss is not None
    loss.backward()
    norms = {"encoder": 0.0, **{h: 0.0 for h in config.head_names}}
    for name, p in model.named_parameters():
        group = "encoder" if name.startswith("encoder.") else name.split(".")[1]
        if p.grad is not None:
            norms[group] += float(p.grad.norm())
    return norms


def test_unannotated_heads_get_zero_gradient(tiny_config: ModelConfig) -> None:
    norms = _grads_after_loss(tiny_config, {"liver"})
    assert norms["liver"] > 0 and norms["encoder"] > 0
    assert norms["spleen"] == norms["kidneys"] == norms["body"] == 0.0


def test_partially_annotated_head_still_learns(tiny_config: ModelConfig) -> None:
    norms = _grads_after_loss(tiny_config, {"kidney_left"})
    assert norms["kidneys"] > 0
    assert norms["liver"] == norms["spleen"] == norms["body"] == 0.0


def test_marginal_loss_does_not_penalise_unannotated_label_of_same_head(
    tiny_config: ModelConfig,
) -> None:
    """Predicting 'kidney_right' where only the left kidney is annotated costs nothing
    more than predicting background there: both mean 'not left kidney'."""
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    annotated = torch.tensor([[True, False]])
    says_right = torch.tensor([0.0, -9.0, 9.0])[None, :, None, None].expand(1, 3, 4, 4)
    says_bg = torch.tensor([9.0, -9.0, 0.0])[None, :, None, None].expand(1, 3, 4, 4)
    targets = {"kidneys": (target, annotated)}
    loss_right = masked_loss({"kidneys": says_right}, targets, dice_weight=0)
    loss_bg = masked_loss({"kidneys": says_bg}, targets, dice_weight=0)
    assert loss_right is not None and loss_bg is not None
    assert float(loss_right) == pytest.approx(float(loss_bg), abs=1e-3)
    assert float(loss_right) < 1e-3


def test_enclosing_body_target_covers_the_organs(tiny_config: ModelConfig) -> None:
    labels = torch.tensor([[[0, BODY, LIVER, KIDNEY_RIGHT]]], dtype=torch.uint8)
    annotated = torch.ones(1, 5, dtype=torch.bool)
    targets = head_targets(labels, annotated, tiny_config)
    assert targets["body"][0].tolist() == [[[0, 1, 1, 1]]]
    assert targets["liver"][0].tolist() == [[[0, 0, 1, 0]]]
    assert targets["kidneys"][0].tolist() == [[[0, 0, 0, 2]]]
    only_left = torch.tensor([[False, False, False, True, False]])
    assert head_targets(labels, only_left, tiny_config)["kidneys"][0].tolist() == [[[0, 0, 0, 0]]]


def test_frozen_encoder_is_unchanged_after_training_a_head(tiny_config: ModelConfig) -> None:
    model = build_model(tiny_config)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    spleen_before = {k: v.clone() for k, v in model.heads["spleen"].state_dict().items()}
    liver_before = {k: v.clone() for k, v in model.heads["liver"].state_dict().items()}
    image, labels = toy_volume(slices=4)
    samples = samples_from_volume(image, labels, ALL, tiny_config)
    policy = TrainingPolicy(epochs=2, batch_size=4, freeze_encoder=True, heads=("liver",))
    report = train(model, tiny_config, samples, policy)
    assert report.trained_heads == ("liver",) and report.encoder_frozen
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k]), k
    for k, v in model.heads["spleen"].state_dict().items():
        assert torch.equal(v, spleen_before[k]), k
    assert any(
        not torch.equal(v, liver_before[k]) for k, v in model.heads["liver"].state_dict().items()
    )
    assert all(p.requires_grad for p in model.encoder.parameters())  # restored


def test_training_reduces_loss_and_raises_dice(tiny_config: ModelConfig) -> None:
    model = build_model(tiny_config)
    image, labels = toy_volume(seed=1, slices=8)
    held_image, held_labels = toy_volume(seed=2, slices=3)

    def score() -> float:
        result = segment_volume(model, tiny_config, held_image, (3.0, 1.0, 1.0))
        dice = dice_per_label(result.labels, held_labels, tiny_config.label_values)
        return float(np.mean([dice["body"], dice["liver"]]))

    before = score()
    samples = samples_from_volume(image, labels, ALL, tiny_config)
    policy = TrainingPolicy(epochs=20, batch_size=2, learning_rate=3e-3, augment=False)
    report = train(model, tiny_config, samples, policy)
    assert report.epochs_completed == 20 and not report.stopped_by_time_budget
    print(report.epoch_losses)
    assert report.epoch_losses[-1] < 0.5 * report.epoch_losses[0]
    after = score()
    assert after > before + 0.2
    assert after > 0.8


def test_time_budget_stops_training(tiny_config: ModelConfig) -> None:
    image, labels = toy_volume(slices=4)
    samples = samples_from_volume(image, labels, ALL, tiny_config)
    policy = TrainingPolicy(epochs=1000, batch_size=2, time_budget_s=0.5)
    seen = []
    report = train(build_model(tiny_config), tiny_config, samples, policy, progress=seen.append)
    assert report.stopped_by_time_budget
    assert report.steps < 2000 and report.epochs_completed < 1000
    assert len(seen) == report.steps
    assert seen[-1].total_steps == 2000


def test_replay_samples_join_each_batch(tiny_config: ModelConfig) -> None:
    image, labels = toy_volume(slices=4)
    new = samples_from_volume(image, labels, {"liver"}, tiny_config)
    old = samples_from_volume(image, labels, {"spleen"}, tiny_config)
    policy = TrainingPolicy(epochs=1, batch_size=4, replay_fraction=0.5, augment=False)
    report = train(build_model(tiny_config), tiny_config, new, policy, replay=old)
    assert set(report.trained_heads) == {"liver"}  # heads follow the new samples
    assert report.steps == 2  # 4 new samples, 2 per batch


def test_training_without_annotations_for_chosen_heads_is_refused(
    tiny_config: ModelConfig,
) -> None:
    image, labels = toy_volume(slices=2)
    samples = samples_from_volume(image, labels, {"liver"}, tiny_config)
    with pytest.raises(TrainingError, match="annotate no label"):
        train(build_model(tiny_config), tiny_config, samples, TrainingPolicy(heads=("spleen",)))
    with pytest.raises(TrainingError, match="not in model"):
        samples_from_volume(image, labels, {"pancreas"}, tiny_config)


def test_augmentation_never_mirrors_left_and_right() -> None:
    _, labels = toy_volume(slices=1, rows=64, cols=64)
    y = torch.from_numpy(labels).repeat(32, 1, 1)
    x = torch.zeros(32, 2, 64, 64)
    gen = torch.Generator().manual_seed(0)
    ax, ay = augment_batch(x, y, gen)
    assert ax.shape == x.shape and ay.shape == y.shape and ay.dtype == y.dtype
    cols = torch.arange(64).float()
    for k in range(32):
        left = (ay[k] == KIDNEY_LEFT).float().sum(0)
        right = (ay[k] == KIDNEY_RIGHT).float().sum(0)
        # patient left stays on image right
        assert (left * cols).sum() / left.sum() > (right * cols).sum() / right.sum()
    assert not torch.equal(ay, y)  # it did transform


def test_thread_tuner_follows_the_faster_thread_count() -> None:
    before = torch.get_num_threads()
    try:
        tuner = ThreadTuner(max_threads=2, probe=2, recheck=10)
        slow_threads = 2
        for step in range(20):
            if step == 10:
                slow_threads = 1  # the machine got quiet: now all threads pay off
            tuner.before_step(step)
            assert torch.get_num_threads() == tuner.current
            tuner.after_step(1.0 if tuner.current == slow_threads else 0.2)
            if step == 9:
                assert tuner.current == 1
        assert tuner.current == 2
        assert ThreadTuner(max_threads=1).options == [1]
    finally:
        torch.set_num_threads(before)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_partial_labels_train_the_encoder_and_only_the_annotated_head(
    tiny_config: ModelConfig,
) -> None:
    """SegViz: a hospital that annotates only the liver changes encoder + heads.liver."""
    model = build_model(tiny_config)
    before = {h: _state(model.heads[h]) for h in tiny_config.head_names}
    encoder = _state(model.encoder)
    image, labels = toy_volume(slices=4)
    labels = np.where(labels == LIVER, LIVER, 0).astype(np.uint8)  # only the liver drawn
    samples = samples_from_volume(image, labels, {"liver"}, tiny_config)
    report = train(model, tiny_config, samples, TrainingPolicy(epochs=1, batch_size=2))
    assert report.trained_heads == ("liver",)
    assert not _unchanged(model.encoder, encoder)
    assert not _unchanged(model.heads["liver"], before["liver"])
    for head in ("body", "spleen", "kidneys"):
        assert _unchanged(model.heads[head], before[head]), head


def test_a_new_head_on_a_frozen_encoder_leaves_old_predictions_alone(
    tiny_config: ModelConfig,
) -> None:
    """Continual classes: add a head, train it alone; old heads' outputs are bit-identical."""
    model = build_model(tiny_config)
    image, labels = toy_volume(slices=4)
    config = tiny_config.with_head(
        HeadSpec("pancreas", ("pancreas",)), [LabelSpec("pancreas", 6, "15776009", "Pancreas")]
    )
    model.add_head(config.head("pancreas"))
    x = prepare_samples(samples_from_volume(image, labels, ALL, config), config).images.float()
    with torch.inference_mode():
        old = model(x, tiny_config.head_names)
    new_labels = labels.copy()
    new_labels[:, 30:34, 20:28] = 6  # the new structure, drawn at a new site
    samples = samples_from_volume(image, new_labels, {"pancreas"}, config)
    policy = TrainingPolicy(epochs=2, batch_size=2, freeze_encoder=True, heads=("pancreas",))
    report = train(model, config, samples, policy)
    assert report.trained_heads == ("pancreas",)
    with torch.inference_mode():
        again = model(x, tiny_config.head_names)
    for head in tiny_config.head_names:
        assert torch.equal(old[head], again[head]), head
    result = segment_volume(model, config, image)
    assert result.labels.shape == image.shape and "pancreas" in result.entropy


def test_anti_forgetting_options_are_validated() -> None:
    for bad in ({"l2sp_alpha": -1.0}, {"distill_weight": -1.0}, {"encoder_lr_scale": 0.0},
                {"distill_other_heads": -0.5}):
        with pytest.raises(TrainingError):
            TrainingPolicy(**bad)


def test_distillation_is_zero_for_the_teacher_itself_and_ignores_its_mistakes() -> None:
    z = torch.randn(2, 3, 4, 4)
    target = z.argmax(dim=1)
    ann = torch.ones(2, 2, dtype=torch.bool)
    assert float(distillation_loss({"h": z}, {"h": z.clone()}, {"h": (target, ann)})) == 0.0
    other = torch.randn(2, 3, 4, 4)
    assert float(distillation_loss({"h": other}, {"h": z}, {"h": (target, ann)})) > 0.0
    wrong = (target + 1) % 3  # the teacher is wrong everywhere: nothing to keep
    assert float(distillation_loss({"h": other}, {"h": z}, {"h": (wrong, ann)})) == 0.0


def test_encoder_lr_scale_and_anchors_limit_the_encoders_drift(tiny_config: ModelConfig) -> None:
    image, labels = toy_volume(slices=4)
    samples = samples_from_volume(image, labels, {"liver"}, tiny_config)

    def encoder_drift(**options: float) -> float:
        torch.manual_seed(0)
        model = build_model(tiny_config)
        start = [p.detach().clone() for p in model.encoder.parameters()]
        policy = TrainingPolicy(epochs=3, batch_size=2, augment=False, **options)
        train(model, tiny_config, samples, policy)
        return sum(float((p.detach() - q).abs().sum())
                   for p, q in zip(model.encoder.parameters(), start,
                                   strict=True))

    free = encoder_drift()
    assert encoder_drift(encoder_lr_scale=0.01) < 0.1 * free
    assert encoder_drift(distill_weight=10.0, l2sp_alpha=10.0) > 0.0  # runs, still learns


def test_conditional_distillation_counts_only_the_given_voxels() -> None:
    z, other = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    everywhere = torch.ones(2, 4, 4, dtype=torch.bool)
    assert float(conditional_distillation_loss({"h": z}, {"h": z.clone()}, everywhere)) == 0.0
    assert float(conditional_distillation_loss({"h": other}, {"h": z}, everywhere)) > 0.0
    nowhere = torch.zeros_like(everywhere)
    assert float(conditional_distillation_loss({"h": other}, {"h": z}, nowhere)) == 0.0


def test_distilling_other_heads_keeps_their_weights_and_slows_their_drift(
    tiny_config: ModelConfig,
) -> None:
    """ConDistFL: a liver-only site trains encoder + liver; the spleen head's weights stay
    bit-identical, and its predictions move less than without the distillation."""
    image, labels = toy_volume(slices=4)
    liver_only = np.where(labels == LIVER, LIVER, 0).astype(np.uint8)
    samples = samples_from_volume(image, liver_only, {"liver"}, tiny_config)
    x = prepare_samples(samples, tiny_config).images.float()

    def spleen_drift(weight: float) -> float:
        torch.manual_seed(0)
        model = build_model(tiny_config)
        heads = {h: _state(model.heads[h]) for h in tiny_config.head_names}
        encoder = _state(model.encoder)
        with torch.inference_mode():
            start = model(x, ["spleen"])["spleen"].softmax(dim=1)
        policy = TrainingPolicy(epochs=3, batch_size=2, augment=False,
                                distill_other_heads=weight)
        report = train(model, tiny_config, samples, policy)
        assert report.trained_heads == ("liver",)
        assert not _unchanged(model.encoder, encoder)
        for head in ("body", "spleen", "kidneys"):
            assert _unchanged(model.heads[head], heads[head]), head
        assert all(p.requires_grad for p in model.parameters())  # frozen only while training
        with torch.inference_mode():
            end = model(x, ["spleen"])["spleen"].softmax(dim=1)
        return float((end - start).abs().mean())

    assert spleen_drift(10.0) < 0.7 * spleen_drift(0.0)  # measured: 0.46x
