"""Tessera hospital-side DICOM node."""

__version__ = "0.1.0"
