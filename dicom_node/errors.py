"""Error root of the node; every error the node raises on purpose derives from it."""

from federation_grpc.errors import TesseraError

__all__ = ["ConfigError", "DicomNodeError", "InvalidDatasetError", "SeriesRefused",
           "StoreError", "TesseraError"]


class DicomNodeError(TesseraError):
    """Root of all errors raised by :mod:`dicom_node`."""


class ConfigError(DicomNodeError):
    """The configuration is invalid; the message names the offending key."""


class StoreError(DicomNodeError):
    """The instance store or its index could not complete an operation."""


class InvalidDatasetError(DicomNodeError):
    """A received dataset is malformed or inconsistent with its context."""


class SeriesRefused(DicomNodeError):
    """A series cannot be processed (geometry, modality, ...); the message says why."""
