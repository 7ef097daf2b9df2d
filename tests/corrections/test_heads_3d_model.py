"""Heads on a 3D MONAI encoder serve and learn per head, end to end through the SCP into
a real Orthanc (issue 23: partial labels and the head/encoder split on a 3D MONAI
network).

A radiologist corrects only the liver: the node keeps the whole corrected volume, trains
the encoder and ``heads.liver`` on windows of it (the other heads bit-identical), judges
the candidate on a held-out volume with the sliding-window segmentation, serves it, and
the update carries only the groups the round changed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from sqlalchemy import select

from dicom_node.learning.continual import head_groups_changed
from dicom_node.learning.model_config import UNetHyperparameters, abdomen_ct_config
from dicom_node.learning.monai_heads import with_monai_unet_encoder
from dicom_node.learning.network import build_model
from dicom_node.learning.preprocessing_spec import (
    IntensityStep,
    Modality,
    Preprocessing,
    VolumePreprocessing,
)
from dicom_node.learning.volume_samples import decode_volume_sample
from dicom_node.learning.weights import group_of, save_model
from dicom_node.phantom.codes import CT_SEGMENTS
from dicom_node.store.models import TrainingSample, UpdateOutboxItem
from tests.corrections.external_model import add_volume_sample, segmenting_node_data
from tests.corrections.helpers import Study, radiologist_seg, versions
from tests.node.conftest import (  # noqa: F401 - orthanc is a pytest fixture
    Orthanc,
    orthanc,
    storescu,
    wait_swapped,
    wait_until,
)
from tests.node.test_segmentation import orthanc_segs

MODEL = "abdomen-heads-3d"
LIVER = [s for s in CT_SEGMENTS if s.name == "liver"]


def heads_3d_model(root: Path) -> Path:
    """The starter's heads on a tiny 3D MONAI UNet (seeded, untrained): RAS, 4 mm
    voxels, an abdominal window, windows of 32x32x16 voxels."""
    torch.manual_seed(5)
    volume = VolumePreprocessing(orientation="RAS", spacing=(4.0, 4.0, 4.0),
                                 intensity=(IntensityStep("window", -160, 240),),
                                 roi_size=(32, 32, 16))
    config = replace(abdomen_ct_config(name=MODEL),
                     preprocessing=Preprocessing(modality=Modality.CT, volume=volume),
                     hyperparameters=UNetHyperparameters(norm_groups=4))
    config = with_monai_unet_encoder(config, features=8, channels=(8, 16), spatial_dims=3)
    return save_model(build_model(config), config, root / "models" / MODEL / "model.safetensors")


@pytest.mark.slow
def test_a_liver_correction_trains_the_3d_encoder_and_the_liver_head_only(
        tmp_path: Path, start_node: Any, orthanc: Orthanc) -> None:  # noqa: F811
    node = start_node(segmenting_node_data(tmp_path / "node", orthanc.dicom_port,
                                           heads_3d_model(tmp_path), MODEL))
    study = Study("B", 0, seed=7400, slices=24)
    add_volume_sample(node.parts.db, tmp_path / "node", study, "held-out", ("liver", "spleen"),
                      series_uid=f"2.25.{uuid.uuid4().int}", model=MODEL)
    served = {k: v.clone() for k, v in node.parts.models.get(MODEL)[0].state_dict().items()}

    assert storescu(node.port, *study.write(tmp_path / "study")).returncode == 0
    [ai_seg] = wait_until(lambda: orthanc_segs(orthanc), timeout=120, interval=0.5,
                          what="the AI SEG in Orthanc")
    assert len(ai_seg.SegmentSequence) >= 1

    seg_path, drawn = radiologist_seg(study, tmp_path / "corr" / "seg.dcm", specs=LIVER)
    assert storescu(node.port, seg_path, options=("-R",)).returncode == 0
    version = wait_until(lambda: next((v for v in versions(node) if v.origin == "local"),
                                      None), timeout=120, what="a round of the 3D heads")
    assert (version.generation, version.state) == (1, "serving")
    wait_swapped(node, MODEL, 1)
    metrics = version.metrics
    assert metrics["trained_groups"] == ["encoder", "heads.liver"]
    assert metrics["held_out"]["cases"] == 1 and "liver" in metrics["held_out"]["candidate"]
    assert metrics["training"]["volumes"] == 1 and metrics["training"]["steps"] >= 1

    # the sample is the whole corrected volume, liver only
    with node.parts.db.session() as s:
        row = s.execute(select(TrainingSample).where(
            TrainingSample.state == "trained")).scalar_one()
    sample = decode_volume_sample((tmp_path / "node" / row.path).read_bytes())
    assert sample.annotated == {"liver"} and sample.image.shape == study.volume().shape
    np.testing.assert_array_equal(sample.labels == 2, drawn == 2)

    # served now: encoder and liver head moved, the other heads bit-identical
    now = node.parts.models.get(MODEL)[0].state_dict()
    assert head_groups_changed(served, now) == {"encoder", "heads.liver"}
    with node.parts.db.session() as s:
        item = s.execute(select(UpdateOutboxItem)).scalar_one()
    assert json.loads(item.meta["trained_groups"]) == ["encoder", "heads.liver"]
    tensors = load_file(item.path)
    assert {group_of(k) for k in tensors} == {"encoder", "heads.liver"}
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, now[name].numpy())
