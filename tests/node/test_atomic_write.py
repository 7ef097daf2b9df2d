"""The one atomic-write helper: the new bytes under the target's name or the old ones,
never half; fsyncs only when durable; a failure leaves the old file and no temporary;
two writers never share a temporary name."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from dicom_node.errors import StoreError
from dicom_node.store import durable
from dicom_node.store.durable import (
    WriteFailed,
    publish_atomic,
    stage_atomic,
    write_atomic,
)


def _fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


@pytest.mark.parametrize("is_durable", [True, False])
def test_replaces_the_file_and_leaves_no_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, is_durable: bool) -> None:
    fsyncs = _fsyncs(monkeypatch)
    target = tmp_path / "a" / "b" / "file.bin"
    write_atomic(target, b"old", durable=is_durable, root=tmp_path)
    write_atomic(target, b"new" * 1000, durable=is_durable, root=tmp_path)
    assert target.read_bytes() == b"new" * 1000
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    if is_durable:
        # file + directory per write, plus the parents of the two directories created
        assert len(fsyncs) == 2 * 2 + 2
    else:
        assert fsyncs == []


def test_mode_is_narrowed_by_the_umask_only(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "secret", b"x", durable=True, mode=0o600)
        write_atomic(tmp_path / "shared", b"x", durable=False, mode=0o666)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o644


@pytest.mark.parametrize("is_durable", [True, False])
def test_a_failed_write_keeps_the_old_file_and_no_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, is_durable: bool) -> None:
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"old")

    real_write = durable.write_all

    def disk_full(fd: int, data: bytes) -> None:
        real_write(fd, data[:1])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable, "write_all", disk_full)
    with pytest.raises(WriteFailed, match=r"cannot write weights\.safetensors: No space") as caught:
        write_atomic(target, b"new", durable=is_durable)
    assert isinstance(caught.value, StoreError) and isinstance(caught.value, OSError)
    assert caught.value.errno == 28
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_a_failed_rename_keeps_the_old_file_and_no_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "credentials.json"
    target.write_bytes(b"old")

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(WriteFailed, match=r"cannot publish credentials\.json"):
        write_atomic(target, b"new", durable=True)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["credentials.json"]


def test_staged_bytes_take_the_name_only_when_published(tmp_path: Path) -> None:
    target = tmp_path / "x.dcm"
    staged = stage_atomic(target, b"data", durable=True)
    assert staged.parent == tmp_path and staged.read_bytes() == b"data"
    assert not target.exists()
    publish_atomic(staged, target, durable=True)
    assert target.read_bytes() == b"data" and not staged.exists()


def test_two_writers_never_share_a_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both writers are inside their write at the same moment; each keeps its own
    temporary, and the target ends as one writer's bytes, whole."""
    target = tmp_path / "sample.npz"
    both_writing = threading.Barrier(2, timeout=10)
    real_write = durable.write_all
    temporaries: list[Path] = []

    def meeting(fd: int, data: bytes) -> None:
        temporaries.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        both_writing.wait()
        real_write(fd, data)

    monkeypatch.setattr(durable, "write_all", meeting)
    payloads = [b"A" * 100_000, b"B" * 100_000]
    threads = [threading.Thread(target=write_atomic, args=(target, p),
                                kwargs={"durable": False}) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(set(temporaries)) == 2
    assert all(t.parent == tmp_path and t.name != target.name for t in temporaries)
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["sample.npz"]
