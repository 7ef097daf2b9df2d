"""Hub replicas on one PostgreSQL, a mode of ``benchmarks/federation.py`` (``--replicas 2
--watchers 200 --clients 20``): the many-nodes run (``benchmarks/many_nodes.py``) against
``--replicas`` hub processes sharing one database and one data folder, node i (watcher or
uploader) talking to replica ``i % replicas``. PostgreSQL is a throwaway cluster started
by the tests' own ``postgres`` fixture (``tests/node/conftest.py``: initdb, pg_ctl on a
free loopback port, removed at the end).

Prints, from the hub database once every upload is decided: how many updates were merged,
rejected, lost (never decided), merged into two generations, or absent from every
generation, and whether the generations form one chain (0, 1, 2... each the parent of
the next); then per replica and in total: how many watchers were told of every
generation published during the run, the (watcher, generation) notices missed, the
watchers that never got the final generation, the delay from publication (a
generation's ``created_at``) to receipt (p50, p99), and each replica's peak RSS and open
file descriptors. ``problems`` sums the updates lost, rejected, merged twice, absent or
placed elsewhere than their status says, the chain's breaks and the missed notices; the
command exits 1 when it is not 0.

File descriptors: each replica holds one per node connected to it (617 at most with
1,000 watchers and 100 uploads over two replicas), and each watcher process one per node
it watches; the run raises its soft ``RLIMIT_NOFILE`` to the hard limit (children inherit
it). ``ulimit -Hn`` of 2,000 covers ``--watchers 1000 --clients 100`` on one hub or
several (``benchmarks/many_nodes.py`` says how the limit shows when it is too low).

    python benchmarks/federation.py --watchers 200 --clients 20 --size-mb 1 --replicas 2
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness import RssSampler, load_average, peak_rss_mib, percentile
from many_nodes import (
    await_decided,
    fds,
    fleet_hub,
    raise_fd_limit,
    start_watchers,
    stop_watchers,
    upload_all,
    upload_clients,
)

from federation_grpc.client import FederationClient
from federation_grpc.hub.config import load_config
from federation_grpc.hub.domain import GenerationView
from federation_grpc.hub.service import HubService
from tests.federation.hubproc import HubProcess
from tests.node.conftest import postgres as postgres_fixture

# A replica sees generations another replica published by polling the database every
# 2 s (grpc_api.WatchGenerations' watch_poll_s), within two polls: wait that long, and more,
# for the final generation to reach every watcher.
SETTLE_S = 6.0

Seen = list[list[tuple[int, float]]]


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """A throwaway PostgreSQL cluster, made and removed by the tests' fixture; its URL."""
    cluster = contextlib.contextmanager(inspect.unwrap(postgres_fixture))
    try:
        with cluster() as postgres:
            yield postgres.url
    except (pytest.fail.Exception, pytest.skip.Exception) as error:
        raise SystemExit(f"no PostgreSQL for the replicas: {error}") from error


@dataclass
class Replicas:
    """The hub processes, and what each held: peak RSS, file descriptors (sampled every
    0.1 s until stopped)."""

    hubs: list[HubProcess]
    samplers: list[RssSampler]
    fds_watching: list[int]
    fds_peak: list[int]
    peak_rss: list[float]
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.fds_peak = [0] * len(self.hubs)
        threading.Thread(target=self.sample_fds, daemon=True).start()

    def sample_fds(self) -> None:
        while not self.stopping.wait(0.1):
            with contextlib.suppress(OSError):
                self.fds_peak = [max(a, b) for a, b in zip(self.fds_peak, self.count_fds(),
                                                           strict=True)]

    @classmethod
    def start(cls, config: Path, work: Path, count: int) -> Replicas:
        hubs: list[HubProcess] = []
        try:
            for r in range(count):
                hubs.append(HubProcess(config, work / f"hub-{r}.log"))
        except BaseException:
            for hub in hubs:
                hub.stop()
            raise
        return cls(hubs, [RssSampler(h.proc.pid) for h in hubs], [], [], [])

    @property
    def targets(self) -> list[str]:
        return [f"127.0.0.1:{hub.port}" for hub in self.hubs]

    def count_fds(self) -> list[int]:
        return [fds(hub.proc.pid) for hub in self.hubs]

    def stop(self) -> None:
        self.stopping.set()
        for sampler in self.samplers:
            sampler.stop()
        self.peak_rss = [peak_rss_mib(hub.proc.pid, float("nan")) for hub in self.hubs]
        for hub in self.hubs:
            hub.stop()


def run_replicas(args: argparse.Namespace) -> dict[str, object]:
    limit = raise_fd_limit()  # children inherit it: a socket per node in each replica
    work = Path(tempfile.mkdtemp(prefix="tessera-replicas-"))
    try:
        with postgres_cluster() as url:
            figures = replicated(args, work, url)
        figures["fd_limit"] = limit
        return figures
    finally:
        shutil.rmtree(work, ignore_errors=True)


