"""Test radiologists: ground truth of phantom series written as another vendor's SEG.

Two writers: highdicom (own UIDs, another manufacturer, segments in another order,
one label renamed, one segment the model does not know) and dcmqi's
``itkimage2segimage`` from a NIfTI label image plus a JSON metainfo.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select

from dicom_node.learning.model_config import (
    ModelConfig,
    UNetHyperparameters,
    abdomen_ct_config,
)
from dicom_node.learning.network import build_model
from dicom_node.learning.weights import save_model
from dicom_node.phantom.codes import CT_SEGMENTS
from dicom_node.phantom.ct import generate_subject
from dicom_node.phantom.dicom import subject_datasets
from dicom_node.pipeline.seg import SegAlgorithm, SegAlgorithmType, SegmentSpec, build_seg
from dicom_node.pipeline.volume import Volume, build_volume
from dicom_node.store.models import Correction, Instance, ModelVersion, Segmentation
from tests.node.conftest import storescu, wait_until
from tests.peers import missing, require_binary, venv_tool

TEST_MODEL = "tessera-test-ct"
TUMOUR = SegmentSpec.from_rgb(9, "lesion", codes.SCT.MorphologicallyAbnormalStructure,
                              Code("108369006", "SCT", "Neoplasm"), (250, 250, 0))


def tiny_model(folder: Path, name: str = TEST_MODEL, monai_encoder: bool = False) -> Path:
    """A small untrained model: fast on two cores; learning only has to run, not shine.
    ``monai_encoder``: a MONAI UNet as the encoder of the same heads
    (``monai-heads:UNet``) instead of our U-Net's."""
    from dataclasses import replace

    config: ModelConfig = replace(
        abdomen_ct_config(input_size=64, name=name),
        hyperparameters=UNetHyperparameters(channels=(8, 16, 32), norm_groups=4))
    if monai_encoder:
        from dicom_node.learning.monai_heads import with_monai_unet_encoder

        config = with_monai_unet_encoder(config, features=8, channels=(8, 16, 32))
    return save_model(build_model(config), config, folder / f"{name}.safetensors")


def learning_section(**extra: Any) -> dict[str, Any]:
    # rehearsal off: its anchor gate would judge an untrained model on the phantom
    # (tests/learning/test_rehearsal.py covers it)
    base = {"threads": 2, "neighbour_slices": 1, "validation_every": 0,
            "replay_max_slices": 200,
            "round": {"epochs": 1, "batch_size": 8, "time_budget_s": 30},
            "rehearsal": {"site": ""}}
    base.update(extra)
    return base


def segment_rule(model: str = TEST_MODEL, **match: Any) -> dict[str, Any]:
    return {"name": "segment", "action": "segment", "model": model, "destinations": [],
            "match": match or {"modality": ["CT"]}}


