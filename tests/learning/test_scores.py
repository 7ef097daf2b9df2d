"""Metrics on arrays small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.learning.scores import (
    count_components,
    dice,
    dice_per_label,
    label_volumes_ml,
    quality_metrics,
    slice_consistency,
)

NAMES = {"body": 1, "liver": 2}


def test_dice_by_hand() -> None:
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 1, 0], bool)
    assert dice(a, b) == pytest.approx(0.5)  # 2*1 / (2+2)
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0  # both empty: agree


def test_dice_per_label() -> None:
    pred = np.array([[0, 1, 1, 2]])
    truth = np.array([[0, 1, 2, 2]])
    out = dice_per_label(pred, truth, NAMES)
    assert out == {"body": pytest.approx(2 / 3), "liver": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="shapes differ"):
        dice_per_label(pred, truth[:, :3], NAMES)


def test_label_volumes_use_spacing() -> None:
    labels = np.zeros((2, 10, 10), np.uint8)
    labels[0, :5, :] = 1  # 50 voxels
    labels[1, 0, 0] = 2  # 1 voxel
    vols = label_volumes_ml(labels, (2.0, 1.0, 0.5), NAMES)  # 1 mm^3 per voxel
    assert vols == {"body": pytest.approx(0.05), "liver": pytest.approx(0.001)}


def test_components_face_connectivity() -> None:
    mask = np.zeros((3, 5, 5), bool)
    mask[0, 0, 0:3] = True  # a bar
    mask[0, 4, 4] = True  # isolated voxel
    mask[1, 2, 2] = mask[2, 2, 2] = True  # column across slices: one component
    mask[2, 3, 3] = True  # touches (2,2,2) only diagonally: separate
    assert count_components(mask) == 4
    assert count_components(np.zeros((2, 2, 2), bool)) == 0
    assert count_components(np.ones((4, 4, 4), bool)) == 1


def test_components_of_a_spiral_needs_long_propagation() -> None:
    # a single snake through the grid: the worst case for label propagation
    mask = np.zeros((1, 9, 9), bool)
    mask[0, ::2, :] = True
    for i, r in enumerate(range(1, 9, 2)):
        mask[0, r, 8 if i % 2 == 0 else 0] = True
    assert count_components(mask) == 1
    mask[0, 3, 0] = False  # cut the snake once
    assert count_components(mask) == 2


def test_slice_consistency_by_hand() -> None:
    mask = np.zeros((4, 2, 2), bool)
    mask[0, 0, 0] = True
    mask[1, 0, :] = True  # vs slice 0: 2*1/(1+2) = 2/3
    mask[2, 0, :] = True  # vs slice 1: 1
    # slices 2-3: slice 3 empty, slice 2 not -> 0 ; pairs counted: 3
    assert slice_consistency(mask) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert slice_consistency(np.zeros((3, 2, 2), bool)) == 1.0


def test_quality_metrics_are_plain_floats() -> None:
    labels = np.zeros((2, 4, 4), np.uint8)
    labels[:, 1:3, 1:3] = 1  # 8 voxels of body
    labels[0, 1, 1] = 2  # 1 voxel of liver
    confidence = np.full(labels.shape, 0.9, np.float32)
    confidence[0, 1, 1] = 0.5  # uncertain, in the foreground
    confidence[0, 0, 0] = 0.1  # uncertain but background: not counted
    entropy = {
        "body": np.full(labels.shape, 0.25, np.float16),
        "liver": np.zeros(labels.shape, np.float16),
    }
    out = quality_metrics(labels, confidence, entropy, (1.0, 1.0, 1.0), NAMES)
    assert all(isinstance(v, float) for v in out.values())
    assert out["volume_ml.body"] == pytest.approx(0.007)
    assert out["components.body"] == 1.0 and out["components.liver"] == 1.0
    assert out["uncertain_fraction"] == pytest.approx(1 / 8)
    assert out["entropy.body"] == pytest.approx(0.25)
    assert out["mean_entropy"] == pytest.approx(0.125)
    assert out["slice_consistency.liver"] == 0.0
    assert out["foreground_ml"] == pytest.approx(0.008)
    assert out["confidence.liver"] == pytest.approx(0.5)
    assert out["uncertain_fraction.liver"] == 1.0 and out["uncertain_fraction.body"] == 0.0
    assert out["confidence.body"] == pytest.approx(0.9)