def replicated(args: argparse.Namespace, work: Path, database_url: str) -> dict[str, object]:
    """Generation 0 on PostgreSQL, the replicas started, watchers and uploaders spread
    over them; the uploads, then the database and what each watcher saw."""
    watchers, uploaders = args.watchers, args.clients
    print(f"certificates for {watchers} watchers and {uploaders} uploaders ...", flush=True)
    names = tuple(f"node{i}" for i in range(watchers + uploaders))
    certs, config, tokens = fleet_hub(args, work, names, database_url)
    replicas = Replicas.start(config, work, args.replicas)
    clients: list[FederationClient] = []
    try:
        procs = start_watchers(args, work, replicas.targets, certs, names, tokens)
        replicas.fds_watching = replicas.count_fds()
        print(f"{watchers} watchers on {args.replicas} replicas; {uploaders} nodes upload ...",
              flush=True)
        clients, payloads = upload_clients(args, work, replicas.targets, certs, names, tokens)
        ids, start = upload_all(clients, payloads, args.timeout)
        decided = await_decided(clients, ids, start + args.timeout)
        check = HubService(load_config(config))
        generations = check.list_generations()
        check.close()
        time.sleep(min(SETTLE_S, args.timeout))
        seen = stop_watchers(procs, work)
    finally:
        replicas.stop()
        for client in clients:
            client.close()
    figures: dict[str, object] = {"replicas": args.replicas, "watchers": watchers,
                                  "watching_streams": len(seen), "uploaders": uploaders,
                                  "update_mb": args.size_mb}
    figures.update(merge_figures(ids, decided, generations))
    figures.update(notice_figures(seen, generations, args.replicas))
    for r in range(args.replicas):
        figures[f"replica{r}_peak_rss_mb"] = round(replicas.peak_rss[r], 1)
        figures[f"replica{r}_fds_watching"] = replicas.fds_watching[r]
        figures[f"replica{r}_fds_peak"] = replicas.fds_peak[r]
    figures["problems"] = sum(int(figures[key]) for key in PROBLEMS)  # type: ignore[call-overload]
    figures["load_average"] = load_average()
    return figures


# Figures each of which counts what went wrong: the run fails unless all are 0.
PROBLEMS = ("lost", "rejected", "merged_twice", "absent_from_generations", "status_disagrees",
            "chain_breaks", "notices_missed")


def merge_figures(ids: Sequence[str], decided: dict[str, int],
                  generations: Sequence[GenerationView]) -> dict[str, object]:
    """Each update counted in the generations that hold it: merged exactly once means in
    one generation, the one its status names; and the generations one chain."""
    held = Counter(u for g in generations for u in g.update_ids)
    home = {u: g.number for g in generations for u in g.update_ids}
    ours = set(ids)
    numbers = [g.number for g in generations]
    breaks = sum(1 for i, g in enumerate(generations) if g.number != i) + sum(
        1 for g in generations[1:] if g.parent != g.number - 1)
    return {
        "merged": sum(1 for g in decided.values() if g > 0),
        "rejected": sum(1 for g in decided.values() if g <= 0),
        "lost": len(ids) - len(decided),
        "merged_twice": sum(1 for u in ours if held[u] > 1),
        "absent_from_generations": sum(1 for u in ours if held[u] == 0),
        "status_disagrees": sum(1 for u, g in decided.items() if g > 0 and home.get(u) != g),
        "foreign_updates": sum(1 for u in held if u not in ours),
        "generations": len(numbers) - 1,
        "final_generation": numbers[-1],
        "updates_per_generation": dict(sorted(Counter(
            len(g.update_ids) for g in generations[1:]).items())),
        "chain_breaks": breaks,
    }


def notice_figures(seen: Seen, generations: Sequence[GenerationView], replicas: int
                   ) -> dict[str, object]:
    """Per replica (watcher i on replica i % replicas) and in total: who was told of
    every generation after 0, the notices missed, the delays from publication."""
    created = {g.number: g.created_at.timestamp() for g in generations}
    published = set(created) - {0}
    final = max(created)
    figures: dict[str, object] = {}
    totals = Counter[str]()
    delays_all: list[float] = []
    for r in range(replicas):
        mine = seen[r::replicas]
        told = [{n for n, _ in events} for events in mine]
        missed = sum(len(published - numbers) for numbers in told)
        delays = sorted(t - created[n] for events in mine for n, t in events if n in published)
        counts = {"watchers": len(mine),
                  "told_every_generation": sum(1 for n in told if published <= n),
                  "notices_missed": missed,
                  "missing_final": sum(1 for n in told if final not in n)}
        for key, value in counts.items():
            figures[f"replica{r}_{key}"] = value
        figures.update(delay_figures(f"replica{r}_", delays))
        totals.update(counts)
        delays_all.extend(delays)
    figures["watchers_told_every_generation"] = totals["told_every_generation"]
    figures["notices_missed"] = totals["notices_missed"]
    figures["watchers_missing_final"] = totals["missing_final"]
    figures.update(delay_figures("", sorted(delays_all)))
    return figures


def delay_figures(prefix: str, delays: Sequence[float]) -> dict[str, object]:
    return {f"{prefix}notified_p{q}_s": round(percentile(delays, q / 100), 3) if delays
            else None for q in (50, 99)}
