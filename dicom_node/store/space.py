"""The disk watermark: refuse new instances before the disk is actually full.

Below ``min_free_bytes`` free, or below ``min_free_percent`` of the file system,
the node answers new instances 0xA700 (C-STORE) and 503 (STOW-RS) and keeps no
quarantine payloads, so the index, the audit trail and the instances already
acknowledged keep the room they need. Going low and recovering are each logged and
audited once.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

LOGGER = logging.getLogger(__name__)


class DiskWatermark:
    """Whether the instance store's file system has room for new instances."""

    def __init__(self, path: Path, min_free_bytes: int, min_free_percent: float,
                 on_change: Callable[[bool, str], None] | None = None) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes
        self.min_free_percent = min_free_percent
        self._on_change = on_change
        self._low = False
        self._lock = threading.Lock()

    def room_for(self, extra_bytes: int) -> bool:
        """Whether ``extra_bytes`` more could be written and the file system still be
        above the watermark (the intake journal asks before preallocating a segment)."""
        try:
            usage = shutil.disk_usage(self.path)
        except OSError:
            return False
        return not self._below(usage.free - extra_bytes, usage.total)[0]

    def _below(self, free: int, total: int) -> tuple[bool, float]:
        """Whether ``free`` bytes of ``total`` are below the watermark, and their percent
        (0 for a file system that reports no size)."""
        percent = 100.0 * free / total if total else 0.0
        return free < self.min_free_bytes or percent < self.min_free_percent, percent

    def refusal(self) -> str | None:
        """Why new instances are refused now, or ``None`` when there is room."""
        try:
            usage = shutil.disk_usage(self.path)
        except OSError as exc:
            reason: str | None = f"cannot read the free space of {self.path}: {exc}"
        else:
            below, percent = self._below(usage.free, usage.total)
            if below:
                reason = (f"disk below the watermark: {usage.free // 2**20} MiB free "
                          f"({percent:.1f}%), the node keeps at least "
                          f"{self.min_free_bytes // 2**20} MiB and {self.min_free_percent:g}%")
            else:
                reason = None
        self._note(reason)
        return reason

    def _note(self, reason: str | None) -> None:
        low = reason is not None
        with self._lock:
            changed = low != self._low
            self._low = low
        if not changed:
            return
        if low:
            LOGGER.warning("refusing new instances: %s", reason)
        else:
            LOGGER.warning("disk above the watermark again: accepting new instances")
        if self._on_change is not None:
            try:
                self._on_change(low, reason or "disk above the watermark again")
            except Exception:
                LOGGER.exception("cannot record the disk watermark change")
