"""The shipped starter model loads and segments fresh site-A subjects with Dice >= 0.90."""

from __future__ import annotations

import numpy as np

from dicom_node.learning.bootstrap import STARTER_DIR, evaluate
from dicom_node.learning.weights import load_model

# The bootstrap trains on seed 0 (indexes 0..15, held out 16..18); these seeds were never seen.
FRESH_SEED = 4242


def test_starter_files_are_small_and_describe_themselves() -> None:
    weights, sidecar = STARTER_DIR / "model.safetensors", STARTER_DIR / "model.json"
    assert weights.exists() and sidecar.exists(), "run `tessera model bootstrap` to ship it"
    assert weights.stat().st_size + sidecar.stat().st_size < 10 * 1024 * 1024
    _, config = load_model(weights)
    assert config.name == "tessera-abdomen-ct" and config.generation == 0
    assert config.label("liver").code == "10200004"
    assert config.label("kidney_right").code == "9846003"


def test_starter_reaches_dice_090_on_fresh_site_a_subjects() -> None:
    model, config = load_model(STARTER_DIR / "model.safetensors")
    mean, per_subject = evaluate(model, config, "A", [0, 1], seed=FRESH_SEED)
    assert len(per_subject) == 2
    assert mean["mean"] >= 0.90, mean
    assert all(np.mean(list(d.values())) >= 0.85 for d in per_subject), per_subject
