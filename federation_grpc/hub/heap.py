"""The hub process's heap: large buffers go back to the system when freed.

Every upload chunk passes through a buffer of the chunk's size (grpc's message, then a
Python ``bytes``). glibc's malloc serves such sizes from ``mmap`` at first, but raises
its threshold each time one is freed, after which they come from per-thread arenas
(up to eight per core) that keep freed memory: with dozens of concurrent streams on a
thread pool the resident set then grows with the number of clients, not the chunk.
Fixing the threshold (which also stops the raising) and capping the arenas keeps it
bounded. Outside glibc this does nothing.

The threshold is 4 MiB, above the 256 kB chunks (and the 1 MB ones of older nodes): a
chunk buffer comes from the two arenas and is reused, where with a 256 kB threshold
every chunk was an ``mmap`` and ``munmap`` (page faults, zeroing, TLB shootdowns). In
``benchmarks/federation.py --clients 50 --size-mb 10`` that took the hub from 6.4 to
5.4 CPU s/GB at the same peak RSS (about 200 MB, issue 25).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

LOGGER = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def bound_heap(mmap_threshold: int = 4 << 20, arenas: int = 2) -> bool:
    """Serve allocations of ``mmap_threshold`` bytes and more from ``mmap`` and use at
    most ``arenas`` malloc arenas; True when glibc took both settings."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_ARENA_MAX, arenas))
    LOGGER.debug("heap bounded: mmap threshold %d bytes, %d arenas: %s",
                 mmap_threshold, arenas, done)
    return done