class Study:
    """A phantom study cut to a contiguous block of slices through the organs."""

    def __init__(self, site: str, index: int, seed: int, slices: int = 32) -> None:
        subject = generate_subject(site, index, seed)
        organs = np.flatnonzero((subject.labels > 1).reshape(subject.labels.shape[0], -1)
                                .any(axis=1))
        start = max(0, int(organs.mean()) - slices // 2)
        self.datasets = subject_datasets(subject)[start:start + slices]
        self.labels = subject.labels[start:start + slices]
        self.series_uid = str(self.datasets[0].SeriesInstanceUID)

    def write(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, ds in enumerate(self.datasets):
            path = folder / f"{i:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths

    def volume(self) -> Volume:
        return build_volume(self.datasets)

    def truth_in_volume_order(self) -> np.ndarray:
        order = {str(ds.SOPInstanceUID): k for k, ds in enumerate(self.datasets)}
        vol = self.volume()
        return self.labels[[order[u] for u in vol.sop_instance_uids]]


def radiologist_seg(study: Study, path: Path, labels: np.ndarray | None = None,
                    specs: Sequence[SegmentSpec] | None = None,
                    volume: Volume | None = None, author: str = "ViewerCo Annotate",
                    ) -> tuple[Path, np.ndarray]:
    """Ground truth as another vendor's MANUAL SEG: reversed segment order, a renamed
    label (matched by code), plus an unknown "lesion" segment.

    Returns the file and the label volume written (lesion voxels as ``TUMOUR.label``).
    """
    volume = volume or study.volume()
    labels = study.truth_in_volume_order() if labels is None else labels
    if specs is None:
        renamed = [SegmentSpec(s.label, "Leber" if s.name == "liver" else s.name, s.category,
                               s.property_type, s.color_lab, s.modifier) for s in CT_SEGMENTS]
        specs = [*reversed(renamed), TUMOUR]
        labels = labels.copy()
        labels[(labels == 2) & (np.indices(labels.shape)[1] % 17 == 0)
               & (np.indices(labels.shape)[2] % 19 == 0)] = TUMOUR.label
    seg = build_seg(volume, labels, specs,
                    SegAlgorithm(author, 0, SegAlgorithmType.MANUAL),
                    manufacturer="ViewerCo", device_serial_number="viewer-7",
                    series_description="Corrected segmentation")
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path, labels


def highdicom_seg(volume: Volume, pixels: np.ndarray, specs: Sequence[SegmentSpec], kind: str,
                  transfer_syntax: str = ExplicitVRLittleEndian, **extra: Any,
                  ) -> pydicom.Dataset:
    """A MANUAL SEG of ``kind`` (BINARY, FRACTIONAL, LABELMAP) written by highdicom, as
    read back from its bytes. Segments are numbered 1..N in ``specs`` order (a label
    map's pixel values are those numbers); modifiers go into the property type."""
    import highdicom as hd

    descriptions = []
    for number, spec in enumerate(specs, start=1):
        desc = hd.seg.SegmentDescription(
            segment_number=number, segment_label=spec.name,
            segmented_property_category=spec.category,
            segmented_property_type=spec.property_type, algorithm_type="MANUAL")
        if spec.modifier is not None:
            desc.SegmentedPropertyTypeCodeSequence[0]\
                .SegmentedPropertyTypeModifierCodeSequence = [
                    hd.sr.CodedConcept.from_code(spec.modifier)]
        descriptions.append(desc)
    seg = hd.seg.Segmentation(
        source_images=list(volume.datasets), pixel_array=pixels, segmentation_type=kind,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(),
        series_number=300, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="ViewerCo", manufacturer_model_name="Annotate", software_versions="1",
        device_serial_number="7", transfer_syntax_uid=transfer_syntax, **extra)
    buf = io.BytesIO()
    seg.save_as(buf)
    buf.seek(0)
    return pydicom.dcmread(buf)


def send_corrected_study(node: Any, study: Study, folder: Path) -> Path:
    """Study in by C-STORE, the node's AI SEG awaited, then the radiologist's SEG
    (:func:`radiologist_seg`: every organ drawn) sent back with ``storescu -R``.

    Writes ``folder/study`` and ``folder/seg.dcm``; returns the SEG file.
    """
    assert storescu(node.port, *study.write(folder / "study")).returncode == 0
    wait_until(lambda: segmentation_of(node, study.series_uid), timeout=120,
               what="the AI segmentation")
    seg_path, _ = radiologist_seg(study, folder / "seg.dcm")
    assert storescu(node.port, seg_path, options=("-R",)).returncode == 0
    return seg_path


def store_with_pynetdicom(port: int, *paths: Path, called_ae: str = "TESSERA") -> list[int]:
    """C-STORE files with a pynetdicom AE, one presentation context per SOP class and
    transfer syntax of the files (dcmtk 3.6.7 cannot send Label Map SEG). Returns the
    status of each C-STORE."""
    from pynetdicom import AE

    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title="VIEWER")
    for context in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                           for ds in datasets}):
        ae.add_requested_context(*context)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established, "the node refused the association"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


# -- dcmjs -----------------------------------------------------------------------------
JS_DIR = Path(__file__).resolve().parents[1] / "js"


