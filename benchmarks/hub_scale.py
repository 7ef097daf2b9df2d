"""Large models and many nodes: the two scale modes of ``benchmarks/federation.py``.

* :func:`run_large` (``--size-mb 2048 --resume-at 0.5``): one node uploads one update of
  the model's size over mutual TLS through a proxy that kills the connection at that
  fraction; the client resumes from the hub's offset; the hub merges it; the node then
  downloads the new generation through a proxy that kills it at the same fraction, and
  resumes. Both files are written and read in blocks here (a memory map is uploaded),
  so this process stays small too. Prints throughput, bytes forwarded against the
  payload (resumed, not restarted), the sha256 check, the hub's peak RSS.
* :func:`run_fleet` (``--watchers 1000 --clients 100``): that many enrolled nodes, each
  with its own certificate and token, hold a ``WatchGenerations`` stream (spread over
  ``--watcher-procs`` processes, one asyncio loop and one TLS connection per node
  each), while ``--clients`` other nodes upload at once. Prints, from each generation's
  publication (its ``created_at``) to each node's receipt: the delay until the last
  node was told (p50, p99 over generations) and per node (p50, p99), how many nodes
  missed the final generation, the hub's peak RSS and open file descriptors.

    python benchmarks/federation.py --size-mb 2048 --resume-at 0.5
    python benchmarks/federation.py --watchers 1000 --clients 100 --size-mb 1
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import mmap
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.federation import RssSampler, peak_rss_mb, percentile, write_config  # noqa: E402
from federation_grpc.client import FederationClient  # noqa: E402
from federation_grpc.connection import ClientTls, RetryPolicy  # noqa: E402
from federation_grpc.hub.certs import make_certs  # noqa: E402
from federation_grpc.hub.config import load_config  # noqa: E402
from federation_grpc.hub.domain import UploadState  # noqa: E402
from federation_grpc.hub.service import HubService  # noqa: E402
from federation_grpc.hub.tensorfile import write_blocks  # noqa: E402
from federation_grpc.uploading import UpdateMetadata  # noqa: E402
from tests.federation.cutproxy import CutProxy  # noqa: E402
from tests.federation.hubproc import HubProcess  # noqa: E402

CONFIG = json.dumps({"architecture": "bench", "heads": {"liver": ["liver"]}})
HEAD = 4096
BLOCK = 16 << 20  # floats per generated block (64 MB)


def _model_file(path: Path, size_mb: float, step: float, seed: int) -> None:
    """A model of ``size_mb`` written in blocks; ``step`` > 0 nudges it (an update)."""
    floats = max(HEAD, int(size_mb * (1 << 20) / 4) - HEAD)

    def blocks() -> Iterator[tuple[str, np.ndarray]]:
        for index, start in enumerate(range(0, floats, BLOCK)):
            values = np.random.default_rng(index).standard_normal(
                min(BLOCK, floats - start), dtype=np.float32)
            if step:
                values += np.float32(step) * np.random.default_rng(
                    (seed, index)).standard_normal(values.size, dtype=np.float32)
            yield "encoder.weight", values
        yield "heads.liver.weight", np.full(HEAD, 0.5 + step, dtype=np.float32)

    layout = [("encoder.weight", np.dtype("<f4"), (floats,)),
              ("heads.liver.weight", np.dtype("<f4"), (HEAD,))]
    write_blocks(path, layout, blocks())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _raise_fd_limit() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def run_large(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="tessera-large-"))
    need = int(args.size_mb * (1 << 20) * 6)
    free = shutil.disk_usage(work).free
    if free < need:
        shutil.rmtree(work)
        raise SystemExit(f"need {need >> 30} GiB free under {work.parent}, have {free >> 30}")
    try:
        return _large(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _large(args: argparse.Namespace, work: Path) -> dict[str, object]:
    certs = make_certs(work / "tls", nodes=("node0",))
    config = work / "hub.toml"
    size_limit = int(args.size_mb * (1 << 20)) + (1 << 20)
    write_config(config, work / "data", certs, "fedasync", 1, max_update_bytes=size_limit)
    print(f"writing a {args.size_mb:g} MB model and an update ...", flush=True)
    _model_file(work / "g0.safetensors", args.size_mb, 0.0, 0)
    _model_file(work / "update.safetensors", args.size_mb, 0.01, 1)
    setup = HubService(load_config(config))
    setup.init_model(work / "g0.safetensors", CONFIG)
    token, _ = setup.create_enrolment_token()
    setup.close()
    (work / "g0.safetensors").unlink()
    hub = HubProcess(config, work / "hub.log")
    sampler = RssSampler(hub.proc.pid)
    size = (work / "update.safetensors").stat().st_size
    cut = int(size * args.resume_at)
    up = CutProxy(hub.port, cut, "up")
    down = CutProxy(hub.port, cut, "down")
    tls = ClientTls.from_files(certs["ca"].cert, certs["node0"].cert, certs["node0"].key)
    retry = RetryPolicy(attempts=8, initial_backoff_s=0.2, max_backoff_s=2.0)
    chunk = int(args.chunk_mb * (1 << 20))
    client = FederationClient(up.target, tls=tls, retry=retry, chunk_size=chunk,
                              timeout_s=args.timeout)
    client.enrol(token, "large")
    meta = UpdateMetadata(str(uuid.uuid4()), 0, 20, ("encoder", "heads.liver"), {})
    with (work / "update.safetensors").open("rb") as fh:
        # Mapped, not read: the node side stays small too. (Left to the collector: the
        # client's views of it may outlive the call.)
        payload = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    start = time.perf_counter()
    status = client.upload(payload, meta)  # type: ignore[arg-type]  # a buffer will do
    upload_s = time.perf_counter() - start
    deadline = time.perf_counter() + args.timeout
    while status.state == UploadState.RECEIVED and time.perf_counter() < deadline:
        time.sleep(0.2)
        status = client.upload_status(meta.update_id)
    merged_s = time.perf_counter() - start - upload_s
    reader = FederationClient(down.target, tls=tls, retry=retry, chunk_size=chunk,
                              timeout_s=args.timeout, node_token=client.node_token)
    start = time.perf_counter()
    target = work / "generation.safetensors"
    if status.state == UploadState.MERGED:
        reader.download_to(status.merged_into, target)  # resumes, checks size and sha256
    download_s = time.perf_counter() - start
    check = HubService(load_config(config))
    expected = check.generation(status.merged_into).sha256 if status.merged_into > 0 else ""
    check.close()
    peaks = sampler.stop()
    hwm = peak_rss_mb(hub.proc.pid)
    hub.stop()
    for each in (client, reader):
        each.close()
    up.close()
    down.close()
    return {
        "update_mb": round(size / 1e6, 1),
        "state": str(status.state),
        "killed_at": f"{cut} bytes ({args.resume_at:g})",
        "upload_connections": up.connections,
        "upload_forwarded_vs_payload": round(up.forwarded["up"] / size, 3),
        "upload_s": round(upload_s, 1),
        "upload_mb_s": round(size / upload_s / 1e6, 1),
        "merge_s": round(merged_s, 1),
        "download_connections": down.connections,
        "download_forwarded_vs_payload": round(down.forwarded["down"] / size, 3),
        "download_s": round(download_s, 1),
        "download_mb_s": round(size / download_s / 1e6, 1) if download_s else None,
        "download_sha256_ok": bool(expected) and target.exists() and _sha256(target) == expected,
        "hub_peak_rss_mb": round(hwm, 1),
        "hub_peak_rss_anon_mb": peaks["RssAnon"],
        "hub_peak_rss_file_mb": peaks["RssFile"],
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# --- many nodes -------------------------------------------------------------------------


async def _watch_all(spec: dict, out: Path) -> None:  # type: ignore[type-arg]
    """One process's share of the watchers: one TLS channel and stream per node."""
    import grpc

    from federation_grpc._proto import federation_pb2 as pb
    from federation_grpc._proto import federation_pb2_grpc

    ca = Path(spec["ca"]).read_bytes()
    seen: list[list[tuple[int, float]]] = [[] for _ in spec["nodes"]]
    first = asyncio.Event()
    started = [0]

    async def one(index: int, node: dict) -> None:  # type: ignore[type-arg]
        credentials = grpc.ssl_channel_credentials(
            ca, Path(node["key"]).read_bytes(), Path(node["cert"]).read_bytes())
        async with grpc.aio.secure_channel(spec["target"], credentials) as channel:
            stub = federation_pb2_grpc.FederationStub(channel)
            call = stub.WatchGenerations(
                pb.WatchGenerationsRequest(known_generation=-1),
                metadata=(("authorization", f"Bearer {node['token']}"),))
            try:
                async for event in call:
                    if event.HasField("generation"):
                        if not seen[index]:
                            started[0] += 1
                            if started[0] == len(seen):
                                first.set()
                        seen[index].append((event.generation.number, time.time()))
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.CANCELLED:
                    print(f"watch {index}: {error.code().name}", file=sys.stderr, flush=True)

    tasks = [asyncio.create_task(one(i, n)) for i, n in enumerate(spec["nodes"])]
    await first.wait()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    out.write_text(json.dumps(seen))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def run_fleet(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="tessera-fleet-"))
    try:
        return _fleet(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fleet(args: argparse.Namespace, work: Path) -> dict[str, object]:
    limit = _raise_fd_limit()  # children inherit it: the hub holds one socket per node
    watchers, uploaders = args.watchers, args.clients
    print(f"certificates for {watchers} watchers and {uploaders} uploaders ...", flush=True)
    names = tuple(f"node{i}" for i in range(watchers + uploaders))
    certs = make_certs(work / "tls", nodes=names)
    config = work / "hub.toml"
    write_config(config, work / "data", certs, "fedasync", 1,
                 max_workers=watchers + uploaders + 64)
    _model_file(work / "g0.safetensors", args.size_mb, 0.0, 0)
    setup = HubService(load_config(config))
    setup.init_model(work / "g0.safetensors", CONFIG)
    tokens = [setup.enrol(setup.create_enrolment_token()[0], name).node_token
              for name in names]  # bound to its certificate at its first call
    setup.close()
    hub = HubProcess(config, work / "hub.log")
    sampler = RssSampler(hub.proc.pid)
    target = f"127.0.0.1:{hub.port}"
    procs = []
    share = -(-watchers // args.watcher_procs)
    for p in range(args.watcher_procs):
        nodes = [{"cert": str(certs[names[i]].cert), "key": str(certs[names[i]].key),
                  "token": tokens[i]} for i in range(p * share, min(watchers, (p + 1) * share))]
        spec = work / f"watch{p}.json"
        spec.write_text(json.dumps({"target": target, "ca": str(certs["ca"].cert),
                                    "nodes": nodes}))
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "watch", str(spec), str(work / f"seen{p}.json")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO))
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise SystemExit("a watcher process did not get its streams going")
    fds_watching = _fds(hub.proc.pid)
    print(f"{watchers} watchers connected; {uploaders} nodes upload ...", flush=True)
    payloads = []
    for i in range(uploaders):
        path = work / f"u{i}.safetensors"
        _model_file(path, args.size_mb, 0.01, i + 1)
        payloads.append(path.read_bytes())
        path.unlink()
    retry = RetryPolicy(attempts=8, initial_backoff_s=0.2, max_backoff_s=2.0)
    clients = [FederationClient(target, tls=ClientTls.from_files(
        certs["ca"].cert, certs[names[watchers + i]].cert, certs[names[watchers + i]].key),
        node_token=tokens[watchers + i], retry=retry, timeout_s=args.timeout)
        for i in range(uploaders)]
    ids = [str(uuid.uuid4()) for _ in clients]
    statuses: dict[int, object] = {}

    def push(i: int) -> None:
        meta = UpdateMetadata(ids[i], 0, 20, ("encoder", "heads.liver"), {})
        statuses[i] = clients[i].upload(payloads[i], meta)

    pushers = [threading.Thread(target=push, args=(i,)) for i in range(uploaders)]
    start = time.perf_counter()
    for thread in pushers:
        thread.start()
    for thread in pushers:
        thread.join(args.timeout)
    fds_peak = _fds(hub.proc.pid)
    merged: dict[str, int] = {}
    deadline = start + args.timeout
    while len(merged) < uploaders and time.perf_counter() < deadline:
        for client, update_id in zip(clients, ids, strict=True):
            if update_id not in merged:
                status = client.upload_status(update_id)
                if status.state in (UploadState.MERGED, UploadState.REJECTED):
                    merged[update_id] = status.merged_into
        time.sleep(0.2)
    check = HubService(load_config(config))
    created = {g.number: g.created_at.timestamp() for g in check.list_generations()}
    final = check.current_number()
    check.close()
    # Every watcher must see the final generation: wait for it, bounded.
    time.sleep(min(5.0, args.timeout))
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
    for proc in procs:
        proc.wait(timeout=60)
    seen: list[list[tuple[int, float]]] = []
    for p in range(args.watcher_procs):
        path = work / f"seen{p}.json"
        if path.exists():
            seen.extend(json.loads(path.read_text()))
    peaks = sampler.stop()
    hwm = peak_rss_mb(hub.proc.pid)
    hub.stop()
    for client in clients:
        client.close()
    per_node = sorted(t - created[n] for events in seen for n, t in events if n > 0)
    last_per_generation: dict[int, float] = {}
    for events in seen:
        for n, t in events:
            if n > 0:
                last_per_generation[n] = max(last_per_generation.get(n, 0.0), t - created[n])
    last = sorted(last_per_generation.values())
    missed = sum(1 for events in seen if not events or events[-1][0] != final)
    return {
        "watchers": watchers,
        "watching_streams": len(seen),
        "uploaders": uploaders,
        "update_mb": args.size_mb,
        "merged": sum(1 for g in merged.values() if g > 0),
        "lost": uploaders - len(merged),
        "generations": len(last_per_generation),
        "final_generation": final,
        "watchers_missing_final": missed,
        "last_node_notified_p50_s": round(percentile(last, 0.5), 3) if last else None,
        "last_node_notified_p99_s": round(percentile(last, 0.99), 3) if last else None,
        "node_notified_p50_s": round(percentile(per_node, 0.5), 3) if per_node else None,
        "node_notified_p99_s": round(percentile(per_node, 0.99), 3) if per_node else None,
        "hub_peak_rss_mb": round(hwm, 1),
        "hub_peak_rss_anon_mb": peaks["RssAnon"],
        "hub_fds_watching": fds_watching,
        "hub_fds_peak": fds_peak,
        "fd_limit": limit,
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "watch":
        asyncio.run(_watch_all(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])))
    else:
        raise SystemExit("run through benchmarks/federation.py --resume-at or --watchers")
