"""Whole-volume samples of external networks, and one held-out score for both kinds of
sample (``learning.evaluation.evaluate_samples``)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from dicom_node.learning.evaluation import decode_any_sample, evaluate_samples
from dicom_node.learning.incremental import (
    StoredSample,
    cut_sample,
    encode_sample,
    evaluate_slices,
)
from dicom_node.learning.scores import dice
from dicom_node.learning.volume_inference import segment_any
from dicom_node.learning.volume_samples import (
    VolumeSample,
    decode_volume_sample,
    encode_volume_sample,
    volume_sample,
)
from dicom_node.learning.weights import load_model
from tests.corrections.external_model import imported_monai_model
from tests.corrections.helpers import tiny_model

AFFINE = np.array([[0.0, 0.0, 2.0, -40.0], [0.0, 2.0, 0.0, -40.0],
                   [4.0, 0.0, 0.0, 10.0], [0.0, 0.0, 0.0, 1.0]])


def _case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(-200, 300, size=(12, 40, 40)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[3:9, 10:25, 10:25] = 1
    labels[4:8, 28:36, 5:15] = 2
    image[labels == 1] += 400
    return image, labels


def test_a_volume_sample_round_trips_compact_and_pickle_free() -> None:
    image, labels = _case()
    sample = volume_sample(image, labels, ["liver"], (4.0, 2.0, 2.0), AFFINE)
    assert sample.image.dtype == np.int16  # HU fit: stored as integers
    data = encode_volume_sample(sample)
    back = decode_any_sample(data)
    assert isinstance(back, VolumeSample)
    np.testing.assert_array_equal(back.image, image)
    np.testing.assert_array_equal(back.labels, labels)
    np.testing.assert_allclose(back.affine, AFFINE)
    assert back.spacing == (4.0, 2.0, 2.0) and back.annotated == {"liver"}
    assert len(data) < image.size * 3  # compressed: int16 + uint8 are 3 bytes a voxel
    fractional = volume_sample(image + 0.25, labels, ["liver"], (4.0, 2.0, 2.0), AFFINE)
    assert fractional.image.dtype == np.float32
    # a slice sample is not a volume sample; an object array would need unpickling
    slices = encode_sample(StoredSample(image[:2].astype(np.int16), labels[:2],
                                        np.arange(2), ("liver",)))
    assert isinstance(decode_any_sample(slices), StoredSample)
    with pytest.raises(ValueError, match="not a volume sample"):
        decode_volume_sample(slices)
    buffer = io.BytesIO()
    np.savez(buffer, image=np.array([object()]), labels=labels, affine=AFFINE,
             meta=np.frombuffer(b'{"format": "tessera-volume-sample/1"}', np.uint8))
    with pytest.raises(ValueError):
        decode_volume_sample(buffer.getvalue())


def test_held_out_scores_are_one_pooled_dice_for_slices_and_volumes(tmp_path: Path) -> None:
    unet, unet_config = load_model(tiny_model(tmp_path))
    image, labels = _case(1)
    cut = cut_sample(image, labels, range(2, 10), ["liver"], unet_config)
    assert evaluate_samples(unet, unet_config, [cut]) == evaluate_slices(unet, unet_config,
                                                                         [cut])
    net, config = load_model(imported_monai_model(tmp_path))  # liver 1, spleen 2
    cases = [volume_sample(*_case(seed), ["liver", "spleen"], (4.0, 2.0, 2.0), AFFINE)
             for seed in (2, 3)]
    scores = evaluate_samples(net, config, cases)
    predicted = [segment_any(net, config, c.image.astype(np.float32), c.spacing,
                             affine=c.affine).labels for c in cases]
    for name, value in (("liver", 1), ("spleen", 2)):
        pred = np.concatenate([p == value for p in predicted])
        truth = np.concatenate([c.labels == value for c in cases])
        assert scores[name] == pytest.approx(dice(pred, truth))
    assert scores["mean"] == pytest.approx((scores["liver"] + scores["spleen"]) / 2)
    only_liver = [VolumeSample(c.image, c.labels, frozenset({"liver"}), c.spacing, c.affine)
                  for c in cases]
    assert set(evaluate_samples(net, config, only_liver)) == {"liver", "mean"}
