"""Safetensors files without copies: read as views over a memory map, write as streamed.

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
from collections.abc import Mapping
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


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as read-only arrays over one memory map.

    Raises
    ------
    InvalidRequest
        The file is not a well-formed safetensors file (see the module text).
    """
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 8:
            raise InvalidRequest("not a valid safetensors payload: shorter than its header")
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    header_len = struct.unpack_from("<Q", mapped, 0)[0]
    if header_len > min(size - 8, MAX_HEADER_BYTES):
        raise InvalidRequest("not a valid safetensors payload: header length out of bounds")
    start = 8 + header_len
    entries = _entries(bytes(mapped[8:start]))
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
    layout = []
    header: dict[str, dict[str, object]] = {}
    offset = 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        if not array.flags.c_contiguous:  # (np.ascontiguousarray would make 0-d arrays 1-d)
            array = array.copy(order="C")
        code = _CODES.get((array.dtype.kind, array.dtype.itemsize))
        if code is None or array.dtype.byteorder == ">":
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, not storable")
        header[name] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        layout.append(array)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # data starts 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for part in (struct.pack("<Q", len(head)), head):
            digest.update(part)
            _write_all(fd, memoryview(part))
        for array in layout:
            if array.nbytes == 0:
                continue
            flat = memoryview(array.reshape(-1).view(np.uint8).data)
            for block in range(0, len(flat), _WRITE_BLOCK):
                piece = flat[block : block + _WRITE_BLOCK]
                digest.update(piece)
                _write_all(fd, piece)
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest(), 8 + len(head) + offset


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]
