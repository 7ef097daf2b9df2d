"""Unit tests of the pure parts of a learning round: touched slices, sample blobs, gate."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from dicom_node.learning.incremental import (
    accept_candidate,
    cut_sample,
    decode_sample,
    encode_sample,
    touched_slices,
    with_neighbours,
)
from dicom_node.learning.model_config import abdomen_ct_config


def test_touched_slices_compare_only_the_labels_the_correction_annotates() -> None:
    ai = np.zeros((5, 4, 4), np.uint8)
    corrected = np.zeros_like(ai)
    ai[1, 0, 0] = 3          # AI spleen; the correction has no spleen segment: not a change
    ai[2, 1, 1] = 2          # AI liver the radiologist removed
    corrected[4, 2, 2] = 2   # liver the radiologist added
    assert touched_slices(ai, corrected, [2]) == [2, 4]
    assert touched_slices(ai, corrected, [2, 3]) == [1, 2, 4]
    assert touched_slices(ai, ai.copy(), [2, 3]) == []


def test_neighbours_are_added_and_clipped() -> None:
    assert with_neighbours([0, 5], 2, 7) == [0, 1, 2, 3, 4, 5, 6]
    assert with_neighbours([3], 1, 10) == [2, 3, 4]
    assert with_neighbours([], 2, 10) == []


def test_sample_blob_round_trip_is_compact_and_pickle_free() -> None:
    config = abdomen_ct_config()
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 300, (20, 64, 64)).astype(np.float32)
    labels = (rng.random((20, 64, 64)) > 0.7).astype(np.uint8) * 2
    sample = cut_sample(volume, labels, [3, 4, 5], ["liver"], config)
    data = encode_sample(sample)
    assert len(data) < volume[3:6].nbytes  # int16 + compression
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert all(n.endswith(".npy") for n in z.namelist())
    back = decode_sample(data)
    assert back.annotated == ("liver",) and back.mr_range is None
    assert np.array_equal(back.slices, [3, 4, 5])
    assert np.array_equal(back.labels, labels[3:6])
    assert np.abs(back.image - volume[3:6]).max() <= 0.5
    slices = back.slice_samples()
    assert len(slices) == 3 and slices[0].annotated == frozenset({"liver"})


@pytest.mark.parametrize(("base", "cand", "ok"), [
    (0.80, 0.795, True),    # within the margin
    (0.80, 0.78, False),    # fell by more than the margin
    (0.80, 0.85, True),
])
def test_the_gate_rejects_a_drop_larger_than_the_margin(base: float, cand: float,
                                                        ok: bool) -> None:
    accepted, why = accept_candidate({"mean": base}, {"mean": cand}, 0.01)
    assert accepted is ok, why


def test_the_gate_accepts_without_held_out_cases_and_says_so() -> None:
    accepted, why = accept_candidate(None, None, 0.01)
    assert accepted and "no held-out" in why
