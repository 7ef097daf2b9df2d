"""The training sample of a correction to an external (MONAI or TorchScript) network:
the whole corrected volume, as 3D training and 3D scoring need it.

A multi-head U-Net learns from the slices a radiologist touched (see
:mod:`dicom_node.learning.incremental`); an external network trains on random windows of
``preprocessing.volume.roi_size`` cut from the volume prepared exactly as for inference
(reorientation needs the affine, resampling the spacing), and is judged by segmenting
whole volumes. So its sample keeps the volume: intensities as stored (int16 when they
fit, as for slice samples), the corrected label values (uint8), the labels annotated,
the voxel spacing and the ``(k, r, c) -> LPS`` affine. Stored compressed as an ``.npz``
with a format marker; decoding never unpickles. numpy only: the correction intake
writes these without torch or MONAI.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["VOLUME_SAMPLE_FORMAT", "VolumeSample", "decode_volume_sample",
           "encode_volume_sample", "is_volume_sample", "volume_sample"]

VOLUME_SAMPLE_FORMAT = "tessera-volume-sample/1"


@dataclass(frozen=True)
class VolumeSample:
    """A corrected volume: raw intensities, label values, which labels are annotated."""

    image: np.ndarray
    labels: np.ndarray
    annotated: frozenset[str]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    affine: np.ndarray | None = None


def volume_sample(image: np.ndarray, labels: np.ndarray, annotated: Iterable[str],
                  spacing: tuple[float, float, float], affine: np.ndarray) -> VolumeSample:
    """The sample as stored: int16 intensities where they fit (CT in HU), else float32.

    Raises
    ------
    ValueError
        Image and labels differ in shape, or the affine is not 4x4.
    """
    if image.shape != labels.shape or image.ndim != 3:
        raise ValueError(f"volume {image.shape} and labels {labels.shape} must be one 3D grid")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    rounded = np.rint(image)
    if np.allclose(rounded, image) and np.all(np.abs(image) < 32767):
        stored = rounded.astype(np.int16)
    else:
        stored = image.astype(np.float32)
    return VolumeSample(stored, labels.astype(np.uint8), frozenset(annotated),
                        tuple(float(s) for s in spacing),  # type: ignore[arg-type]
                        affine)


def encode_volume_sample(sample: VolumeSample) -> bytes:
    meta = {"format": VOLUME_SAMPLE_FORMAT, "annotated": sorted(sample.annotated),
            "spacing": list(sample.spacing)}
    affine = np.eye(4) if sample.affine is None else np.asarray(sample.affine, np.float64)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, image=sample.image, labels=sample.labels, affine=affine,
                        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    return buffer.getvalue()


def is_volume_sample(data: bytes) -> bool:
    """Whether ``data`` is a volume sample (else a slice sample, or not a sample)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if "meta" not in npz.files:
                return False
            return bool(json.loads(npz["meta"].tobytes().decode()).get("format")
                        == VOLUME_SAMPLE_FORMAT)
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def decode_volume_sample(data: bytes) -> VolumeSample:
    """Inverse of :func:`encode_volume_sample`; never unpickles (``allow_pickle=False``).

    Raises
    ------
    ValueError
        Not a volume sample, or its arrays do not make one.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = json.loads(npz["meta"].tobytes().decode())
            if meta.get("format") != VOLUME_SAMPLE_FORMAT:
                raise ValueError(f"not a volume sample (format {meta.get('format')!r})")
            image, labels, affine = npz["image"], npz["labels"], npz["affine"]
    except (KeyError, OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a volume sample: {exc}") from exc
    spacing = tuple(float(s) for s in meta["spacing"])
    if image.shape != labels.shape or image.ndim != 3 or affine.shape != (4, 4) \
            or len(spacing) != 3:
        raise ValueError("volume sample arrays do not fit together")
    return VolumeSample(image, labels, frozenset(meta["annotated"]),
                        spacing, affine)  # type: ignore[arg-type]
