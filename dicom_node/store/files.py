"""Instance files on disk, written atomically and durably (:mod:`dicom_node.store.durable`).

Layout: ``<root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``. UIDs are validated
before they become path components, so a hostile UID cannot escape the root.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from dicom_node.dicom.peer_text import escaped
from dicom_node.errors import InvalidDatasetError, StoreError
from dicom_node.store.durable import publish_atomic, stage_atomic, write_atomic
from dicom_node.store.private import private_dir
from dicom_node.store.quarantine import Quarantine

LOGGER = logging.getLogger(__name__)

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def check_uid(value: object, name: str) -> str:
    """Return ``value`` as a UID string, or raise if it is not a valid DICOM UID.

    Raises
    ------
    InvalidDatasetError
        Missing, longer than 64 characters, or not dotted decimal components.
    """
    text = str(value).strip().rstrip("\x00") if value is not None else ""
    if not text or len(text) > 64 or not _UID_RE.match(text):
        raise InvalidDatasetError(f"{name} is missing or not a valid UID: {escaped(text)}")
    return text


def uid_file_stem(uid: str) -> str:
    """A file name from a UID: its digits and dots only, at most 64, so nothing else
    reaches a path (files the node names after its own SEGs: samples, quality inputs)."""
    return "".join(c for c in uid if c.isdigit() or c == ".")[:64]


class InstanceFiles:
    """Where instance files and quarantined payloads live."""

    def __init__(self, root: Path, quarantine: Path, *, quarantine_max_files: int = 1000,
                 quarantine_max_bytes: int = 2 << 30) -> None:
        self.root = private_dir(root.resolve())
        self.kept = Quarantine(quarantine, quarantine_max_files, quarantine_max_bytes)
        self.quarantine_root = private_dir(self.kept.root)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        for value, name in ((study_uid, "StudyInstanceUID"), (series_uid, "SeriesInstanceUID"),
                            (sop_uid, "SOPInstanceUID")):
            check_uid(value, name)
        return f"{study_uid}/{series_uid}/{sop_uid}.dcm"

    def absolute(self, relative: str) -> Path:
        """``relative`` under the root, refused if it climbs out (``..``, an absolute
        path). Lexical, without touching the disk (one instance file per call on the
        intake path): the root is the node's own 0700 directory, so no one else can
        plant a symlink inside it."""
        path = Path(os.path.normpath(self.root / relative))
        if not path.is_relative_to(self.root):
            raise StoreError(f"path escapes the instance root: {relative!r}")
        return path

    def write(self, relative: str, data: bytes) -> Path:
        path = self.absolute(relative)
        write_atomic(path, data, durable=True, root=self.root)
        return path

    def stage(self, relative: str, data: bytes) -> Path:
        """Write ``data`` durably under a temporary name; :meth:`publish` makes it final."""
        return stage_atomic(self.absolute(relative), data, durable=True, root=self.root)

    def publish(self, staged: Path, relative: str) -> None:
        publish_atomic(staged, self.absolute(relative), durable=True)

    def place(self, relative: str, data: bytes) -> Path:
        """Write ``data`` in place (temporary name, rename) without an fsync: for bytes an
        intake journal already holds durably; its checkpoint syncs the file later."""
        path = self.absolute(relative)
        write_atomic(path, data, durable=False, root=self.root)
        return path

    def read(self, relative: str) -> bytes:
        return self.absolute(relative).read_bytes()

    def quarantine(self, data: bytes, details: dict[str, Any]) -> Path:
        """Keep a refused payload and why, for inspection (within the quarantine's cap);
        returns the payload's path."""
        return self.kept.keep(data, details)
