"""Zero-copy safetensors files: round trip with the reference library, hostile headers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load, save

from federation_grpc.errors import InvalidRequest
from federation_grpc.hub.blobs import BlobStore, sha256_file
from federation_grpc.hub.parameters import tensors_norm
from federation_grpc.hub.tensorfile import BlockReader, read_tensors, write_tensors


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "encoder.weight": rng.normal(size=(4, 3, 3)).astype(np.float32),
        "encoder.bias": rng.normal(size=(4,)).astype(np.float64),
        "heads.liver.weight": rng.normal(size=(2, 4)).astype(np.float16),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 5), dtype=np.float32),
        "mask": np.array([True, False, True]),
    }


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value)


def test_reads_what_the_reference_library_writes(tmp_path: Path) -> None:
    path = tmp_path / "ref.safetensors"
    path.write_bytes(save(tensors(), metadata={"format": "np"}))
    got = read_tensors(path)
    assert_same(got, tensors())
    with pytest.raises(ValueError):  # views over the map: nobody edits a stored blob
        got["encoder.weight"][0, 0, 0] = 1.0


def test_the_reference_library_reads_what_we_write(tmp_path: Path) -> None:
    path = tmp_path / "ours.safetensors"
    sha, size = write_tensors(path, tensors())
    assert size == path.stat().st_size
    assert sha == sha256_file(path)
    assert_same(load(path.read_bytes()), tensors())
    assert_same(read_tensors(path), tensors())


def test_blob_store_puts_tensors_under_their_digest(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    sha, size = blobs.put_tensors(tensors())
    assert blobs.path(sha).stat().st_size == size
    assert sha256_file(blobs.path(sha)) == sha
    assert not list((tmp_path / "blobs").glob(".incoming-*"))  # no temp file left


def test_non_contiguous_and_read_only_inputs_are_written_correctly(tmp_path: Path) -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    mapped = tmp_path / "a.safetensors"
    write_tensors(mapped, {"x": base})
    view = read_tensors(mapped)["x"]
    out = tmp_path / "b.safetensors"
    write_tensors(out, {"t": base.T, "v": view})
    got = load(out.read_bytes())
    np.testing.assert_array_equal(got["t"], base.T)
    np.testing.assert_array_equal(got["v"], base)


def test_blocks_read_by_position_equal_the_mapped_values(tmp_path: Path) -> None:
    write_tensors(tmp_path / "t", tensors())
    for name, value in read_tensors(tmp_path / "t").items():
        reader = BlockReader(value, 5)
        walked = [reader.read(slice(at, min(value.size, at + 5))).copy()
                  for at in range(0, value.size, 5)]
        flat = np.concatenate(walked) if walked else np.empty(0, value.dtype)
        np.testing.assert_array_equal(flat, tensors()[name].reshape(-1), err_msg=name)
    with pytest.raises(ValueError, match="holds 5"):
        BlockReader(read_tensors(tmp_path / "t")["encoder.weight"], 5).read(slice(0, 6))


def test_the_norm_of_a_mapped_tensor_is_its_own_files(tmp_path: Path) -> None:
    # Norms of mapped tensors are kept per map and position: two files with the same
    # layout must not share them.
    for name, scale in (("a", 1.0), ("b", 3.0)):
        write_tensors(tmp_path / name, {"w": np.full(100, scale, dtype=np.float32)})
    for _ in range(2):
        assert tensors_norm(read_tensors(tmp_path / "a")) == pytest.approx(10.0)
        held = read_tensors(tmp_path / "b")
        assert tensors_norm(held) == pytest.approx(30.0)
        assert tensors_norm(held) == pytest.approx(30.0)


def _file(
    tmp_path: Path, header: object, data: bytes = b"", raw_header: bytes | None = None
) -> Path:
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


def entry(offsets: list[int], shape: list[int], dtype: str = "F32") -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


@pytest.mark.parametrize(
    ("header", "data", "why"),
    [
        ({"a": entry([0, 8], [2]), "b": entry([12, 16], [1])}, bytes(16), "gap"),
        ({"a": entry([0, 8], [2]), "b": entry([4, 12], [2])}, bytes(12), "overlap"),
        ({"a": entry([0, 8], [2])}, bytes(12), "after the last"),
        ({"a": entry([0, 16], [4])}, bytes(8), "past the end"),
        ({"a": entry([0, 8], [3])}, bytes(8), "its shape needs"),
        ({"a": entry([0, 8], [2], "BF16")}, bytes(8), "bad dtype"),
        ({"a": entry([0, 8], [-2])}, bytes(8), "bad dtype"),
        ({"a": entry([8, 0], [0])}, bytes(8), "bad dtype"),
        ({"a": entry([0, 8, 9], [2])}, bytes(8), "bad dtype"),
        ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "bad dtype"),
        ({"a": entry([0, 8], [True, 2])}, bytes(8), "bad dtype"),
        ({"a": "not an entry"}, bytes(8), "entry"),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
        ([1, 2], b"", "not a JSON object"),
    ],
)
def test_hostile_headers_are_refused(
    tmp_path: Path, header: object, data: bytes, why: str
) -> None:
    with pytest.raises(InvalidRequest, match=why):
        read_tensors(_file(tmp_path, header, data))


def test_truncated_and_garbage_files_are_refused(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(InvalidRequest, match="shorter"):
        read_tensors(short)
    huge = tmp_path / "huge"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(InvalidRequest, match="header length"):
        read_tensors(huge)
    with pytest.raises(InvalidRequest, match="not JSON"):
        read_tensors(_file(tmp_path, None, b"", raw_header=b"\xff\xfe{"))
