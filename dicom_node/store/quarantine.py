"""The quarantine: refused payloads kept for inspection, within a size and count cap.

Each entry is ``<stamp>-<id>.bin`` (the payload) plus ``.json`` (why). When a new
entry takes the quarantine over ``max_files`` entries or ``max_bytes`` bytes, the
oldest entries are deleted; how many were dropped since the quarantine was created
is kept in ``.dropped`` beside them, for ``tessera node status`` and /metrics.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.store.durable import write_atomic
from dicom_node.store.private import private_dir

LOGGER = logging.getLogger(__name__)

DROPPED_FILE = ".dropped"


@dataclass(frozen=True, slots=True)
class QuarantineUsage:
    entries: int
    bytes: int
    dropped: int        # entries deleted to stay within the cap, ever
    max_entries: int
    max_bytes: int

    def to_json(self) -> dict[str, int]:
        return {"entries": self.entries, "bytes": self.bytes, "dropped": self.dropped,
                "max_entries": self.max_entries, "max_bytes": self.max_bytes}


class Quarantine:
    """Keeps refused payloads, dropping the oldest beyond the cap."""

    def __init__(self, root: Path, max_files: int, max_bytes: int) -> None:
        self.root = root.resolve()
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def keep(self, data: bytes, details: dict[str, Any]) -> Path:
        """Write a payload and why, then enforce the cap; returns the payload's path."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        name = f"{stamp}-{uuid.uuid4().hex[:12]}"
        payload = self.root / f"{name}.bin"
        private_dir(self.root)
        with self._lock:
            write_atomic(payload, data, durable=True, root=self.root)
            meta = json.dumps(details, indent=2, default=str).encode()
            write_atomic(self.root / f"{name}.json", meta, durable=True, root=self.root)
            self._enforce_cap(keep=name)
        return payload

    def _entries(self) -> list[tuple[str, int]]:
        """(name, bytes of .bin + .json) per entry, oldest first."""
        sizes: dict[str, int] = {}
        if not self.root.is_dir():
            return []
        with os.scandir(self.root) as it:
            for entry in it:
                stem, dot, ext = entry.name.rpartition(".")
                if not dot or ext not in ("bin", "json") or entry.name.startswith("."):
                    continue
                try:
                    sizes[stem] = sizes.get(stem, 0) + entry.stat().st_size
                except FileNotFoundError:
                    continue
        return sorted(sizes.items())

    def _enforce_cap(self, keep: str) -> None:
        entries = self._entries()
        count = len(entries)
        total = sum(size for _, size in entries)
        dropped = 0
        for name, size in entries:
            if count <= self.max_files and total <= self.max_bytes:
                break
            if name == keep:  # the newest entry stays, even alone over the size cap
                continue
            for ext in ("bin", "json"):
                (self.root / f"{name}.{ext}").unlink(missing_ok=True)
            count -= 1
            total -= size
            dropped += 1
        if dropped:
            self._add_dropped(dropped)
            LOGGER.warning("quarantine over its cap (%d entries, %d bytes): dropped the %d "
                           "oldest", self.max_files, self.max_bytes, dropped)

    def _add_dropped(self, n: int) -> None:
        path = self.root / DROPPED_FILE
        total = self.dropped() + n
        try:
            write_atomic(path, str(total).encode(), durable=True, root=self.root)
        except Exception:
            LOGGER.exception("cannot record the quarantine's dropped count")

    def dropped(self) -> int:
        try:
            return int((self.root / DROPPED_FILE).read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def usage(self) -> QuarantineUsage:
        entries = self._entries()
        return QuarantineUsage(len(entries), sum(size for _, size in entries), self.dropped(),
                               self.max_files, self.max_bytes)
