"""A node's side of the hub's generations: watch for new ones, download one.

:func:`watch_generations` yields each new current generation, reconnecting with backoff
until told to stop. :func:`download_bytes` and :func:`download_file` fetch a generation's
safetensors bytes in chunks, resuming by offset after a failure (a file download resumes
from the ``.part`` file an interrupted run left) and checking the sha256 the hub
announced; a mismatch discards the bytes and raises :class:`IntegrityError`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from federation_grpc._proto import federation_pb2 as pb
from federation_grpc._proto import federation_pb2_grpc
from federation_grpc.connection import CallSettings, is_transient, refusal
from federation_grpc.errors import FederationError, HubUnavailable

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    number: int
    parent: int
    sha256: str
    size_bytes: int
    config_json: str
    status: str
    update_ids: tuple[str, ...] = ()
    # Generations published since the watcher's previous one that this one replaced.
    superseded: tuple[int, ...] = ()

    @classmethod
    def from_proto(cls, message: pb.GenerationInfo,
                   superseded: Sequence[int] = ()) -> Generation:
        return cls(
            number=message.number,
            parent=message.parent,
            sha256=message.sha256,
            size_bytes=message.size_bytes,
            config_json=message.config_json,
            status=message.status,
            update_ids=tuple(message.update_ids),
            superseded=tuple(superseded),
        )


class IntegrityError(FederationError):
    """Downloaded bytes do not match what the hub announced."""


def watch_generations(
    stub: federation_pb2_grpc.FederationStub,
    settings: Callable[[], CallSettings],
    known_generation: int,
    stop: threading.Event,
) -> Iterator[Generation]:
    """Yield each new current generation; reconnects (with backoff) until ``stop`` is set.

    ``settings`` is asked again at each reconnect (the node's token may change).
    """
    known = known_generation
    failures = 0
    while not stop.is_set():
        current = settings()
        call = stub.WatchGenerations(
            pb.WatchGenerationsRequest(known_generation=known), metadata=current.metadata
        )
        cancel_on_stop = threading.Thread(
            target=lambda c=call: (stop.wait(), c.cancel()), daemon=True
        )
        cancel_on_stop.start()
        try:
            for event in call:
                failures = 0
                if event.HasField("generation") and event.generation.number != known:
                    known = event.generation.number
                    yield Generation.from_proto(event.generation, event.superseded)
        except grpc.RpcError as error:
            if stop.is_set():
                return
            if not is_transient(error):
                raise refusal(error) from error
            delay = current.retry.delay(min(failures, 10))
            failures += 1
            LOGGER.info(
                "watch interrupted (%s); reconnecting in %.1fs", error.code().name, delay
            )  # type: ignore[attr-defined]
            stop.wait(delay)
        finally:
            call.cancel()


def download_bytes(
    stub: federation_pb2_grpc.FederationStub,
    settings: CallSettings,
    generation: int,
    chunk_size: int,
    on_chunk: Callable[[int], None] | None = None,
) -> bytes:
    """The generation's safetensors bytes, resuming by offset across failures."""
    sink = _MemorySink()
    _download_into(stub, settings, generation, chunk_size, sink, on_chunk)
    return bytes(sink.buffer)


def download_file(
    stub: federation_pb2_grpc.FederationStub,
    settings: CallSettings,
    generation: int,
    chunk_size: int,
    path: Path,
    on_chunk: Callable[[int], None] | None = None,
) -> Path:
    """Download into ``path``; a ``path.part`` left by an interrupted run is resumed."""
    sink = _FileSink(path.with_name(path.name + ".part"))
    try:
        _download_into(stub, settings, generation, chunk_size, sink, on_chunk)
    finally:
        sink.close()
    os.replace(sink.path, path)
    return path


def _download_into(
    stub: federation_pb2_grpc.FederationStub,
    settings: CallSettings,
    generation: int,
    chunk_size: int,
    sink: _Sink,
    on_chunk: Callable[[int], None] | None,
) -> None:
    seen: dict[str, Any] = {}

    def attempt() -> None:
        request = pb.DownloadGenerationRequest(
            generation=generation, offset=sink.size(), chunk_size=chunk_size
        )
        for chunk in stub.DownloadGeneration(
            request, metadata=settings.metadata, timeout=settings.timeout_s
        ):
            if chunk.offset != sink.size():
                raise IntegrityError(f"hub sent offset {chunk.offset}, expected {sink.size()}")
            seen.update(total=chunk.total_size, sha256=chunk.sha256)
            if chunk.data:
                sink.write(chunk.data)
                if on_chunk is not None:
                    on_chunk(sink.size())

    settings.run(f"download generation {generation}", attempt)
    if sink.size() != seen.get("total"):
        raise HubUnavailable(f"download of generation {generation} ended early")
    if sink.sha256() != seen["sha256"]:
        sink.reset()
        raise IntegrityError(f"sha256 of generation {generation} does not match; discarded")


class _Sink:
    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def size(self) -> int:
        raise NotImplementedError

    def sha256(self) -> str:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class _MemorySink(_Sink):
    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> None:
        self.buffer.extend(data)

    def size(self) -> int:
        return len(self.buffer)

    def sha256(self) -> str:
        return hashlib.sha256(self.buffer).hexdigest()

    def reset(self) -> None:
        self.buffer.clear()


class _FileSink(_Sink):
    """Appends to a ``.part`` file whose size is the resume offset, even after a restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = path.open("ab")

    def write(self, data: bytes) -> None:
        self._fh.write(data)
        self._fh.flush()

    def size(self) -> int:
        return self._fh.tell()

    def sha256(self) -> str:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        digest = hashlib.sha256()
        with self.path.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()

    def reset(self) -> None:
        self._fh.truncate(0)
        self._fh.seek(0)

    def close(self) -> None:
        self._fh.close()