def dcmjs_seg(study: Study, sources: Sequence[Path], labels: np.ndarray,
              segment_labels: Sequence[str], out: Path) -> Path:
    """A SEG written by dcmjs's Cornerstone adapter as OHIF saves one: every segment
    "Tissue" (SRT T-D0050) with a typed label, RLE Lossless (tests/js/write_seg.js).

    ``sources`` are the files of ``study.datasets`` (in that order), ``labels`` the label
    volume in volume order with pixel value n for ``segment_labels[n - 1]``.
    """
    node = require_binary("node")
    if not (JS_DIR / "node_modules" / "dcmjs").is_dir():
        missing("dcmjs is not installed: run `make js`")
    volume = study.volume()
    order = [volume.index_of(str(ds.SOPInstanceUID)) for ds in study.datasets]
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_suffix(".labels.raw")
    raw.write_bytes(np.ascontiguousarray(labels[order], dtype=np.uint8).tobytes())
    spec = out.with_suffix(".json")
    spec.write_text(json.dumps({"sources": [str(p) for p in sources], "labels": str(raw),
                                "segments": list(segment_labels)}))
    result = subprocess.run([node, str(JS_DIR / "write_seg.js"), str(spec), str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and out.exists(), result.stderr[-2000:]
    return out


# -- dcmqi ----------------------------------------------------------------------------
def write_nifti(path: Path, data_ijk: np.ndarray, affine_ras: np.ndarray) -> None:
    """A minimal NIfTI-1 (.nii.gz) writer: uint8 data, sform and qform from the affine."""
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    dims = [3, *data_ijk.shape, 1, 1, 1, 1]
    struct.pack_into("<8h", hdr, 40, *dims)
    struct.pack_into("<h", hdr, 70, 2)  # datatype uint8
    struct.pack_into("<h", hdr, 72, 8)  # bitpix
    zooms = np.sqrt((affine_ras[:3, :3] ** 2).sum(axis=0))
    struct.pack_into("<8f", hdr, 76, 1.0, *zooms, 0, 0, 0, 0)
    struct.pack_into("<f", hdr, 108, 352.0)  # vox_offset
    struct.pack_into("<f", hdr, 112, 1.0)  # scl_slope
    struct.pack_into("<B", hdr, 123, 2)  # xyzt_units: mm
    struct.pack_into("<h", hdr, 252, 0)  # qform_code
    struct.pack_into("<h", hdr, 254, 1)  # sform_code scanner
    for row in range(3):
        struct.pack_into("<4f", hdr, 280 + 16 * row, *affine_ras[row])
    hdr[344:348] = b"n+1\x00"
    body = bytes(hdr) + b"\x00" * 4 + np.asfortranarray(data_ijk.astype(np.uint8)).tobytes(
        order="F")
    path.write_bytes(gzip.compress(body))


def dcmqi_seg(study: Study, series_dir: Path, out: Path, *, segmentation_type: str = "binary",
              generic_labels: bool = False) -> Path:
    """The study's ground truth written by dcmqi's itkimage2segimage.

    Kidneys are coded as Kidney + laterality modifier, as dcmqi and 3D Slicer do.
    ``segmentation_type`` "labelmap" writes a Label Map SEG; ``generic_labels`` names
    every segment "Segment_<n>" (Slicer's default), so only the codes say what it is.
    """
    exe = venv_tool("itkimage2segimage")
    volume = study.volume()
    labels = study.truth_in_volume_order()  # (k, r, c)
    data_ijk = np.transpose(labels, (2, 1, 0))  # i = column, j = row, k = slice
    lps = np.eye(4)
    lps[:3, 0] = volume.affine[:3, 2]
    lps[:3, 1] = volume.affine[:3, 1]
    lps[:3, 2] = volume.affine[:3, 0]
    lps[:3, 3] = volume.affine[:3, 3]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    work = out.parent
    work.mkdir(parents=True, exist_ok=True)
    nifti = work / "labels.nii.gz"
    write_nifti(nifti, data_ijk, ras)
    segments = []
    # dcmqi numbers segments by labelID order; list them in another order than the node
    for spec in sorted(CT_SEGMENTS, key=lambda s: -s.label):
        item: dict[str, Any] = {
            "labelID": spec.label, "SegmentDescription": spec.name,
            "SegmentLabel": f"Segment_{spec.label}" if generic_labels else spec.name,
            "SegmentAlgorithmType": "MANUAL",
            "SegmentedPropertyCategoryCodeSequence": _code(spec.category),
            "SegmentedPropertyTypeCodeSequence": _code(spec.property_type),
            "recommendedDisplayRGBValue": [200, 100, 50],
        }
        if spec.modifier is not None:
            item["SegmentedPropertyTypeModifierCodeSequence"] = _code(spec.modifier)
        segments.append(item)
    meta = {"ContentCreatorName": "Reader^Test", "ClinicalTrialSeriesID": "1",
            "ClinicalTrialTimePointID": "1", "SeriesDescription": "dcmqi correction",
            "SeriesNumber": "300", "InstanceNumber": "1", "BodyPartExamined": "ABDOMEN",
            "segmentAttributes": [segments]}
    meta_path = work / "meta.json"
    meta_path.write_text(json.dumps(meta))
    result = subprocess.run(
        [exe, "--inputImageList", str(nifti), "--inputDICOMDirectory", str(series_dir),
         "--outputDICOM", str(out), "--inputMetadata", str(meta_path),
         "--segmentationType", segmentation_type],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out


def _code(code: Code) -> dict[str, str]:
    return {"CodeValue": code.value, "CodingSchemeDesignator": code.scheme_designator,
            "CodeMeaning": code.meaning}


# -- index queries -------------------------------------------------------------------
def segmentation_of(node: Any, series_uid: str, generation: int | None = None) -> Any:
    with node.parts.db.session() as s:
        q = select(Segmentation).where(Segmentation.series_uid == series_uid)
        if generation is not None:
            q = q.where(Segmentation.generation == generation)
        return s.execute(q).scalars().first()


def correction_for(node: Any, seg_sop_uid: str) -> Correction | None:
    with node.parts.db.session() as s:
        return s.execute(select(Correction).where(
            Correction.seg_sop_instance_uid == seg_sop_uid)).scalar_one_or_none()


def stored_dataset(node: Any, sop_uid: str) -> pydicom.Dataset:
    with node.parts.db.session() as s:
        rel = s.execute(select(Instance.path).where(
            Instance.sop_instance_uid == sop_uid)).scalar_one()
    return pydicom.dcmread(node.parts.files.absolute(rel))


def versions(node: Any) -> list[ModelVersion]:
    with node.parts.db.session() as s:
        return list(s.execute(select(ModelVersion).order_by(ModelVersion.generation)).scalars())


def half_matrix(study: Study) -> list[pydicom.Dataset]:
    """The same instances (UIDs) at half the matrix: a SEG on them has other geometry."""
    out = []
    for ds in study.datasets:
        small = copy.deepcopy(ds)
        arr = ds.pixel_array[::2, ::2].copy()
        small.Rows, small.Columns = arr.shape
        small.PixelSpacing = [float(v) * 2 for v in ds.PixelSpacing]
        small.PixelData = arr.tobytes()
        out.append(small)
    return out
