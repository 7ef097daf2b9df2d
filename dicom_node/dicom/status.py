"""DIMSE status codes the node answers with (PS3.4 Annex B, PS3.7 Annex C)."""

from enum import IntEnum


class Status(IntEnum):
    SUCCESS = 0x0000
    WARNING_COERCION = 0xB000
    OUT_OF_RESOURCES = 0xA700          # cannot store: disk, index or size limit
    DATASET_MISMATCH = 0xA900          # dataset does not match SOP class / command
    CANNOT_UNDERSTAND = 0xC210         # the bytes cannot be decoded
    PROCESSING_FAILURE = 0x0110
