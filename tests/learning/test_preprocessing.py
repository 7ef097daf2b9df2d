"""Input normalisation and resampling shared by training and inference."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dicom_node.learning.inference import segment_volume
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import build_model
from dicom_node.learning.preprocessing import (
    intensity_range,
    normalise,
    prepare_slices,
    resize_labels,
)
from dicom_node.learning.preprocessing_spec import Modality, Preprocessing


def test_ct_windows_map_to_minus_one_one_and_clip() -> None:
    pp = Preprocessing(ct_windows=((-1000.0, 1000.0), (-160.0, 240.0)))
    hu = torch.tensor([-2000.0, -1000.0, 0.0, 40.0, 240.0, 3000.0]).reshape(1, 1, 1, 6)
    x = normalise(hu, pp)
    assert x.shape == (1, 2, 1, 6)
    np.testing.assert_allclose(x[0, 0, 0].numpy(), [-1, -1, 0, 0.04, 0.24, 1], atol=1e-6)
    np.testing.assert_allclose(x[0, 1, 0].numpy(), [-1, -1, -0.2, 0, 1, 1], atol=1e-6)


def test_mr_uses_the_volume_percentiles() -> None:
    pp = Preprocessing(modality=Modality.MR, mr_percentiles=(0.0, 100.0))
    volume = np.linspace(100, 300, 2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    rng = intensity_range(volume, pp)
    assert rng == pytest.approx((100.0, 300.0))
    assert intensity_range(volume, Preprocessing()) is None  # CT: fixed windows
    x = normalise(torch.tensor([[[[100.0, 200.0, 300.0]]]]), pp, rng)
    np.testing.assert_allclose(x.flatten().numpy(), [-1, 0, 1], atol=1e-6)
    with pytest.raises(ValueError, match="percentile"):
        normalise(torch.zeros(1, 1, 1, 1), pp)


def test_prepare_slices_resamples_to_the_model_size() -> None:
    pp = Preprocessing(input_size=32)
    x = prepare_slices(np.zeros((3, 50, 70), np.int16), pp)
    assert x.shape == (3, 2, 32, 32) and x.dtype == torch.float32


def test_label_resampling_is_nearest_and_keeps_values() -> None:
    labels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    labels[0, :4, :4] = 5
    out = resize_labels(labels, (4, 4))
    assert out.dtype == torch.uint8
    assert set(out.unique().tolist()) == {0, 5}
    assert out[0, :2, :2].eq(5).all() and out[0, 2:, 2:].eq(0).all()


def test_an_mr_model_segments_an_mr_volume(tiny_config: ModelConfig) -> None:
    config = replace(tiny_config, preprocessing=Preprocessing(modality=Modality.MR, input_size=32))
    model = build_model(config)
    assert model.encoder.levels[0][0].in_channels == 1
    volume = np.random.default_rng(0).gamma(2.0, 100.0, (3, 40, 40)).astype(np.float32)
    result = segment_volume(model, config, volume)
    assert result.labels.shape == volume.shape
