"""The distance of an update from its base, summed as the update's bytes arrive.

The gate refuses an update whose L2 distance from its base generation is too large
(:func:`federation_grpc.hub.gate.check_update`). Measured after the last byte, that
check read the whole update back from its staged file and the base beside it, block by
block, while the node waited for its answer: in ``benchmarks/federation.py --clients 50
--size-mb 10`` it was the largest piece of the hub's own work per update (7 ms of CPU
for 10 MB, against 1.7 ms for everything ``begin`` does). Here each chunk adds its part
of ``sum((update - base) ** 2)`` as it arrives, while its bytes are still in the cache
from hashing, and the file is not read again.

The bytes are followed as safetensors: the 8-byte header length, the JSON header (read
with :func:`~federation_grpc.hub.tensorfile.header_entries`, so exactly as strictly as
the file is read afterwards), then each tensor's data in offset order. A value cut by a
chunk boundary is kept until its other bytes arrive. Counted are the floating tensors the
base holds with the same dtype and shape, the set :func:`update_norm` walks once the
intake has refused every other kind of name; the rest (an added head's first weights,
whole-number tensors) pass by uncounted.

Whatever cannot be followed (a header that is not valid, longer than
:data:`MAX_STREAMED_HEADER` or with gaps between tensors) makes :meth:`squares` return
None, and the check reads the file as before; the intake refuses such a file anyway.
Memory: one buffer of the base's values the size of the largest piece a chunk brings,
at most a block (:data:`~federation_grpc.hub.tensorfile.BLOCK_BYTES`).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from federation_grpc.errors import InvalidRequest
from federation_grpc.hub.tensorfile import BLOCK_BYTES, BlockReader, header_entries

# A header longer than this is not followed (its file is then read after the last byte).
MAX_STREAMED_HEADER = 1 << 20


@dataclass(frozen=True)
class _Tensor:
    begin: int  # byte offsets in the data section
    end: int
    dtype: np.dtype
    base: np.ndarray | None  # None: its bytes are not counted


class StreamedNorm:
    """``sum((update - base) ** 2)`` over an update's counted tensors, fed its bytes in
    order from the first (see the module text)."""

    def __init__(self, base: Mapping[str, np.ndarray]) -> None:
        self._base = base
        self._head = bytearray()  # the header's bytes until it is complete
        self._length = -1  # the JSON header's length, once its 8 bytes are in
        self._header_end = -1  # bytes before the data section, once known
        self._tensors: list[_Tensor] = []
        self._index = 0  # the tensor the next data byte belongs to
        self._at = 0  # bytes of the data section fed so far
        self._carry = bytearray()  # bytes of a value a chunk boundary cut
        self._reader: BlockReader | None = None
        self._delta = np.empty(0)
        self._total = 0.0
        self._lost = False

    def squares(self) -> float | None:
        """The sum so far, or None when the bytes could not be followed."""
        return None if self._lost else self._total

    def feed(self, chunk: bytes | memoryview) -> None:
        """The next bytes of the update, in order."""
        view = memoryview(chunk).cast("B")
        if self._lost:
            return
        if self._header_end < 0:
            view = self._take_header(view)
        while view and self._index < len(self._tensors):
            tensor = self._tensors[self._index]
            piece, view = view[: tensor.end - self._at], view[tensor.end - self._at :]
            if tensor.base is not None:
                self._count(tensor, piece)
            self._at += len(piece)
            if self._at == tensor.end:
                self._index += 1
                self._reader = None

    def _take_header(self, view: memoryview) -> memoryview:
        while True:
            wanted = 8 if self._length < 0 else 8 + self._length
            taken = view[: wanted - len(self._head)]
            self._head += taken
            view = view[len(taken) :]
            if len(self._head) < wanted:
                return view  # all taken: the header goes on in the next chunk
            if self._length >= 0:
                break
            self._length = struct.unpack("<Q", self._head)[0]
            if self._length > MAX_STREAMED_HEADER:
                return self._give_up()
        try:
            entries = sorted(header_entries(bytes(self._head[8:])))
        except InvalidRequest:
            return self._give_up()
        self._header_end = len(self._head)
        self._head = bytearray()
        cursor = 0
        for begin, end, name, dtype, shape in entries:
            if begin != cursor:
                return self._give_up()
            cursor = end
            base = self._base.get(name)
            counted = (base is not None and np.issubdtype(dtype, np.floating)
                       and base.dtype == dtype and base.shape == shape and end > begin)
            self._tensors.append(_Tensor(begin, end, dtype, base if counted else None))
        return view

    def _give_up(self) -> memoryview:
        self._lost = True
        self._head = bytearray()
        return memoryview(b"")

    def _count(self, tensor: _Tensor, piece: memoryview) -> None:
        size = tensor.dtype.itemsize
        at = self._at - tensor.begin  # where the piece starts in the tensor's bytes
        if self._carry:
            need = size - len(self._carry)
            self._carry += piece[:need]
            at += min(need, len(piece))
            piece = piece[need:]
            if len(self._carry) < size:
                return
            self._add(tensor, at // size - 1, np.frombuffer(self._carry, dtype=tensor.dtype))
            self._carry = bytearray()
        whole = len(piece) - len(piece) % size
        if whole:
            self._add(tensor, at // size, np.frombuffer(piece[:whole], dtype=tensor.dtype))
        self._carry += piece[whole:]

    def _add(self, tensor: _Tensor, first: int, values: np.ndarray) -> None:
        assert tensor.base is not None
        elements = min(values.size, BLOCK_BYTES // tensor.dtype.itemsize)
        if self._reader is None or self._reader.elements < elements:
            # The base's values, read by position into a buffer of the largest piece's
            # size, and a buffer as large for the difference.
            self._reader = BlockReader(tensor.base, elements)
            self._delta = np.empty(self._reader.elements, dtype=tensor.dtype)
        step = self._reader.elements
        for start in range(0, values.size, step):
            ours = values[start : start + step]
            theirs = self._reader.read(slice(first + start, first + start + ours.size))
            delta = np.subtract(ours, theirs, out=self._delta[: ours.size])
            self._total += float(np.dot(delta, delta))
