"""Write a :class:`PhantomSubject` as a DICOM series (CT or MR Image Storage) plus GT SEG.

UIDs are derived from (modality, site, index, seed): the study and the frame of reference are
shared by every acquisition plane of a subject (they image the same patient space), the
series and instances differ per modality and plane. Writing the same subject twice gives
the same UIDs.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from dicom_node.phantom.subject import Orientation, PhantomSubject
from dicom_node.pipeline.seg import (
    SegAlgorithm,
    SegAlgorithmType,
    SegmentSpec,
    build_seg,
    deterministic_uid,
)
from dicom_node.pipeline.volume import build_volume

LOGGER = logging.getLogger(__name__)

GROUND_TRUTH_ALGORITHM = "tessera-phantom-ground-truth"
CT_INTERCEPT = -1024.0
_PLANE_SERIES_NUMBER = {Orientation.AXIAL: 2, Orientation.SAGITTAL: 3, Orientation.CORONAL: 4}
_BASE_DATE = datetime.date(2024, 1, 1)


def _uid(subject: PhantomSubject, *parts: object) -> str:
    return deterministic_uid(
        "tessera-phantom", subject.modality, subject.site, subject.index, subject.seed, *parts
    )


def study_uid(subject: PhantomSubject) -> str:
    return _uid(subject, "study")


def series_uid(subject: PhantomSubject) -> str:
    return _uid(subject, "series", subject.orientation.value)


def subject_datasets(subject: PhantomSubject) -> list[Dataset]:
    """One single-frame dataset per slice, in slice order (increasing along the normal)."""
    is_ct = subject.modality == "CT"
    series = _SeriesIds(
        date=(_BASE_DATE + datetime.timedelta(days=subject.index)).strftime("%Y%m%d"),
        study=study_uid(subject),
        series=series_uid(subject),
        frame_of_reference=_uid(subject, "study", "frame-of-reference"),
    )
    positions = subject.slice_positions()
    stored = _stored_pixels(subject, is_ct)
    datasets = []
    for k in range(subject.image.shape[0]):
        ds = _identified_slice(subject, k, series, is_ct)
        _place_slice(ds, subject, positions[k], series.frame_of_reference)
        _pixel_attributes(ds, subject, stored[k], is_ct)
        datasets.append(ds)
    return datasets


class _SeriesIds(NamedTuple):
    """What every slice of a subject's series shares: its date and UIDs."""

    date: str
    study: str
    series: str
    frame_of_reference: str


def _stored_pixels(subject: PhantomSubject, is_ct: bool) -> np.ndarray:
    """Stored values: CT shifted by the rescale intercept into 12 bits, MR as is."""
    if is_ct:
        stored = (subject.image.astype(np.int32) - int(CT_INTERCEPT)).clip(0, 4095)
    else:
        stored = subject.image.astype(np.int32).clip(0, 65535)
    return stored.astype(np.uint16)


def _identified_slice(subject: PhantomSubject, k: int, series: _SeriesIds,
                      is_ct: bool) -> Dataset:
    """Slice ``k`` with its file meta, patient, study, series and instance identity."""
    sop_class = CTImageStorage if is_ct else MRImageStorage
    ds = Dataset()
    sop = UID(_uid(subject, "instance", subject.orientation.value, k))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if is_ct else "OTHER"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = series.date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "090000"
    ds.AccessionNumber = f"PH{subject.site}{subject.index:05d}"
    ds.Modality = subject.modality
    ds.Manufacturer = str(subject.acquisition.get("manufacturer", "Tessera Phantom"))
    ds.InstitutionName = f"Phantom site {subject.site}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"Phantom {subject.body_part.lower()} {subject.modality}"
    ds.SeriesDescription = f"Phantom {subject.modality} {subject.orientation.value}"
    ds.PatientName = f"Phantom^{subject.site}{subject.index:04d}"
    ds.PatientID = f"PHANTOM-{subject.subject_id}-{subject.seed}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = subject.body_part
    ds.StudyInstanceUID = series.study
    ds.SeriesInstanceUID = series.series
    ds.StudyID = f"{subject.index:04d}"
    ds.SeriesNumber = _PLANE_SERIES_NUMBER[subject.orientation] + (0 if is_ct else 10)
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = k + 1
    return ds


def _place_slice(ds: Dataset, subject: PhantomSubject, position: np.ndarray,
                 frame_of_reference: str) -> None:
    """The slice's place in patient space: position, orientation, thickness."""
    ds.SliceThickness = f"{subject.spacing[0]:.4g}"
    ds.SpacingBetweenSlices = f"{subject.spacing[0]:.4g}"
    ds.PatientPosition = "HFS"
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in subject.orientation_cosines]
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(float(position @ subject.normal))


def _pixel_attributes(ds: Dataset, subject: PhantomSubject, stored: np.ndarray,
                      is_ct: bool) -> None:
    """Image pixel module, the CT or MR acquisition attributes, then the pixels."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.PixelSpacing = [_ds(subject.spacing[1]), _ds(subject.spacing[2])]
    ds.BitsAllocated = 16
    ds.BitsStored = 12 if is_ct else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if is_ct:
        ds.KVP = _ds(float(subject.acquisition.get("kvp", 120.0)))
        ds.RescaleIntercept = _ds(CT_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.ConvolutionKernel = "STANDARD"
    else:
        _mr_attributes(ds, subject)
    ds.PixelData = stored.tobytes()


def _mr_attributes(ds: Dataset, subject: PhantomSubject) -> None:
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = "SP"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D"
    ds.RepetitionTime = "9.7"
    ds.EchoTime = "4"
    ds.EchoTrainLength = 1
    ds.MagneticFieldStrength = str(subject.acquisition.get("field_t", "1.5"))
    ds.FlipAngle = "12"
    ds.ImagingFrequency = "63.9"
    ds.ImagedNucleus = "1H"


def _ds(value: float) -> str:
    """A DS string of at most 16 characters with sub-micrometre precision."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def ground_truth_seg(
    subject: PhantomSubject, datasets: Sequence[Dataset], specs: Sequence[SegmentSpec]
) -> hd.seg.Segmentation:
    """The subject's labels as a MANUAL DICOM-SEG referencing ``datasets``."""
    volume = build_volume(datasets)
    order = [int(ds.InstanceNumber) - 1 for ds in volume.datasets]
    algorithm = SegAlgorithm(GROUND_TRUTH_ALGORITHM, 0, SegAlgorithmType.MANUAL)
    return build_seg(
        volume, subject.labels[order], specs, algorithm, series_description="Ground truth (phantom)"
    )


def write_subject(subject: PhantomSubject, out_dir: Path, specs: Sequence[SegmentSpec]) -> Path:
    """Write ``out_dir/<subject_id>[-plane]/``: ``IMG*.dcm``, ``gt-seg.dcm``, ``labels.npy``.

    ``labels.npy`` is the label volume in slice order (IMG0001 first), for tests and
    benchmarks that want ground truth without parsing the SEG.
    """
    name = subject.subject_id
    if subject.orientation is not Orientation.AXIAL:
        name += f"-{subject.orientation.value}"
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    datasets = subject_datasets(subject)
    for k, ds in enumerate(datasets):
        ds.save_as(folder / f"IMG{k + 1:04d}.dcm", enforce_file_format=True)
    seg = ground_truth_seg(subject, datasets, specs)
    seg.save_as(folder / "gt-seg.dcm")
    np.save(folder / "labels.npy", subject.labels)
    LOGGER.info("phantom %s written: %d slices", name, len(datasets))
    return folder
