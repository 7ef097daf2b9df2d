"""What the hub's upload throughput is compared with in ``federation.py``: the same
payloads, with the same concurrency, over a raw loopback TCP copy, a durable one (each
stream hashed and fsync'd) and a bare gRPC server (``grpc_floor.py``)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import grpc_floor


def raw_loopback(payloads: list[bytes], sink: Path | None = None) -> tuple[float, float]:
    """Same bytes, same concurrency, plain TCP on 127.0.0.1: the ceiling to compare with.

    With ``sink`` each stream is also hashed and written to a file there, fsync'd at its
    end. Returns ``(MB/s, CPU seconds of this process per GB)``.
    """
    listener = socket.create_server(("127.0.0.1", 0), backlog=len(payloads))
    port = listener.getsockname()[1]
    received = [0] * len(payloads)

    def serve_one(index: int) -> None:
        conn, _ = listener.accept()
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        digest = hashlib.sha256()
        fd = -1
        if sink is not None:
            fd = os.open(sink / f"{index}.part", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with conn:
            while n := conn.recv_into(buffer):
                received[index] += n
                if fd >= 0:
                    digest.update(view[:n])
                    os.write(fd, view[:n])
        if fd >= 0:
            os.fsync(fd)
            os.close(fd)

    servers = [threading.Thread(target=serve_one, args=(i,)) for i in range(len(payloads))]
    for thread in servers:
        thread.start()

    def send(payload: bytes) -> None:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(payload)

    senders = [threading.Thread(target=send, args=(p,)) for p in payloads]
    start, cpu = time.perf_counter(), time.process_time()
    for thread in senders:
        thread.start()
    for thread in senders + servers:
        thread.join()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    listener.close()
    assert sum(received) == sum(map(len, payloads))
    return sum(received) / elapsed / 1e6, cpu / (sum(received) / 1e9)


def floors(payloads: list[bytes], work: Path, certs: dict, node: str, insecure: bool,
           chunk_size: int) -> dict[str, float]:
    """The same payloads over a raw copy, a durable raw copy and a bare gRPC server (with
    the hub's mutual TLS as ``node`` unless ``insecure``): MB/s and CPU s per GB of each."""
    raw, raw_cpu = raw_loopback(payloads)
    (work / "raw").mkdir()
    durable, durable_cpu = raw_loopback(payloads, work / "raw")
    shutil.rmtree(work / "raw")
    bare, bare_cpu = grpc_floor.measure(
        payloads,
        work / "bare",
        chunk_size,
        server_tls=None if insecure else (
            certs["ca"].cert, certs["hub"].cert, certs["hub"].key),
        client_tls=None if insecure else (
            certs["ca"].cert.read_bytes(), certs[node].key.read_bytes(),
            certs[node].cert.read_bytes()),
    )
    shutil.rmtree(work / "bare")
    return {"raw": raw, "raw_cpu": raw_cpu, "durable": durable, "durable_cpu": durable_cpu,
            "bare": bare, "bare_cpu": bare_cpu}
