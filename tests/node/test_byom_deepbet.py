"""A real pretrained model on real anatomy, end to end (issue 23).

deepbet (PyPI, MIT) ships a TorchScript 3D U-Net for brain extraction from T1 MR in its
wheel. It is imported with ``tessera model import`` (installed locally by sha256), a
Colin27 T1 head (Debian mricron-data, written as a DICOM MR series by the phantom
writer) goes to a real node by storescu, and the SEG "Brain" that arrives in a real
Orthanc passes dciodvfy and dcmqi and agrees with the brain mask of the AAL atlas.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicom_node.learning.external import sha256_file
from dicom_node.learning.scores import dice_per_label
from dicom_node.phantom.dicom import subject_datasets
from dicom_node.phantom.mr_atlas import generate_subject
from dicom_node.phantom.nifti import read_nifti
from dicom_node.pipeline.seg_read import read_seg_labels
from dicom_node.pipeline.segmentation import segment_specs
from dicom_node.pipeline.volume import build_volume
from tests.node.conftest import Orthanc, node_config_data, storescu, tessera, wait_until
from tests.node.test_segmentation import orthanc_segs, segment_rule, write_series
from tests.peers import require_binary, venv_tool

# What deepbet's bet.py does, as our preprocessing: RAS+, the 0.5-99.5 percentiles to
# [0, 1], z-score, then x * 0.226 + 0.449; its input is a 256-cube crop around the brain,
# ours the whole field of view on a 224-cube grid, in one window (no bounding-box model).
DEEPBET = {
    "modality": "MR", "spatial_dims": 3, "in_channels": 1, "output": "probabilities",
    "labels": {"1": "brain"},
    "preprocessing": {
        "orientation": "RAS", "shape": [224, 224, 224], "roi_size": [224, 224, 224],
        "intensity": [{"op": "percentiles", "lower": 0.5, "upper": 99.5}, {"op": "zscore"},
                      {"op": "affine", "scale": 0.226, "offset": 0.449}]},
}
DICE_FLOOR = 0.85  # measured 0.873 against the AAL brain (which has no brainstem)


def deepbet_model() -> Path:
    """``data/models/model.pt`` of the installed distribution (a top-level ``data/``)."""
    try:
        dist = importlib.metadata.distribution("deepbet")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("deepbet is not installed (it is in the test extra)", pytrace=False)
    for file in dist.files or ():
        if file.as_posix().endswith("data/models/model.pt"):
            return Path(str(dist.locate_file(file)))
    pytest.fail("deepbet's wheel has no data/models/model.pt", pytrace=False)


@pytest.mark.slow
def test_imported_deepbet_segments_a_real_brain_through_the_node(
        tmp_path: Path, start_node: Any, orthanc: Orthanc) -> None:
    script = deepbet_model()
    description = tmp_path / "deepbet.json"
    description.write_text(json.dumps(DEEPBET))
    models = tmp_path / "models"
    result = tessera("model", "import", str(script), "--labels", str(description),
                     "--out", str(models), "--name", "deepbet-brain", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    model_path = models / "deepbet-brain" / "model.safetensors"
    config = json.loads(model_path.with_suffix(".json").read_text())
    assert config["architecture"] == f"torchscript:{sha256_file(script)}"

    data = node_config_data(
        tmp_path / "node",
        destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                               "port": orthanc.dicom_port}},
        rules=[segment_rule("deepbet-brain", "pacs", modality=["MR"])])
    data["models"] = {"deepbet-brain": str(model_path)}
    node = start_node(data)
    subject = generate_subject("A", 0, seed=7101)
    datasets = subject_datasets(subject)
    sent = storescu(node.port, *write_series(datasets, tmp_path / "series"))
    assert sent.returncode == 0, sent.stderr

    segs = wait_until(lambda: orthanc_segs(orthanc), timeout=240, interval=1.0,
                      what="the SEG in Orthanc")
    seg = segs[0]
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "brain"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "12738006"
    _, mconfig = node.parts.models.get("deepbet-brain")
    volume = build_volume(datasets)
    labels, _ = read_seg_labels(seg, volume, segment_specs(mconfig))
    truth = (subject.labels > 0).astype(np.uint8)  # the closed, filled AAL brain
    dice = dice_per_label(labels, truth, {"brain": 1})["brain"]
    print(f"deepbet vs AAL brain: Dice {dice:.3f}")
    assert dice >= DICE_FLOOR, dice

    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    checked = subprocess.run([require_binary("dciodvfy"), "-new", str(path)],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr[-2000:]
    out = tmp_path / "dcmqi"
    out.mkdir()
    subprocess.run([venv_tool("segimage2itkimage"), "--inputDICOM", str(path),
                    "--outputDirectory", str(out), "--outputType", "nifti"],
                   capture_output=True, text=True, check=True, timeout=120)
    assert int((read_nifti(out / "1.nii.gz").data > 0).sum()) == int(labels.sum())
