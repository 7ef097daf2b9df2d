"""Instance headers read from the stored files, cached in memory.

The index holds no patient data (DESIGN: names and IDs stay in the files), so QIDO
matching keys such as PatientName are read from one instance per study or series.
Study- and series-level attributes do not change once stored, so the cache needs no
invalidation; it is bounded, least recently used first out.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

LOGGER = logging.getLogger(__name__)


class HeaderCache:
    """``path -> Dataset`` without pixel data, at most ``size`` entries."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._items: OrderedDict[Path, Dataset] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> Dataset:
        with self._lock:
            ds = self._items.get(path)
            if ds is not None:
                self._items.move_to_end(path)
                return ds
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        with self._lock:
            self._items[path] = ds
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return ds
