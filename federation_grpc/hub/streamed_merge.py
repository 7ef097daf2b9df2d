"""A merge written block by block: memory bounded by a block, not by the model.

Every strategy in :mod:`strategies` is elementwise within a tensor (FedAsync's mix,
FedBuff's and FedAvg's weighted or trimmed mean), so a merge of whole models equals the
same merge run on matching slices of them. :func:`merge_to_file` runs the strategy on
one slice of one tensor at a time, read by position from the files of the current
generation, the updates and their bases (one reused buffer per tensor and file, see
:class:`~federation_grpc.hub.tensorfile.BlockReader`), and writes each merged slice
straight into the new safetensors file. The hub's peak memory for a merge is then a
few blocks per update, whatever the model size and however many updates are folded
(the block shrinks as more updates take part).

A clipped update (``[aggregation] clip_norm``) takes part with its scale: each slice is
``base + scale * (update - base)`` (:func:`~federation_grpc.hub.robust.scale_delta`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from federation_grpc.hub.contributions import Contribution
from federation_grpc.hub.robust import scale_delta
from federation_grpc.hub.strategies import Strategy
from federation_grpc.hub.tensorfile import BlockReader, flat_blocks, write_blocks

# float64 bytes all the updates' slices of one block may take together.
BLOCK_BUDGET_BYTES = 8 << 20
MIN_BLOCK = 4096

Layout = list[tuple[str, np.dtype, tuple[int, ...]]]


def merged_layout(
    current: Mapping[str, np.ndarray], contributions: Sequence[Contribution]
) -> Layout:
    """Names, dtypes and shapes of the merge: the current tensors, then new ones (a new
    head's first weights) as their first carrier has them; in name order."""
    shapes: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
        name: (value.dtype, value.shape) for name, value in current.items()
    }
    for contribution in contributions:
        for name, value in contribution.tensors.items():
            shapes.setdefault(name, (value.dtype, value.shape))
    return [(name, *shapes[name]) for name in sorted(shapes)]


def block_elements(contributions: int) -> int:
    """Elements per block so that every update's float64 slice fits the budget."""
    return max(MIN_BLOCK, BLOCK_BUDGET_BYTES // (8 * (contributions + 3)))


def merged_blocks(
    strategy: Strategy,
    current: Mapping[str, np.ndarray],
    contributions: Sequence[Contribution],
    scales: Sequence[float],
    layout: Layout,
) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, merged slice)`` for each block of each tensor, in ``layout`` order."""
    elements = block_elements(len(contributions))
    for name, _, shape in layout:
        size = int(np.prod(shape, dtype=np.int64))
        inputs = _Inputs(elements)
        now = inputs.add(current.get(name))
        keys = [(inputs.add(c.tensors.get(name)), inputs.add(c.base.get(name)))
                for c in contributions]
        for part in flat_blocks(size, elements):
            block = inputs.read(part)
            sliced = []
            for contribution, scale, (mine, theirs) in zip(
                contributions, scales, keys, strict=True
            ):
                value = block.get(mine)
                start = block.get(theirs)
                if (value is not None and start is not None and scale != 1.0
                        and np.issubdtype(value.dtype, np.floating)):
                    value = scale_delta(value, start, scale)
                sliced.append(Contribution(
                    tensors={} if value is None else {name: value},
                    base={} if start is None else {name: start},
                    num_samples=contribution.num_samples,
                    staleness=contribution.staleness,
                ))
            slice_now = {} if now is None else {name: block[now]}
            yield name, strategy.merge(slice_now, sliced)[name]


class _Inputs:
    """The distinct arrays one tensor's merge reads, each with its reader: a base is often
    the current generation itself (the same array), and then each block is read once."""

    def __init__(self, elements: int) -> None:
        self.elements = elements
        self.readers: dict[int, BlockReader] = {}

    def add(self, array: np.ndarray | None) -> int | None:
        """A key for ``array`` (the same for the same array); None for none."""
        if array is None:
            return None
        key = id(array)  # stable: the caller's mappings hold the arrays during the merge
        if key not in self.readers:
            self.readers[key] = BlockReader(array, self.elements)
        return key

    def read(self, part: slice) -> dict[int | None, np.ndarray]:
        """Each array's slice ``part``, by key."""
        return {key: reader.read(part) for key, reader in self.readers.items()}


def merge_to_file(
    path: Path,
    strategy: Strategy,
    current: Mapping[str, np.ndarray],
    contributions: Sequence[Contribution],
    scales: Sequence[float] | None = None,
) -> tuple[str, int]:
    """Merge into a new safetensors file at ``path``; ``(sha256, size)`` of it."""
    layout = merged_layout(current, contributions)
    factors = list(scales) if scales is not None else [1.0] * len(contributions)
    blocks = merged_blocks(strategy, current, contributions, factors, layout)
    return write_blocks(path, layout, blocks)
