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

``--hold-merges`` keeps every merge until all uploads are in, to measure the intake on
its own (by default, fedasync merges while the rest still upload, on the same cores).

Bounded: one update per client, and ``--timeout`` seconds overall.

    python benchmarks/federation.py --clients 50 --size-mb 10 [--repeats 5]

This machine's rates drift by a tenth and more from one minute to the next: compare
``--repeats`` runs, each of which measures its own bare grpcio floor right before it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from floors import floors
from harness import RssSampler, cpu_seconds, load_average, peak_rss_mib, print_figures
from hub_toml import write_config
from safetensors.numpy import save

from federation_grpc.client import FederationClient
from federation_grpc.connection import ClientTls, RetryPolicy
from federation_grpc.hub.certs import make_certs
from federation_grpc.hub.config import load_config
from federation_grpc.hub.domain import UploadState
from federation_grpc.hub.service import HubService
from federation_grpc.uploading import UpdateMetadata
from tests.federation.hubproc import HubProcess

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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--size-mb", type=float, default=10.0)
    parser.add_argument("--strategy", default="fedasync", choices=["fedasync", "fedbuff", "fedavg"])
    parser.add_argument("--buffer-size", type=int, default=10)
    parser.add_argument(
        "--hold-merges", action="store_true",
        help="the intake alone: no merge until every upload is in (fedbuff with a buffer "
        "of --clients), as the bare gRPC server merges nothing either")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--chunk-mb", type=float, default=0.25,
                        help="upload chunk size (a node's [federation] chunk_kb default)")
    parser.add_argument(
        "--insecure", action="store_true", help="no TLS (hub --insecure-loopback), to see TLS cost"
    )
    parser.add_argument("--json", action="store_true", help="print figures as JSON too")
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="runs of the upload mode, each a fresh hub right after its own bare grpcio "
        "floor; prints the median hub/bare grpcio ratio, every ratio, and the other "
        "figures of the middle run (the lower middle one for an even count: use an odd)")
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
    parser.add_argument(
        "--replicas", type=int, default=1,
        help="replicas mode (with --watchers): this many hub processes on one PostgreSQL, "
        "nodes spread over them; exits 1 if an update or a notice is lost or duplicated")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be 1 or more")
    if args.replicas > 1 and args.watchers < 1:
        parser.error("--replicas needs --watchers (one or more)")
    if args.hold_merges:
        args.strategy, args.buffer_size = "fedbuff", args.clients
    return args


@dataclass
class Prepared:
    """A hub's config and generation 0, a certificate and token per node, their updates."""

    work: Path
    names: tuple[str, ...]
    certs: dict
    config_path: Path
    tokens: list[str]
    updates: list[tuple[bytes, tuple[str, ...]]]

    @property
    def payloads(self) -> list[bytes]:
        return [u[0] for u in self.updates]


def prepare(args: argparse.Namespace, work: Path) -> Prepared:
    # Each simulated node is its own node: its own certificate, so the hub's per-node
    # call cap ([limits] max_calls_per_node, keyed by certificate) counts each apart.
    names = tuple(f"node{i}" for i in range(args.clients))
    certs = make_certs(work / "tls", nodes=names)
    model = make_model(args.size_mb)
    print(f"preparing {args.clients} updates of {args.size_mb:g} MB ...", flush=True)
    updates = [make_update(model, i) for i in range(args.clients)]
    return fresh_hub(args, Prepared(work, names, certs, work / "hub.toml", [], updates), work)


def fresh_hub(args: argparse.Namespace, p: Prepared, work: Path) -> Prepared:
    """A new hub under ``work`` (config, generation 0, a token per node) for ``p``'s
    nodes and updates (generation 0 is ``make_model``'s, the same every time)."""
    config_path = work / "hub.toml"
    write_config(config_path, work / "data", p.certs, args.strategy, args.buffer_size)
    setup = HubService(load_config(config_path))
    setup.init_model(save(make_model(args.size_mb)), json.dumps({"architecture": "bench"}))
    tokens = [setup.create_enrolment_token()[0] for _ in range(args.clients)]
    setup.close()
    return replace(p, work=work, config_path=config_path, tokens=tokens)


