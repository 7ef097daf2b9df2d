"""The distance of an update from its base, summed as its bytes arrive: the same figure
as reading the file afterwards, however the bytes are cut, and no figure at all for bytes
it cannot follow."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from federation_grpc.hub import gate as gate_module
from federation_grpc.hub.domain import UploadState
from federation_grpc.hub.parameters import update_norm
from federation_grpc.hub.streamed_norm import MAX_STREAMED_HEADER, StreamedNorm
from federation_grpc.hub.tensorfile import read_tensors
from federation_grpc.hub.uploads import UploadSession

from .conftest import ALL_GROUPS, enrol, header_for, nudged, small_model
from .test_gate import gated_service


def _base(tmp_path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    tensors = {
        "encoder.weight": rng.normal(size=(40, 33)).astype(np.float32),
        "encoder.bias": rng.normal(size=(7,)).astype(np.float64),
        "heads.liver.weight": rng.normal(size=(3, 5)).astype(np.float16),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 5), dtype=np.float32),
    }
    (tmp_path / "base.safetensors").write_bytes(save(tensors))
    return read_tensors(tmp_path / "base.safetensors")  # read by position, as the hub does


def _update(base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(6)
    update = {name: (value + rng.normal(size=value.shape)).astype(value.dtype)
              if value.dtype.kind == "f" else np.asarray(value + 1)
              for name, value in base.items()}
    update["heads.new.weight"] = np.ones(9, dtype=np.float32)  # an added head: no base
    return update


def _fed(base: dict[str, np.ndarray], payload: bytes, cut: int) -> float | None:
    norm = StreamedNorm(base)
    view = memoryview(payload)
    for start in range(0, len(payload), cut):
        norm.feed(view[start : start + cut])
    return norm.squares()


@pytest.mark.parametrize("cut", [1, 3, 7, 64, 1000, 1 << 20])
def test_the_streamed_norm_is_the_norm_of_the_file_however_the_bytes_are_cut(
        tmp_path: Path, cut: int) -> None:
    # Cuts of 1, 3 and 7 bytes split the 8-byte length, the header and every value of
    # float16, float32 and float64 across chunks.
    base = _base(tmp_path)
    payload = save(_update(base))
    (tmp_path / "update.safetensors").write_bytes(payload)
    stored = read_tensors(tmp_path / "update.safetensors")
    expected = update_norm({k: v for k, v in stored.items() if k in base}, base)
    squares = _fed(base, payload, cut)
    assert squares is not None
    assert math.sqrt(squares) == pytest.approx(expected, rel=1e-5)
    assert expected > 1.0


def test_only_floating_tensors_the_base_holds_alike_are_counted(tmp_path: Path) -> None:
    base = _base(tmp_path)
    update = {"encoder.bias": base["encoder.bias"] + 2.0,
              "bn.num_batches_tracked": np.array(1000, dtype=np.int64),
              "heads.new.weight": np.full(9, 50.0, dtype=np.float32),
              "encoder.weight": np.zeros((33, 40), dtype=np.float32)}  # another shape
    squares = _fed(base, save(update), 5)
    assert squares == pytest.approx(4.0 * 7)


def _raw(header: dict[str, object] | bytes, data: bytes = b"") -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


@pytest.mark.parametrize("payload", [
    _raw(b"not json"),
    _raw(b"[1, 2]"),
    _raw({"encoder.bias": {"dtype": "F64", "shape": [7], "data_offsets": [8, 64]}},
         bytes(64)),  # starts after a gap
    _raw({"encoder.bias": {"dtype": "F64", "shape": [7], "data_offsets": [0, 8]}}, bytes(8)),
    struct.pack("<Q", MAX_STREAMED_HEADER + 1) + bytes(100),
], ids=["not-json", "not-an-object", "gap", "size-mismatch", "header-too-long"])
def test_bytes_it_cannot_follow_give_no_figure(tmp_path: Path, payload: bytes) -> None:
    base = _base(tmp_path)
    assert _fed(base, payload, 3) is None
    assert _fed(base, payload, len(payload)) is None


def test_a_short_update_gives_what_arrived_and_nothing_breaks(tmp_path: Path) -> None:
    base = _base(tmp_path)
    payload = save(_update(base))
    assert _fed(base, payload[:5], 2) == 0.0  # not even the header's length
    assert _fed(base, payload[: len(payload) // 2], 7) is not None
    assert _fed(base, payload + b"trailing bytes", 7) is not None  # refused by the intake


def _no_file_norm(*_: object) -> float:
    raise AssertionError("the norm was computed again from the files")


def test_an_upload_is_gated_on_the_norm_summed_as_it_arrived(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = gated_service(tmp_path, max_update_norm=50.0, max_relative_update_norm=0.0)
    monkeypatch.setattr(gate_module, "update_norm", _no_file_norm)
    try:
        node = enrol(svc)
        for tensors, state in ((nudged(small_model(), ALL_GROUPS), UploadState.RECEIVED),
                               ({k: v * 1e6 for k, v in small_model().items()
                                 if "spleen" not in k}, UploadState.REJECTED)):
            payload = save(tensors)
            header = header_for(payload, ALL_GROUPS)
            # Resumed at an odd offset, in chunks that cut values: the first session
            # ends mid-update, and the second sums the held bytes from the file first.
            first = svc.uploads.begin(node, header)
            assert isinstance(first, UploadSession)
            cut = len(payload) // 2 + 3
            for start in range(0, cut, 5):
                first.write(payload[start:min(start + 5, cut)])
            assert first.finish().state == UploadState.PARTIAL
            second = svc.uploads.begin(node, replace(header, offset=cut))
            assert isinstance(second, UploadSession)
            for start in range(cut, len(payload), 7):
                second.write(payload[start:start + 7])
            status = second.finish()
            assert status.state == state, status.reason
        # Every byte counted, those of the first session too: the figure the file gives.
        counted = {k: v for k, v in tensors.items() if k in small_model()}
        full = math.sqrt(sum(float(np.sum((v.astype(np.float64) - small_model()[k]) ** 2))
                             for k, v in counted.items()))
        assert f"update norm {full:.4g} exceeds the bound 50" in status.reason
    finally:
        svc.close()


def test_an_update_whose_header_is_too_long_to_follow_is_gated_from_its_file(
        tmp_path: Path) -> None:
    svc = gated_service(tmp_path, max_update_norm=50.0, max_relative_update_norm=0.0)
    try:
        node = enrol(svc)
        huge = {k: v * 1e6 for k, v in small_model().items() if "spleen" not in k}
        payload = save(huge, metadata={"note": "x" * (MAX_STREAMED_HEADER + 10)})
        session = svc.uploads.begin(node, header_for(payload, ALL_GROUPS))
        assert isinstance(session, UploadSession)
        session.write(payload)
        status = session.finish()
        assert status.state == UploadState.REJECTED
        assert "exceeds the bound 50" in status.reason
    finally:
        svc.close()
