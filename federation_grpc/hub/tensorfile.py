"""Safetensors files without copies: read as views over a memory map or by position,
written as streamed.

The hub handles whole models on every update (10 MB and more) and a merge touches
several of them, so the ``bytes`` round trips of ``safetensors.numpy.load``/``save``
(file -> bytes -> per-tensor bytes -> arrays, and back) were most of an upload's and a
merge's time. Here a file is mapped once and each tensor is a read-only array over the
map; a new generation is written tensor by tensor from the arrays' own buffers, hashed
on the way.

The format is safetensors: an 8-byte little-endian header length, a JSON header naming
each tensor's dtype, shape and ``[begin, end)`` offsets, then the data. The reader is
as strict as the reference implementation: a header that is not a JSON object of
well-formed entries, offsets that leave a gap, overlap or run past the file, or sizes
that do not match the shape are refused; nothing in the file is executed.

Memory stays bounded by a block, not by the model: code that walks a tensor goes
block by block (:class:`BlockReader`, :func:`blocks_of`), and a block of a tensor read
here comes from the file by position (``preadv``) into one buffer reused for every block
of that tensor, not from the map. Pages of a mapped file that were read count in the
process's resident set until they are unmapped, and handing them back by ``madvise``
leaked: a fault maps more than the page it needs (the kernel maps cached pages around
it), so a block that did not start on a page boundary mapped again pages before it that
the block before had handed back; a merge left about a fifth of every model it walked
resident, and widening the ``madvise`` to 64 kB did not stop it. A positioned read
costs a copy, so a merge reads each distinct input once per block and the norm of a
base tensor is kept per map (:mod:`parameters`). The map is still there for code that
takes a whole tensor at once (an evaluator). A new file can be written
from a stream of blocks (:func:`write_blocks`) whose values are computed as they are
written.

A mapped file must not be truncated while its arrays live (the process would get
SIGBUS): the hub maps only blobs (content-addressed, never rewritten) and a staged
upload after its last byte, while no other stream may write it.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TypeGuard

import numpy as np

from federation_grpc.errors import InvalidRequest

# Same set as safetensors.numpy (numpy has no bfloat16).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {(dtype.kind, dtype.itemsize): code for code, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's bound
_WRITE_BLOCK = 1 << 22
# Bytes of one block of one tensor that code walking a tensor touches at a time.
BLOCK_BYTES = 1 << 20


def flat_blocks(size: int, elements: int) -> Iterator[slice]:
    """Consecutive slices of at most ``elements`` covering ``range(size)``."""
    step = max(1, elements)
    for start in range(0, size, step):
        yield slice(start, min(size, start + step))


class _MappedFile(mmap.mmap):
    """A read-only map of a file that keeps the file open (``fd``) for positioned reads."""

    fd: int


def mapped_position(array: np.ndarray) -> tuple[mmap.mmap, int] | None:
    """The map of a file read by :func:`read_tensors` that a contiguous array views, and
    the array's byte offset in that file; None for any other array."""
    return _mapped_position(array)


def _mapped_position(array: np.ndarray) -> tuple[_MappedFile, int] | None:
    owner: object = array
    while isinstance(owner, np.ndarray):
        owner = owner.base
    if (
        not isinstance(owner, memoryview)
        or not isinstance(owner.obj, _MappedFile)
        or array.nbytes == 0
        or not array.flags.c_contiguous
    ):
        return None
    origin = np.frombuffer(owner, dtype=np.uint8, count=1).ctypes.data
    return owner.obj, array.ctypes.data - origin


