"""An imported MONAI 3D network for the correction tests (issue 23, "bring your own
model"): a bundle laid out as MONAI writes one, made here from a real ``monai`` UNet
(tiny channels, a 4 mm grid and 32x32x16 windows: seconds on two cores), imported as
``tessera model import`` does, and corrected cases kept as the correction intake keeps
them for an external network (whole volumes)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import UNet

from dicom_node.learning.model_import import import_bundle
from dicom_node.learning.volume_samples import encode_volume_sample, volume_sample
from dicom_node.store.db import Database
from dicom_node.store.models import Correction, TrainingSample
from tests.corrections.helpers import Study, learning_section
from tests.node.conftest import node_config_data
from tests.node.test_segmentation import segment_rule

EXTERNAL_MODEL = "abdomen-monai-3d"
NET_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3,
            "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
MODEL_VALUES = {"liver": 1, "spleen": 2}  # output channels of the bundle
PHANTOM_VALUES = {"liver": 2, "spleen": 3}  # dicom_node.phantom.codes.CT_SEGMENTS


def monai_ct_bundle(root: Path) -> Path:
    """A liver + spleen CT bundle: RAS, 4 mm voxels, an abdominal window, windows of
    32x32x16 voxels; weights of a seeded, untrained UNet."""
    torch.manual_seed(11)
    net = UNet(**NET_ARGS).eval()  # type: ignore[arg-type]
    bundle = root / "abdomen_ct_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    inference = {
        "network_def": {"_target_": "monai.networks.nets.UNet", **NET_ARGS},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [4.0, 4.0, 4.0]},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -160,
             "a_max": 240, "b_min": 0.0, "b_max": 1.0, "clip": True},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 16],
                    "sw_batch_size": 4, "overlap": 0.25},
    }
    (bundle / "configs" / "inference.json").write_text(json.dumps(inference))
    metadata = {"name": "Abdomen CT", "network_data_format": {
        "inputs": {"image": {"modality": "CT", "num_channels": 1}},
        "outputs": {"pred": {"channel_def": {"0": "background", "1": "liver",
                                             "2": "spleen"}}}}}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    return bundle


def imported_monai_model(root: Path) -> Path:
    """The bundle imported under :data:`EXTERNAL_MODEL`; returns its safetensors file."""
    return import_bundle(monai_ct_bundle(root), root / "models", name=EXTERNAL_MODEL).path


def in_model_values(phantom_labels: np.ndarray) -> np.ndarray:
    """Phantom label values -> the model's (other structures are background)."""
    out = np.zeros(phantom_labels.shape, dtype=np.uint8)
    for name, value in MODEL_VALUES.items():
        out[phantom_labels == PHANTOM_VALUES[name]] = value
    return out


def add_volume_sample(db: Database, data_dir: Path, study: Study, state: str,
                      annotated: tuple[str, ...] = ("liver", "spleen"),
                      series_uid: str | None = None, model: str = EXTERNAL_MODEL) -> int:
    """A corrected case of ``study`` as the intake keeps it for a model trained on
    volumes (state ``held-out``: every validation_every-th correction; ``pending``: not
    trained yet), recorded as of series ``series_uid`` (the study's by default); returns
    the sample's id. Labels in the imported model's values for :data:`EXTERNAL_MODEL`,
    else the phantom's."""
    volume = study.volume()
    series_uid = series_uid or study.series_uid
    truth = study.truth_in_volume_order()
    sample = volume_sample(volume.pixels,
                           in_model_values(truth) if model == EXTERNAL_MODEL else truth,
                           annotated, volume.spacing, volume.affine)
    rel = f"samples/{uuid.uuid4().hex}.npz"
    data = encode_volume_sample(sample)
    (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    (data_dir / rel).write_bytes(data)
    split = "validation" if state == "held-out" else "train"
    with db.session() as s:
        correction = Correction(seg_sop_instance_uid=f"2.25.{uuid.uuid4().int}",
                                seg_series_uid=f"2.25.{uuid.uuid4().int}",
                                source_series_uid=series_uid,
                                model_name=model, ai_generation=0,
                                state="recorded", split=split, dice={},
                                changed_slices=[0], labels=list(annotated),
                                unknown_segments=[])
        s.add(correction)
        s.flush()
        row = TrainingSample(correction_id=correction.id, source_series_uid=series_uid,
                             model_name=model, split=split, state=state, path=rel,
                             slices=volume.shape[0], size=len(data),
                             annotated=list(annotated))
        s.add(row)
        s.flush()
        return int(row.id)


def node_models(data: dict[str, Any], model_path: Path, model: str = EXTERNAL_MODEL
                ) -> dict[str, Any]:
    data["models"] = {model: str(model_path)}
    return data


def segmenting_node_data(node_dir: Path, orthanc_port: int, model_path: Path,
                         model: str = EXTERNAL_MODEL) -> dict[str, Any]:
    """A node serving ``model`` from ``model_path`` to CT series, sending its SEG to the
    Orthanc at ``orthanc_port`` and serving any round that trains (margin 1)."""
    data = node_config_data(
        node_dir, rules=[segment_rule(model, "pacs")],
        destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                               "port": orthanc_port}},
        learning=learning_section(acceptance_margin=1.0))
    return node_models(data, model_path, model)
