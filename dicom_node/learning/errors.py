"""Errors raised on purpose by :mod:`dicom_node.learning`."""

from __future__ import annotations

from dicom_node.errors import DicomNodeError


class LearningError(DicomNodeError):
    """Root of the learning package's errors."""


class ModelConfigError(LearningError):
    """A model configuration is invalid; the message names the field and the rule."""


class WeightsError(LearningError):
    """Weights cannot be read, or do not match their configuration; the message says why."""


class TrainingError(LearningError):
    """Training cannot run with the given samples or policy."""
