"""Parameter groups and checks over named tensors (pure functions on numpy arrays).

Tensor names follow the node network's convention: ``heads.<head>.…`` belongs to the
group ``heads.<head>``; every other name belongs to the group named by its first dotted
component (``encoder``, ``bottleneck``, …). A node declares the groups it trained
(partial labels), merges go group by group (:mod:`strategies`), and the gate and the
intake measure and check updates with the norms and finiteness checks here. Those walk
each tensor block by block (:class:`~federation_grpc.hub.tensorfile.BlockReader`), so a
model of gigabytes is checked in the memory of one block, read by position from its file.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Mapping, Sequence

import numpy as np

from federation_grpc.hub.tensorfile import BlockReader, blocks_of, flat_blocks, mapped_position

HEADS_PREFIX = "heads."


def group_of(name: str) -> str:
    """Parameter group of a tensor name: ``heads.<head>`` or the first dotted component."""
    parts = name.split(".")
    if parts[0] == "heads" and len(parts) >= 3:
        return f"heads.{parts[1]}"
    return parts[0]


def is_head_group(group: str) -> bool:
    return group.startswith(HEADS_PREFIX)


def groups_of(names: Sequence[str] | Mapping[str, object]) -> dict[str, list[str]]:
    """Map each group to the sorted tensor names in it."""
    out: dict[str, list[str]] = {}
    for name in sorted(names):
        out.setdefault(group_of(name), []).append(name)
    return out


# Sums of squares of the tensors of files read by read_tensors, by map (held weakly)
# and position: every update is checked against its base generation's norm, and a
# file never changes while mapped, so each base tensor is read for it once.
_SQUARES: weakref.WeakKeyDictionary[object, dict[tuple[int, int, str], float]] = (
    weakref.WeakKeyDictionary())
_SQUARES_LOCK = threading.Lock()


def _sum_squares(values: np.ndarray) -> float:
    where = mapped_position(values)
    if where is None:
        return _summed_squares(values)
    mapped, offset = where
    key = (offset, values.size, values.dtype.str)
    with _SQUARES_LOCK:
        known = _SQUARES.setdefault(mapped, {}).get(key)
    if known is None:
        known = _summed_squares(values)
        with _SQUARES_LOCK:
            _SQUARES.setdefault(mapped, {})[key] = known
    return known


def _summed_squares(values: np.ndarray) -> float:
    # A dot product in the tensor's own precision is fast (BLAS) and exact enough for a
    # bound; the total is accumulated in Python float (double).
    return sum(float(np.dot(block, block)) for block in blocks_of(values))


_BLOCK = 1 << 18


def update_norm(update: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``update - base`` over the floating tensors the update carries."""
    total = 0.0
    for name, value in update.items():
        if np.issubdtype(value.dtype, np.floating):
            mine, theirs = BlockReader(value, _BLOCK), BlockReader(base[name], _BLOCK)
            buffer = np.empty(min(_BLOCK, mine.flat.size), dtype=value.dtype)
            for part in flat_blocks(mine.flat.size, _BLOCK):
                ours = mine.read(part)
                delta = np.subtract(ours, theirs.read(part), out=buffer[: ours.size])
                total += float(np.dot(delta, delta))
    return math.sqrt(total)


def tensors_norm(tensors: Mapping[str, np.ndarray], names: Sequence[str] | None = None) -> float:
    keys = names if names is not None else list(tensors)
    total = 0.0
    for name in keys:
        value = tensors[name]
        if np.issubdtype(value.dtype, np.floating):
            total += _sum_squares(value)
    return math.sqrt(total)


def non_finite_tensors(tensors: Mapping[str, np.ndarray]) -> list[str]:
    """Names of floating tensors holding NaN or infinity."""
    return sorted(
        name
        for name, value in tensors.items()
        if np.issubdtype(value.dtype, np.floating)
        and not all(bool(np.isfinite(block).all()) for block in blocks_of(value))
    )
