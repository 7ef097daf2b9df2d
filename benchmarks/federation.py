"""Federation benchmark: N simulated nodes push updates concurrently to a real hub.

Starts ``tessera hub serve`` as its own process on 127.0.0.1 (mutual TLS unless
``--insecure``), gives it a generation 0 of ``--size-mb`` MB, then N clients (threads,
one gRPC channel each) each upload one full-size update at once. Prints:

* merged updates/s (first upload start -> last generation published),
* p50/p95 from the end of an upload to the generation holding it becoming current,
* the hub's peak RSS (VmHWM),
* upload throughput against a raw loopback TCP copy of the same bytes, measured in the
  same run with the same concurrency; and against a *durable* raw copy (the receiver
  also hashes each stream and writes it to a file fsync'd at the end), which is the
  least an upload the hub acknowledges as received must cost,
* and against a *bare gRPC* server (``benchmarks/grpc_floor.py``: same concurrency,
  chunks and mutual TLS, raw-bytes messages hashed and fsync'd, nothing else): the
  ceiling of grpcio itself, so ``grpc_vs_bare_grpc`` is the share the hub's own code
  leaves of what the transport can carry,
* CPU seconds per GB uploaded (hub and nodes together) against the raw copy's: unlike
  throughput, this barely moves when other work shares the cores.

Bounded: one update per client, and ``--timeout`` seconds overall.

    python benchmarks/federation.py --clients 50 --size-mb 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from safetensors.numpy import save

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import grpc_floor  # noqa: E402
from federation_grpc.client import FederationClient  # noqa: E402
from federation_grpc.connection import ClientTls, RetryPolicy  # noqa: E402
from federation_grpc.hub.certs import make_certs  # noqa: E402
from federation_grpc.hub.config import load_config  # noqa: E402
from federation_grpc.hub.domain import UploadState  # noqa: E402
from federation_grpc.hub.service import HubService  # noqa: E402
from federation_grpc.uploading import UpdateMetadata  # noqa: E402
from tests.federation.hubproc import HubProcess  # noqa: E402

HEADS = ("liver", "spleen")


def make_model(size_mb: float) -> dict[str, np.ndarray]:
    floats = int(size_mb * 1024 * 1024 / 4)
    head = 4096
    rng = np.random.default_rng(0)
    model = {"encoder.weight": rng.normal(size=(floats - 2 * head,)).astype(np.float32)}
    for name in HEADS:
        model[f"heads.{name}.weight"] = rng.normal(size=(head,)).astype(np.float32)
    return model


def make_update(model: dict[str, np.ndarray], seed: int) -> tuple[bytes, tuple[str, ...]]:
    head = HEADS[seed % len(HEADS)]
    groups = ("encoder", f"heads.{head}")
    rng = np.random.default_rng(seed)
    tensors = {
        k: v + np.float32(0.01) * rng.standard_normal(v.shape, dtype=np.float32)
        for k, v in model.items()
        if k.startswith("encoder.") or k.startswith(f"heads.{head}.")
    }
    return save(tensors), groups


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler:
    """Samples a process's resident set (anonymous vs file-mapped pages) every 20 ms:
    anonymous is heap and buffers, file-mapped is the pages of memory-mapped blobs read."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = dict.fromkeys(self.FIELDS, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            for line in text.splitlines():
                key = line.split(":", 1)[0]
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(line.split()[1]) / 1024)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {key: round(value, 1) for key, value in self.peak.items()}