def enrolled_clients(p: Prepared, hub: HubProcess, args: argparse.Namespace,
                     chunk_size: int) -> list[FederationClient]:
    """One client per node, each with its own certificate, enrolled."""
    target = f"127.0.0.1:{hub.port}"
    retry = RetryPolicy(attempts=5, initial_backoff_s=0.2, max_backoff_s=2.0)
    clients = [
        FederationClient(
            target,
            tls=None if args.insecure else ClientTls.from_files(
                p.certs["ca"].cert, p.certs[name].cert, p.certs[name].key),
            insecure=args.insecure,
            retry=retry,
            timeout_s=args.timeout,
            chunk_size=chunk_size,
        )
        for name in p.names
    ]
    for client, token in zip(clients, p.tokens, strict=True):
        client.enrol(token, "bench")
    return clients


@dataclass
class Uploads:
    """The timed push: when it started and ended, each upload's end, CPU spent."""

    ids: list[str]
    start: float = 0.0
    done: float = 0.0
    nodes_cpu: float = 0.0
    hub_cpu: float = 0.0
    ended: dict[str, float] = field(default_factory=dict)


def upload_all(clients: list[FederationClient], updates: list[tuple[bytes, tuple[str, ...]]],
               hub_pid: int, timeout: float) -> Uploads:
    """Every client uploads its update at once (released together by a barrier)."""
    run = Uploads([str(uuid.uuid4()) for _ in updates])
    results: dict[str, object] = {}
    go = threading.Barrier(len(clients) + 1)

    def push(index: int) -> None:
        payload, groups = updates[index]
        # A node hashes its update when it writes it (pipeline.round_update), not when
        # it sends it: the hash is taken before the timed window, as there.
        meta = UpdateMetadata(run.ids[index], 0, 20, groups, {"dice": 0.8},
                              sha256=hashlib.sha256(payload).hexdigest())
        go.wait()
        results[run.ids[index]] = clients[index].upload(payload, meta)
        run.ended[run.ids[index]] = time.perf_counter()

    pushers = [threading.Thread(target=push, args=(i,)) for i in range(len(clients))]
    for thread in pushers:
        thread.start()
    go.wait()
    run.start = time.perf_counter()
    nodes_cpu, hub_cpu = time.process_time(), cpu_seconds(hub_pid)
    for thread in pushers:
        thread.join(timeout)
    run.done = time.perf_counter()
    run.nodes_cpu, run.hub_cpu = time.process_time() - nodes_cpu, cpu_seconds(hub_pid) - hub_cpu
    return run


def await_merges(clients: list[FederationClient], ids: list[str], deadline: float
                 ) -> dict[str, int]:
    """Each update's generation (-1: rejected), polled until all are decided or the
    deadline."""
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
    return merged_into


def upload_figures(args: argparse.Namespace, p: Prepared, run: Uploads,
                   merged_into: dict[str, int], published: dict[int, float],
                   memory: dict[str, float], floor: dict[str, float]) -> dict[str, object]:
    merged = {u: g for u, g in merged_into.items() if g >= 0}
    latencies = sorted(
        published[g] - run.ended[u] for u, g in merged.items()
        if g in published and u in run.ended
    )
    last_generation = max(
        (published[g] for g in set(merged.values()) if g in published), default=run.start
    )
    total_bytes = sum(len(u[0]) for u in p.updates)
    grpc_mb_s = total_bytes / (run.done - run.start) / 1e6
    per_gb = total_bytes / 1e9
    raw, durable, bare = floor["raw"], floor["durable"], floor["bare"]
    return {
        "clients": args.clients,
        "update_mb": round(total_bytes / len(p.updates) / 1e6, 2),
        "strategy": args.strategy,
        "merges_held": args.hold_merges,
        "uploaded": len(run.ended),
        "merged": len(merged),
        "rejected": len(merged_into) - len(merged),
        "lost": len(run.ids) - len(merged_into),
        "generations": len(set(merged.values())),
        "merged_updates_per_s": round(len(merged) / (last_generation - run.start), 2)
        if merged else 0.0,
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3)
        if latencies
        else None,
        "hub_idle_rss_mb": round(memory["idle"], 1),
        "hub_peak_rss_mb": round(memory["peak"], 1),
        "hub_peak_rss_anon_mb": memory["RssAnon"],
        "hub_peak_rss_file_mb": memory["RssFile"],
        "grpc_upload_mb_s": round(grpc_mb_s, 1),
        "raw_loopback_mb_s": round(raw, 1),
        "grpc_vs_raw": round(grpc_mb_s / raw, 3),
        "durable_raw_mb_s": round(durable, 1),
        "grpc_vs_durable_raw": round(grpc_mb_s / durable, 3),
        "bare_grpc_mb_s": round(bare, 1),
        "bare_grpc_vs_raw": round(bare / raw, 3),
        "grpc_vs_bare_grpc": round(grpc_mb_s / bare, 3),
        "grpc_cpu_s_per_gb": round((run.hub_cpu + run.nodes_cpu) / per_gb, 2),
        "hub_cpu_s_per_gb": round(run.hub_cpu / per_gb, 2),
        "nodes_cpu_s_per_gb": round(run.nodes_cpu / per_gb, 2),
        "raw_cpu_s_per_gb": round(floor["raw_cpu"], 2),
        "durable_raw_cpu_s_per_gb": round(floor["durable_cpu"], 2),
        "bare_grpc_cpu_s_per_gb": round(floor["bare_cpu"], 2),
        "load_average": load_average(),
        "tls": not args.insecure,
        "chunk_mb": args.chunk_mb,
        "cpus": os.cpu_count(),
    }


