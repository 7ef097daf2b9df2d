"""Many nodes, a scale mode of ``benchmarks/federation.py`` (``--watchers 1000
--clients 100``): that many enrolled nodes, each with its own certificate and token,
hold a ``WatchGenerations`` stream (spread over ``--watcher-procs`` processes, one
asyncio loop and one TLS connection per node each), while ``--clients`` other nodes
upload at once. Prints, from each generation's publication (its ``created_at``) to each
node's receipt: the delay until the last node was told (p50, p99 over generations) and
per node (p50, p99), how many nodes missed the final generation and how many
(node, generation) notices were missed (a generation replaced before a node's next event
is named in that event's ``superseded``: told, not downloaded), the hub's peak RSS and
open file descriptors.
Run as ``many_nodes.py watch SPEC OUT``, it is one watcher process.
``benchmarks/replicas.py`` runs the same fleet against hub replicas on one PostgreSQL.

File descriptors: the hub holds one per connected node (1,284 at most with 1,000
watchers and 100 uploads; each of two replicas about 620) and each watcher process one
per node it watches. The run raises its soft ``RLIMIT_NOFILE`` to the hard limit, which
its children inherit, so ``ulimit -Hn`` must exceed watchers plus uploaders plus about
200 (database connections, blobs, the runtime): 2,000 or more for ``--watchers 1000
--clients 100``. Below that, streams fail to connect and the run stops with "a watcher
process did not get its streams going".

    python benchmarks/federation.py --watchers 1000 --clients 100 --size-mb 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from harness import REPO, RssSampler, load_average, peak_rss_mib, percentile
from hub_toml import write_config
from scale_models import CONFIG, model_file

from federation_grpc.client import FederationClient
from federation_grpc.connection import ClientTls, RetryPolicy
from federation_grpc.hub.certs import make_certs
from federation_grpc.hub.config import load_config
from federation_grpc.hub.domain import UploadState
from federation_grpc.hub.service import HubService
from federation_grpc.uploading import UpdateMetadata
from tests.federation.hubproc import HubProcess


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_fd_limit() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def _watch_all(spec: dict, out: Path) -> None:  # type: ignore[type-arg]
    """One process's share of the watchers: one TLS channel and stream per node."""
    import grpc

    from federation_grpc._proto import federation_pb2 as pb
    from federation_grpc._proto import federation_pb2_grpc

    ca = Path(spec["ca"]).read_bytes()
    seen: list[list[tuple[int, float]]] = [[] for _ in spec["nodes"]]
    first = asyncio.Event()  # every stream has its first generation, or has failed
    started, failed = [0], [0]

    def settled() -> None:
        if started[0] + failed[0] == len(seen):
            first.set()

    async def one(index: int, node: dict) -> None:  # type: ignore[type-arg]
        credentials = grpc.ssl_channel_credentials(
            ca, Path(node["key"]).read_bytes(), Path(node["cert"]).read_bytes())
        async with grpc.aio.secure_channel(node["target"], credentials) as channel:
            stub = federation_pb2_grpc.FederationStub(channel)
            call = stub.WatchGenerations(
                pb.WatchGenerationsRequest(known_generation=-1),
                metadata=(("authorization", f"Bearer {node['token']}"),))
            try:
                async for event in call:
                    if event.HasField("generation"):
                        if not seen[index]:
                            started[0] += 1
                            settled()
                        now = time.time()  # replaced meanwhile: named, not sent
                        seen[index].extend((n, now) for n in event.superseded)
                        seen[index].append((event.generation.number, now))
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.CANCELLED:
                    print(f"watch {index}: {error.code().name}", file=sys.stderr, flush=True)
                if not seen[index]:
                    failed[0] += 1
                    settled()

    tasks = [asyncio.create_task(one(i, n)) for i, n in enumerate(spec["nodes"])]
    await first.wait()
    print(f"failed {failed[0]}" if failed[0] else "ready", flush=True)
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


