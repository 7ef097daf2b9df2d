"""Volume inference: geometry, determinism and how heads are combined."""

from __future__ import annotations

import numpy as np
import torch

from dicom_node.learning.inference import combine_heads, segment_volume
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import build_model

from .conftest import BODY, KIDNEY_LEFT, LIVER, SPLEEN, toy_volume


def test_output_has_the_input_grid_for_any_in_plane_size(tiny_config: ModelConfig) -> None:
    model = build_model(tiny_config)
    for shape in [(5, 48, 48), (3, 37, 61), (1, 20, 20)]:
        volume = np.random.default_rng(0).normal(0, 300, shape).astype(np.float32)
        result = segment_volume(model, tiny_config, volume, (2.5, 0.7, 0.7), batch_size=2)
        assert result.labels.shape == shape and result.labels.dtype == np.uint8
        assert result.confidence.shape == shape
        assert set(result.entropy) == set(tiny_config.head_names)
        assert all(e.shape == shape for e in result.entropy.values())
        assert np.all((result.confidence >= 0) & (result.confidence <= 1))
        ent = np.stack(list(result.entropy.values())).astype(np.float32)
        assert np.all((ent >= 0) & (ent <= 1.001))
        assert set(np.unique(result.labels)) <= {0, *tiny_config.label_values.values()}
    assert result.spacing == (2.5, 0.7, 0.7)
    assert result.model_name == tiny_config.name and result.generation == 0


def test_inference_is_deterministic_and_batch_independent(tiny_config: ModelConfig) -> None:
    model = build_model(tiny_config)
    volume, _ = toy_volume(slices=5)
    a = segment_volume(model, tiny_config, volume, batch_size=5)
    b = segment_volume(model, tiny_config, volume, batch_size=5)
    c = segment_volume(model, tiny_config, volume, batch_size=2)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.confidence, b.confidence)
    assert np.array_equal(a.labels, c.labels)  # GroupNorm: no dependence on the batch
    np.testing.assert_allclose(a.confidence, c.confidence, atol=1e-5)


def test_slices_are_segmented_independently_and_in_place(tiny_config: ModelConfig) -> None:
    """A slice's result does not depend on its neighbours, nor moves between slices."""
    model = build_model(tiny_config)
    volume, _ = toy_volume(slices=4)
    whole = segment_volume(model, tiny_config, volume, batch_size=4)
    reversed_ = segment_volume(model, tiny_config, volume[::-1].copy(), batch_size=4)
    assert np.array_equal(whole.labels, reversed_.labels[::-1])


def _probs(*classes: list[float]) -> torch.Tensor:
    """One voxel per column: ``(1, classes, 1, n)``."""
    return torch.tensor(classes, dtype=torch.float32).T[None, :, None, :]


def test_heads_are_combined_by_confidence(tiny_config: ModelConfig) -> None:
    # five voxels; columns are voxels, rows per head are (bg, label...)
    probs = {
        "body": _probs([0.9, 0.1], [0.1, 0.9], [0.1, 0.9], [0.2, 0.8], [0.1, 0.9]),
        "liver": _probs([0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9], [0.9, 0.1]),
        "spleen": _probs([0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.9, 0.1]),
        "kidneys": _probs(
            [0.8, 0.1, 0.1],
            [0.9, 0.05, 0.05],
            [0.9, 0.05, 0.05],
            [0.9, 0.05, 0.05],
            [0.3, 0.6, 0.1],
        ),
    }
    labels, confidence = combine_heads(probs, tiny_config)
    # bg; body only; liver vs spleen overlap -> spleen (0.8 > 0.7);
    # liver though body is surer (organs beat the enclosing body); left kidney
    assert labels.flatten().tolist() == [0, BODY, SPLEEN, LIVER, KIDNEY_LEFT]
    np.testing.assert_allclose(confidence.flatten().numpy(), [0.8, 0.9, 0.8, 0.9, 0.6])


def test_a_model_without_some_heads_still_combines(tiny_config: ModelConfig) -> None:
    labels, _ = combine_heads({"liver": _probs([0.2, 0.8], [0.7, 0.3])}, tiny_config)
    assert labels.flatten().tolist() == [LIVER, 0]