def main() -> None:
    args = parse_args()
    if args.resume_at or args.watchers:
        if args.resume_at:
            from large_model import run_large as run_mode
        elif args.replicas > 1:
            from replicas import run_replicas as run_mode
        else:
            from many_nodes import run_fleet as run_mode
        figures = run_mode(args)
        print_figures(figures, 32, args.json)
        if figures.get("problems"):
            raise SystemExit(1)
        return

    work = Path(tempfile.mkdtemp(prefix="tessera-fedbench-"))
    try:
        prepared = prepare(args, work)
        runs = []
        for rep in range(args.repeats):
            if rep:
                (work / f"rep{rep}").mkdir()
            p = prepared if rep == 0 else fresh_hub(args, prepared, work / f"rep{rep}")
            runs.append(measure(args, p))
            shutil.rmtree(p.work / "data")  # the run's updates and generations
            if args.repeats > 1:
                print(f"  rep {rep + 1}: hub/bare grpcio {runs[-1]['grpc_vs_bare_grpc']} "
                      f"(hub {runs[-1]['grpc_upload_mb_s']} MB/s, bare grpcio "
                      f"{runs[-1]['bare_grpc_mb_s']} MB/s), load {load_average()}",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_figures(summary(runs), 22, args.json)


def summary(runs: list[dict[str, object]]) -> dict[str, object]:
    """One run's figures as they are; of several (interleaved: each its own bare grpcio
    floor right before its hub), the run with the median hub/bare grpcio ratio, with
    every run's ratio, and what any run lost."""
    if len(runs) == 1:
        return runs[0]
    ratios = [float(r["grpc_vs_bare_grpc"]) for r in runs]  # type: ignore[arg-type]
    middle = sorted(range(len(runs)), key=lambda i: ratios[i])[(len(runs) - 1) // 2]
    return {**runs[middle], "repeats": len(runs),
            "lost": sum(int(r["lost"]) for r in runs),  # type: ignore[call-overload]
            "grpc_vs_bare_grpc": round(statistics.median(ratios), 3),
            "grpc_vs_bare_grpc_each": ratios}


def measure(args: argparse.Namespace, p: Prepared) -> dict[str, object]:
    """The bare floors, then the hub of ``p``, on the same payloads: one run's figures."""
    work = p.work
    chunk_size = int(args.chunk_mb * 1024 * 1024)
    floor = floors(p.payloads, work, p.certs, p.names[0], args.insecure, chunk_size)

    hub = HubProcess(p.config_path, work / "hub.log", insecure=args.insecure)
    sampler = RssSampler(hub.proc.pid)
    idle_rss = peak_rss_mib(hub.proc.pid, float("nan"))
    clients = enrolled_clients(p, hub, args, chunk_size)

    published: dict[int, float] = {}
    stop = threading.Event()

    def watch() -> None:
        for generation in clients[0].watch(known_generation=0, stop=stop):
            published[generation.number] = time.perf_counter()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    run = upload_all(clients, p.updates, hub.proc.pid, args.timeout)
    merged_into = await_merges(clients, run.ids, run.start + args.timeout)
    time.sleep(0.3)  # let the watcher see the last generation
    stop.set()
    rss = peak_rss_mib(hub.proc.pid, float("nan"))
    memory = {"idle": idle_rss, "peak": rss, **sampler.stop()}
    hub.stop()
    for client in clients:
        client.close()
    return upload_figures(args, p, run, merged_into, published, memory, floor)


if __name__ == "__main__":
    main()