def fleet_hub(args: argparse.Namespace, work: Path, names: tuple[str, ...],
              database_url: str | None = None) -> tuple[dict, Path, list[str]]:
    """Certificates for every node, a hub config with a worker per node (on
    ``database_url``, else SQLite in its data folder), generation 0, and every node
    enrolled: the certificates, the config and the node tokens."""
    certs = make_certs(work / "tls", nodes=names)
    config = work / "hub.toml"
    write_config(config, work / "data", certs, "fedasync", 1, max_workers=len(names) + 64,
                 database_url=database_url)
    model_file(work / "g0.safetensors", args.size_mb, 0.0, 0)
    setup = HubService(load_config(config))
    setup.init_model(work / "g0.safetensors", CONFIG)
    tokens = [setup.enrol(setup.create_enrolment_token()[0], name).node_token
              for name in names]  # bound to its certificate at its first call
    setup.close()
    return certs, config, tokens


def start_watchers(args: argparse.Namespace, work: Path, targets: Sequence[str], certs: dict,
                   names: tuple[str, ...], tokens: list[str]) -> list[subprocess.Popen[bytes]]:
    """``--watcher-procs`` processes holding the first ``--watchers`` nodes' streams
    (node i on ``targets[i % len(targets)]``), returned once each has all its streams
    going."""
    watchers = args.watchers
    procs = []
    share = -(-watchers // args.watcher_procs)
    for p in range(args.watcher_procs):
        nodes = [{"cert": str(certs[names[i]].cert), "key": str(certs[names[i]].key),
                  "token": tokens[i], "target": targets[i % len(targets)]}
                 for i in range(p * share, min(watchers, (p + 1) * share))]
        spec = work / f"watch{p}.json"
        spec.write_text(json.dumps({"ca": str(certs["ca"].cert), "nodes": nodes}))
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "watch", str(spec), str(work / f"seen{p}.json")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO))
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if line != "ready":
            for started in procs:
                started.kill()
                started.wait()
            raise SystemExit(f"a watcher process did not get its streams going ({line!r}): "
                             "is `ulimit -Hn` above watchers + uploaders + 100?")
    return procs


def upload_clients(args: argparse.Namespace, work: Path, targets: Sequence[str], certs: dict,
                   names: tuple[str, ...], tokens: list[str]
                   ) -> tuple[list[FederationClient], list[bytes]]:
    """A client and an update for each node after the watchers (uploader i on
    ``targets[i % len(targets)]``)."""
    watchers, uploaders = args.watchers, args.clients
    payloads = []
    for i in range(uploaders):
        path = work / f"u{i}.safetensors"
        model_file(path, args.size_mb, 0.01, i + 1)
        payloads.append(path.read_bytes())
        path.unlink()
    retry = RetryPolicy(attempts=8, initial_backoff_s=0.2, max_backoff_s=2.0)
    clients = [FederationClient(targets[i % len(targets)], tls=ClientTls.from_files(
        certs["ca"].cert, certs[names[watchers + i]].cert, certs[names[watchers + i]].key),
        node_token=tokens[watchers + i], retry=retry, timeout_s=args.timeout)
        for i in range(uploaders)]
    return clients, payloads


def upload_all(clients: list[FederationClient], payloads: list[bytes], timeout: float
                ) -> tuple[list[str], float]:
    """Every uploader's update at once; the update ids and when the pushes started."""
    ids = [str(uuid.uuid4()) for _ in clients]
    statuses: dict[int, object] = {}

    def push(i: int) -> None:
        meta = UpdateMetadata(ids[i], 0, 20, ("encoder", "heads.liver"), {})
        statuses[i] = clients[i].upload(payloads[i], meta)

    pushers = [threading.Thread(target=push, args=(i,)) for i in range(len(clients))]
    start = time.perf_counter()
    for thread in pushers:
        thread.start()
    for thread in pushers:
        thread.join(timeout)
    return ids, start