class BlockReader:
    """Flat slices of one tensor. For a tensor of a file read by :func:`read_tensors`
    each slice is read by position into one buffer of at most ``elements``, reused for
    every slice, so no page of the map is touched; for any other array it is a view.
    A slice is read-only and valid until the next :meth:`read`."""

    def __init__(self, array: np.ndarray, elements: int = BLOCK_BYTES // 4) -> None:
        self.flat = array.reshape(-1)
        where = _mapped_position(self.flat)
        self._source = None if where is None else (where[0].fd, where[1])
        count = min(max(1, elements), self.flat.size) if self._source else 0
        self._buffer = np.empty(count, dtype=self.flat.dtype)

    def read(self, part: slice) -> np.ndarray:
        """``flat[part]`` for a slice of at most ``elements`` (step 1)."""
        if self._source is None:
            return self.flat[part]
        fd, origin = self._source
        start, stop, _ = part.indices(self.flat.size)
        if stop - start > self._buffer.size:
            raise ValueError(f"a block of {stop - start} elements, the reader holds "
                             f"{self._buffer.size}")
        block = self._buffer[: max(0, stop - start)]
        _read_at(fd, block.view(np.uint8).data, origin + start * block.itemsize)
        view = block.view()
        view.flags.writeable = False
        return view


def _read_at(fd: int, into: memoryview, offset: int) -> None:
    while into:
        got = os.preadv(fd, [into], offset)
        if got <= 0:
            raise OSError(f"file ended {len(into)} bytes short of a tensor's block")
        into, offset = into[got:], offset + got


def blocks_of(array: np.ndarray, elements: int = BLOCK_BYTES // 4) -> Iterator[np.ndarray]:
    """The array as flat blocks of at most ``elements``, each valid until the next
    (see :class:`BlockReader`)."""
    reader = BlockReader(array, elements)
    for part in flat_blocks(reader.flat.size, elements):
        yield reader.read(part)


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as read-only arrays over one memory map (walk them
    with :class:`BlockReader` or :func:`blocks_of` to read blocks by position instead).

    Raises
    ------
    InvalidRequest
        The file is not a well-formed safetensors file (see the module text).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise InvalidRequest("not a valid safetensors payload: shorter than its header")
        header_len = struct.unpack("<Q", os.pread(fd, 8, 0))[0]
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise InvalidRequest("not a valid safetensors payload: header length out of bounds")
        # Read, not mapped: a fault on the map would map the pages around it too.
        raw = bytearray(header_len)
        _read_at(fd, memoryview(raw), 8)
        mapped = _MappedFile(fd, 0, access=mmap.ACCESS_READ)
    except BaseException:
        os.close(fd)
        raise
    mapped.fd = fd
    weakref.finalize(mapped, os.close, fd)  # the file stays open while the map lives
    start = 8 + header_len
    entries = _entries(bytes(raw))
    out: dict[str, np.ndarray] = {}
    cursor = 0
    for begin, end, name, dtype, shape in sorted(entries):
        if begin != cursor:
            raise InvalidRequest(
                f"not a valid safetensors payload: tensor {name!r} starts at {begin}, "
                f"expected {cursor} (a gap or an overlap)"
            )
        cursor = end
        if start + end > size:
            raise InvalidRequest(f"not a valid safetensors payload: {name!r} runs past the end")
        count = end - begin
        if count == 0:
            out[name] = np.empty(shape, dtype=dtype)
        else:
            out[name] = np.frombuffer(
                mapped, dtype=dtype, count=count // dtype.itemsize, offset=start + begin
            ).reshape(shape)
    if start + cursor != size:
        raise InvalidRequest(
            f"not a valid safetensors payload: {size - start - cursor} bytes after the last tensor"
        )
    return out


def _entries(raw: bytes) -> list[tuple[int, int, str, np.dtype, tuple[int, ...]]]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"not a valid safetensors payload: header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidRequest("not a valid safetensors payload: header is not a JSON object")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise InvalidRequest("not a valid safetensors payload: bad __metadata__")
            continue
        if not isinstance(info, dict):
            raise InvalidRequest(f"not a valid safetensors payload: entry {name[:80]!r}")
        dtype = DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if (
            dtype is None
            or not _ints(shape)
            or not _ints(offsets)
            or len(offsets) != 2
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise InvalidRequest(
                f"not a valid safetensors payload: entry {name[:80]!r} has a bad dtype, "
                "shape or data_offsets"
            )
        if (offsets[1] - offsets[0]) != math.prod(shape) * dtype.itemsize:
            raise InvalidRequest(
                f"not a valid safetensors payload: {name[:80]!r} holds "
                f"{offsets[1] - offsets[0]} bytes, its shape needs "
                f"{math.prod(shape) * dtype.itemsize}"
            )
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))
    return entries


def _ints(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def write_tensors(path: Path, tensors: Mapping[str, np.ndarray]) -> tuple[str, int]:
    """Write ``tensors`` as safetensors to ``path`` (created, fsync'd); ``(sha256, size)``.

    Tensors are laid out in name order, each from its own buffer (no intermediate copy
    of the whole file). Raises ValueError for a dtype safetensors cannot hold.
    """
    arrays = {}
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        if not array.flags.c_contiguous:  # (np.ascontiguousarray would make 0-d arrays 1-d)
            array = array.copy(order="C")
        arrays[name] = array
    layout = [(name, array.dtype, array.shape) for name, array in arrays.items()]
    return write_blocks(path, layout, ((name, arrays[name]) for name, _, _ in layout))


def write_blocks(
    path: Path,
    layout: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
    blocks: Iterable[tuple[str, np.ndarray]],
) -> tuple[str, int]:
    """Write a safetensors file whose tensors arrive as consecutive blocks.

    ``layout`` names each tensor with its dtype and shape, in the order their bytes are
    written; ``blocks`` yields ``(name, values)`` in that order, each tensor's blocks
    together and adding up to its size (values are cast to the tensor's dtype). The file
    is created, fsync'd; returns ``(sha256, size)``. Raises ValueError for a dtype
    safetensors cannot hold or blocks that do not match the layout.
    """
    head, expected = _layout_header(layout)
    size = sum(nbytes for _, _, nbytes in expected)
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def emit(part: memoryview) -> None:
        digest.update(part)
        _write_all(fd, part)

    try:
        for part in (struct.pack("<Q", len(head)), head):
            emit(memoryview(part))
        written = _write_data(emit, expected, blocks)
        if written != [nbytes for _, _, nbytes in expected]:
            raise ValueError(f"blocks hold {sum(written)} bytes, the layout {size}")
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest(), 8 + len(head) + size


# A tensor of a file being written: its name, dtype and size in bytes.
_Expected = tuple[str, np.dtype, int]


def _layout_header(
    layout: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
) -> tuple[bytes, list[_Expected]]:
    """The JSON header of ``layout`` (padded so the data starts 8-byte aligned, as
    safetensors writes it) and each tensor's name, dtype and size in writing order."""
    header: dict[str, dict[str, object]] = {}
    offset = 0
    expected: list[_Expected] = []
    for name, raw_dtype, shape in layout:
        dtype = np.dtype(raw_dtype)
        code = _CODES.get((dtype.kind, dtype.itemsize))
        if code is None or dtype.byteorder == ">":
            raise ValueError(f"tensor {name!r} has dtype {dtype}, not storable")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        expected.append((name, dtype, nbytes))
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + b" " * (-len(head) % 8), expected


def _write_data(
    emit: Callable[[memoryview], None],
    expected: list[_Expected],
    blocks: Iterable[tuple[str, np.ndarray]],
) -> list[int]:
    """Hand ``blocks`` to ``emit`` in the layout's order, in pieces of at most
    ``_WRITE_BLOCK`` bytes; the bytes written per tensor. Raises ValueError for a block out
    of order or a tensor left short before the next."""
    index = {name: i for i, (name, _, _) in enumerate(expected)}
    written = [0] * len(expected)
    position = 0
    for name, values in blocks:
        at = index.get(name, -1)
        if at < position:
            raise ValueError(f"block of {name!r} out of the layout's order")
        for skipped in range(position, at):
            if written[skipped] != expected[skipped][2]:
                raise ValueError(f"tensor {expected[skipped][0]!r} ended early")
        position = at
        array = np.ascontiguousarray(values.reshape(-1), dtype=expected[at][1])
        flat = memoryview(array.view(np.uint8).data)
        for block in range(0, len(flat), _WRITE_BLOCK):
            emit(flat[block : block + _WRITE_BLOCK])
        written[at] += array.nbytes
    return written


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]
