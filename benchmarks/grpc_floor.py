"""The transport's own ceiling: a bare grpcio server that only keeps the bytes it gets.

``benchmarks/federation.py`` compares the hub's upload throughput with a raw loopback
socket copy. Between the two sits grpcio itself (HTTP/2 framing, flow control, its
completion-queue threads, one Python call per message), which no hub code can go
below. This module measures that floor in the same run, with the same concurrency,
chunk size and (m)TLS as the hub: a separate server process with one client-streaming
method whose messages are raw bytes (no protobuf), each stream hashed with sha256 and
written to a file fsync'd at its end, i.e. the least an upload must cost, minus
everything the hub adds (protobuf, authentication, the database, validation, the gate).

    python benchmarks/grpc_floor.py serve --sink DIR [--ca CA --cert CERT --key KEY]

prints its port on the first line; :func:`measure` starts it and pushes the payloads.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
from harness import cpu_seconds

METHOD = "/tessera.bench.v1.Floor/Upload"
MAX_MESSAGE = 8 * 1024 * 1024


def _same(data: bytes) -> bytes:
    return data


def serve(sink: Path, tls: tuple[Path, Path, Path] | None, workers: int) -> None:
    def upload(chunks: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        digest = hashlib.sha256()
        fd = os.open(sink / f"{uuid.uuid4()}.part", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for chunk in chunks:
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        return digest.digest()

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.so_reuseport", 0)],
    )
    handler = grpc.stream_unary_rpc_method_handler(upload, _same, _same)
    service, method = METHOD.strip("/").split("/")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {method: handler}),)
    )
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        ca, cert, key = tls
        credentials = grpc.ssl_server_credentials(
            [(key.read_bytes(), cert.read_bytes())],
            root_certificates=ca.read_bytes(),
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    print(port, flush=True)
    sys.stdin.read()  # runs until the parent closes our stdin
    server.stop(0)


def measure(
    payloads: list[bytes],
    sink: Path,
    chunk_size: int,
    server_tls: tuple[Path, Path, Path] | None = None,
    client_tls: tuple[bytes, bytes, bytes] | None = None,
    workers: int = 160,
) -> tuple[float, float]:
    """Push every payload at once, one channel each; ``(MB/s, CPU s per GB)``.

    CPU counts the server process and this one over the transfer, like the hub's figure.
    ``client_tls`` is ``(ca, key, cert)`` PEM bytes for mutual TLS.
    """
    sink.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "serve", "--sink", str(sink), "--workers", str(workers)]
    if server_tls is not None:
        ca, cert, key = server_tls
        command += ["--ca", str(ca), "--cert", str(cert), "--key", str(key)]
    server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        target = f"127.0.0.1:{int(server.stdout.readline())}"
        options = [("grpc.max_send_message_length", MAX_MESSAGE)]
        if client_tls is None:
            channels = [grpc.insecure_channel(target, options=options) for _ in payloads]
        else:
            credentials = grpc.ssl_channel_credentials(*client_tls)
            channels = [grpc.secure_channel(target, credentials, options=options)
                        for _ in payloads]
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=30)
        digests: list[bytes] = [b""] * len(payloads)
        go = threading.Barrier(len(payloads) + 1)

        def push(index: int) -> None:
            payload = payloads[index]
            call = channels[index].stream_unary(METHOD, _same, _same)
            view = memoryview(payload)
            go.wait()
            digests[index] = call(
                bytes(view[i:i + chunk_size]) for i in range(0, len(payload), chunk_size)
            )

        pushers = [threading.Thread(target=push, args=(i,)) for i in range(len(payloads))]
        for thread in pushers:
            thread.start()
        go.wait()
        start, cpu = time.perf_counter(), time.process_time() + cpu_seconds(server.pid)
        for thread in pushers:
            thread.join()
        elapsed = time.perf_counter() - start
        cpu = time.process_time() + cpu_seconds(server.pid) - cpu
        for channel in channels:
            channel.close()
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=30)
    if digests != [hashlib.sha256(p).digest() for p in payloads]:
        raise RuntimeError("the bare gRPC server kept different bytes than were sent")
    total = sum(map(len, payloads))
    return total / elapsed / 1e6, cpu / (total / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve")
    run.add_argument("--sink", type=Path, required=True)
    run.add_argument("--workers", type=int, default=160)
    run.add_argument("--ca", type=Path)
    run.add_argument("--cert", type=Path)
    run.add_argument("--key", type=Path)
    args = parser.parse_args()
    tls = (args.ca, args.cert, args.key) if args.ca else None
    serve(args.sink, tls, args.workers)


if __name__ == "__main__":
    main()