def await_decided(clients: list[FederationClient], ids: list[str], deadline: float
                   ) -> dict[str, int]:
    """Each update's generation once merged or rejected, polled until the deadline."""
    merged: dict[str, int] = {}
    while len(merged) < len(ids) and time.perf_counter() < deadline:
        for client, update_id in zip(clients, ids, strict=True):
            if update_id not in merged:
                status = client.upload_status(update_id)
                if status.state in (UploadState.MERGED, UploadState.REJECTED):
                    merged[update_id] = status.merged_into
        time.sleep(0.2)
    return merged


def stop_watchers(procs: list[subprocess.Popen[bytes]], work: Path
                   ) -> list[list[tuple[int, float]]]:
    """Close the watchers' stdin; what each node saw: (generation, receipt time)."""
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
    for proc in procs:
        proc.wait(timeout=60)
    seen: list[list[tuple[int, float]]] = []
    for p in range(len(procs)):
        path = work / f"seen{p}.json"
        if path.exists():
            seen.extend(json.loads(path.read_text()))
    return seen


def notified(seen: list[list[tuple[int, float]]], created: dict[int, float]
              ) -> tuple[list[float], dict[int, float]]:
    """Delays from publication to each node's receipt, sorted; per generation, the
    delay until the last node was told."""
    per_node = sorted(t - created[n] for events in seen for n, t in events if n > 0)
    last_per_generation: dict[int, float] = {}
    for events in seen:
        for n, t in events:
            if n > 0:
                last_per_generation[n] = max(last_per_generation.get(n, 0.0), t - created[n])
    return per_node, last_per_generation


def _fleet(args: argparse.Namespace, work: Path) -> dict[str, object]:
    limit = raise_fd_limit()  # children inherit it: the hub holds one socket per node
    watchers, uploaders = args.watchers, args.clients
    print(f"certificates for {watchers} watchers and {uploaders} uploaders ...", flush=True)
    names = tuple(f"node{i}" for i in range(watchers + uploaders))
    certs, config, tokens = fleet_hub(args, work, names)
    hub = HubProcess(config, work / "hub.log")
    sampler = RssSampler(hub.proc.pid)
    targets = [f"127.0.0.1:{hub.port}"]
    try:
        procs = start_watchers(args, work, targets, certs, names, tokens)
    except BaseException:
        sampler.stop()
        hub.stop()
        raise
    fds_watching = fds(hub.proc.pid)
    print(f"{watchers} watchers connected; {uploaders} nodes upload ...", flush=True)
    clients, payloads = upload_clients(args, work, targets, certs, names, tokens)
    ids, start = upload_all(clients, payloads, args.timeout)
    fds_peak = fds(hub.proc.pid)
    merged = await_decided(clients, ids, start + args.timeout)
    check = HubService(load_config(config))
    created = {g.number: g.created_at.timestamp() for g in check.list_generations()}
    final = check.current_number()
    check.close()
    # Every watcher must see the final generation: wait for it, bounded.
    time.sleep(min(5.0, args.timeout))
    seen = stop_watchers(procs, work)
    peaks = sampler.stop()
    hwm = peak_rss_mib(hub.proc.pid, float("nan"))
    hub.stop()
    for client in clients:
        client.close()
    per_node, last_per_generation = notified(seen, created)
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
        "notices_missed": sum(len(set(created) - {0} - {n for n, _ in events})
                              for events in seen),
        "last_node_notified_p50_s": round(percentile(last, 0.5), 3) if last else None,
        "last_node_notified_p99_s": round(percentile(last, 0.99), 3) if last else None,
        "node_notified_p50_s": round(percentile(per_node, 0.5), 3) if per_node else None,
        "node_notified_p99_s": round(percentile(per_node, 0.99), 3) if per_node else None,
        "hub_peak_rss_mb": round(hwm, 1),
        "hub_peak_rss_anon_mb": peaks["RssAnon"],
        "hub_fds_watching": fds_watching,
        "hub_fds_peak": fds_peak,
        "fd_limit": limit,
        "load_average": load_average(),
    }


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "watch":
        asyncio.run(_watch_all(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])))
    else:
        raise SystemExit("run through benchmarks/federation.py --watchers")
