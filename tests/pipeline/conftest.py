"""Series for the pipeline tests: phantom acquisitions and tiny hand-made stacks."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from dicom_node.phantom.ct import generate_subject
from dicom_node.phantom.dicom import subject_datasets
from dicom_node.phantom.subject import PhantomSubject

PLANES = ("axial", "sagittal", "coronal")


@pytest.fixture(scope="session")
def phantom_series() -> dict[str, tuple[PhantomSubject, list[Dataset]]]:
    """Site C subject 1 (64 thick slices, fast) acquired in three planes, plus shuffled."""
    out = {}
    for plane in PLANES:
        subject = generate_subject("C", 1, seed=2, orientation=plane)
        out[plane] = (subject, subject_datasets(subject))
    subject, datasets = out["axial"]
    shuffled = list(datasets)
    random.Random(4).shuffle(shuffled)
    out["shuffled"] = (subject, shuffled)
    return out


def tiny_series(
    n: int = 6,
    *,
    iop: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    spacing: float = 2.5,
    size: int = 8,
    modality: str = "CT",
) -> list[Dataset]:
    """``n`` small CT slices stacked along the normal of ``iop``; pixel value = slice index."""
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    out = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.999.1.{k + 1}"
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.999.2"
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.999.3"
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.999.4"
        ds.Modality = modality
        ds.ImagePositionPatient = [
            f"{v:.4f}" for v in (np.array([-10.0, 5.0, 30.0]) + k * spacing * normal)
        ]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.PixelSpacing = ["0.8", "0.8"]
        ds.SliceThickness = str(spacing)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = "1"
        ds.RescaleIntercept = "-1024"
        ds.PixelData = np.full((size, size), 1024 + k, np.uint16).tobytes()
        out.append(ds)
    return out


def clone(datasets: list[Dataset]) -> list[Dataset]:
    return [copy.deepcopy(ds) for ds in datasets]
