"""The node's instance store opened from its configuration: database, files, disk
watermark. The node builds its pipeline on it; a receiving process
(:mod:`dicom_node.dicom.receiver_process`) needs nothing more."""

from __future__ import annotations

from pathlib import Path

from dicom_node.config import NodeConfig
from dicom_node.store.db import Database
from dicom_node.store.files import InstanceFiles
from dicom_node.store.instances import InstanceStore
from dicom_node.store.private import private_dir
from dicom_node.store.space import DiskWatermark


def open_store(config: NodeConfig, *, create_schema: bool = True) -> InstanceStore:
    """The instance store of ``config``; ``create_schema=False`` for a process that joins
    a node whose database is already set up."""
    node = config.node
    private_dir(node.data_dir)
    db = Database(node.resolved_database_url())
    if create_schema:
        db.create_schema()
    files = InstanceFiles(config.files_dir, config.quarantine_dir,
                          quarantine_max_files=node.quarantine_max_files,
                          quarantine_max_bytes=int(node.quarantine_max_mb * 2**20))
    store = InstanceStore(db, files)
    store.space = DiskWatermark(
        files.root, int(node.min_free_mb * 2**20), node.min_free_percent,
        on_change=lambda low, reason: store.audit("disk-low" if low else "disk-ok", reason))
    return store


def journal_dir(config: NodeConfig, receiver: int) -> Path:
    """The intake journal of receiving process ``receiver`` (0: the node's own)."""
    name = "intake" if receiver == 0 else f"intake-{receiver}"
    return config.node.data_dir / name


def receiver_journals(config: NodeConfig) -> dict[int, Path]:
    """Every other receiver's journal directory present under the data directory, by
    receiver number (those of a larger ``receivers`` an earlier run had included)."""
    found: dict[int, Path] = {}
    for path in config.node.data_dir.glob("intake-*"):
        number = path.name.removeprefix("intake-")
        if number.isdigit() and int(number) > 0 and path.is_dir():
            found[int(number)] = path
    return found