def write_config(  # type: ignore[type-arg]
    path: Path, data: Path, certs: dict, strategy: str, buffer: int,
    max_workers: int = 160, max_update_bytes: int = 268435456,
) -> None:
    path.write_text(
        f"""
[hub]
host = "127.0.0.1"
port = 0
data_dir = "{data}"
max_workers = {max_workers}

[tls]
ca_cert = "{certs["ca"].cert}"
server_cert = "{certs["hub"].cert}"
server_key = "{certs["hub"].key}"

[limits]
max_update_bytes = {max_update_bytes}

[aggregation]
strategy = "{strategy}"
buffer_size = {buffer}
"""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--size-mb", type=float, default=10.0)
    parser.add_argument("--strategy", default="fedasync", choices=["fedasync", "fedbuff", "fedavg"])
    parser.add_argument("--buffer-size", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--chunk-mb", type=float, default=1.0, help="upload chunk size")
    parser.add_argument(
        "--insecure", action="store_true", help="no TLS (hub --insecure-loopback), to see TLS cost"
    )
    parser.add_argument("--json", action="store_true", help="print figures as JSON too")
    parser.add_argument(
        "--resume-at", type=float, default=0.0,
        help="large-model mode: one update of --size-mb and its generation's download, "
        "each connection killed at this fraction and resumed (e.g. 0.5)")
    parser.add_argument(
        "--watchers", type=int, default=0,
        help="many-nodes mode: this many enrolled nodes hold a watch stream while "
        "--clients nodes upload; measures publication -> last node notified")
    parser.add_argument("--watcher-procs", type=int, default=4,
                        help="processes the watchers are spread over (many-nodes mode)")
    args = parser.parse_args()
    if args.resume_at or args.watchers:
        from benchmarks import hub_scale

        figures = (hub_scale.run_large(args) if args.resume_at else hub_scale.run_fleet(args))
        print()
        for key, value in figures.items():
            print(f"{key:>28}: {value}")
        if args.json:
            print(json.dumps(figures))
        return

    work = Path(tempfile.mkdtemp(prefix="tessera-fedbench-"))
    # Each simulated node is its own node: its own certificate, so the hub's per-node
    # call cap ([limits] max_calls_per_node, keyed by certificate) counts each apart.
    names = tuple(f"node{i}" for i in range(args.clients))
    certs = make_certs(work / "tls", nodes=names)
    config_path = work / "hub.toml"
    write_config(config_path, work / "data", certs, args.strategy, args.buffer_size)
    model = make_model(args.size_mb)
    setup = HubService(load_config(config_path))
    setup.init_model(save(model), json.dumps({"architecture": "bench"}))
    tokens = [setup.create_enrolment_token()[0] for _ in range(args.clients)]
    setup.close()
    print(f"preparing {args.clients} updates of {args.size_mb:g} MB ...", flush=True)
    updates = [make_update(model, i) for i in range(args.clients)]
    payloads = [u[0] for u in updates]
    raw, raw_cpu = raw_loopback(payloads)
    (work / "raw").mkdir()
    durable, durable_cpu = raw_loopback(payloads, work / "raw")
    shutil.rmtree(work / "raw")
    chunk_size = int(args.chunk_mb * 1024 * 1024)
    bare, bare_cpu = grpc_floor.measure(
        payloads,
        work / "bare",
        chunk_size,
        server_tls=None if args.insecure else (
            certs["ca"].cert, certs["hub"].cert, certs["hub"].key),
        client_tls=None if args.insecure else (
            certs["ca"].cert.read_bytes(), certs[names[0]].key.read_bytes(),
            certs[names[0]].cert.read_bytes()),
    )
    shutil.rmtree(work / "bare")

    hub = HubProcess(config_path, work / "hub.log", insecure=args.insecure)
    sampler = RssSampler(hub.proc.pid)
    idle_rss = peak_rss_mb(hub.proc.pid)
    target = f"127.0.0.1:{hub.port}"
    retry = RetryPolicy(attempts=5, initial_backoff_s=0.2, max_backoff_s=2.0)
    clients = [
        FederationClient(
            target,
            tls=None if args.insecure else ClientTls.from_files(
                certs["ca"].cert, certs[name].cert, certs[name].key),
            insecure=args.insecure,
            retry=retry,
            timeout_s=args.timeout,
            chunk_size=chunk_size,
        )
        for name in names
    ]
    for client, token in zip(clients, tokens, strict=True):
        client.enrol(token, "bench")

    published: dict[int, float] = {}
    stop = threading.Event()

    def watch() -> None:
        for generation in clients[0].watch(known_generation=0, stop=stop):
            published[generation.number] = time.perf_counter()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ids = [str(uuid.uuid4()) for _ in updates]
    ended: dict[str, float] = {}
    results: dict[str, object] = {}
    go = threading.Barrier(len(clients) + 1)

    def push(index: int) -> None:
        payload, groups = updates[index]
        meta = UpdateMetadata(ids[index], 0, 20, groups, {"dice": 0.8})
        go.wait()
        results[ids[index]] = clients[index].upload(payload, meta)
        ended[ids[index]] = time.perf_counter()

    pushers = [threading.Thread(target=push, args=(i,)) for i in range(len(clients))]
    for thread in pushers:
        thread.start()
    go.wait()
    start = time.perf_counter()
    nodes_cpu, hub_cpu = time.process_time(), cpu_seconds(hub.proc.pid)
    for thread in pushers:
        thread.join(args.timeout)
    uploads_done = time.perf_counter()
    nodes_cpu, hub_cpu = time.process_time() - nodes_cpu, cpu_seconds(hub.proc.pid) - hub_cpu
    deadline = start + args.timeout
    merged_into: dict[str, int] = {}
    while time.perf_counter() < deadline and len(merged_into) < len(ids):
        for client, update_id in zip(clients, ids, strict=True):
            if update_id not in merged_into:
                status = client.upload_status(update_id)
                if status.state == UploadState.MERGED:
                    merged_into[update_id] = status.merged_into
                elif status.state == UploadState.REJECTED:
                    merged_into[update_id] = -1
        time.sleep(0.1)
    time.sleep(0.3)  # let the watcher see the last generation
    stop.set()
    rss = peak_rss_mb(hub.proc.pid)
    sampled = sampler.stop()
    hub.stop()
    for client in clients:
        client.close()

    merged = {u: g for u, g in merged_into.items() if g >= 0}
    latencies = sorted(
        published[g] - ended[u] for u, g in merged.items() if g in published and u in ended
    )
    last_generation = max(
        (published[g] for g in set(merged.values()) if g in published), default=start
    )
    total_bytes = sum(len(u[0]) for u in updates)
    grpc_mb_s = total_bytes / (uploads_done - start) / 1e6
    per_gb = total_bytes / 1e9
    figures = {
        "clients": args.clients,
        "update_mb": round(total_bytes / len(updates) / 1e6, 2),
        "strategy": args.strategy,
        "uploaded": len(ended),
        "merged": len(merged),
        "rejected": len(merged_into) - len(merged),
        "lost": len(ids) - len(merged_into),
        "generations": len(set(merged.values())),
        "merged_updates_per_s": round(len(merged) / (last_generation - start), 2),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3)
        if latencies
        else None,
        "hub_idle_rss_mb": round(idle_rss, 1),
        "hub_peak_rss_mb": round(rss, 1),
        "hub_peak_rss_anon_mb": sampled["RssAnon"],
        "hub_peak_rss_file_mb": sampled["RssFile"],
        "grpc_upload_mb_s": round(grpc_mb_s, 1),
        "raw_loopback_mb_s": round(raw, 1),
        "grpc_vs_raw": round(grpc_mb_s / raw, 3),
        "durable_raw_mb_s": round(durable, 1),
        "grpc_vs_durable_raw": round(grpc_mb_s / durable, 3),
        "bare_grpc_mb_s": round(bare, 1),
        "bare_grpc_vs_raw": round(bare / raw, 3),
        "grpc_vs_bare_grpc": round(grpc_mb_s / bare, 3),
        "grpc_cpu_s_per_gb": round((hub_cpu + nodes_cpu) / per_gb, 2),
        "hub_cpu_s_per_gb": round(hub_cpu / per_gb, 2),
        "nodes_cpu_s_per_gb": round(nodes_cpu / per_gb, 2),
        "raw_cpu_s_per_gb": round(raw_cpu, 2),
        "durable_raw_cpu_s_per_gb": round(durable_cpu, 2),
        "bare_grpc_cpu_s_per_gb": round(bare_cpu, 2),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "tls": not args.insecure,
        "chunk_mb": args.chunk_mb,
        "cpus": os.cpu_count(),
    }
    shutil.rmtree(work, ignore_errors=True)
    print()
    for key, value in figures.items():
        print(f"{key:>22}: {value}")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
