"""The ingest benchmark's receivers: the node, dcmtk storescp, Orthanc and a bare
pynetdicom SCP, each started fresh on 127.0.0.1 with its instance count, and the
storescu senders that feed them (one association per batch, in parallel)."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    SEND_TIMEOUT_S,
    STORESCP,
    echo_ok,
    spawn_peer,
    storescu,
    wait_for,
)

from dicom_node.demo.orthanc import ORTHANC_BINARIES, free_port
from dicom_node.demo.orthanc import start_orthanc as launch_orthanc

ORTHANC = ORTHANC_BINARIES[0]
START_TIMEOUT_S = 60.0
CALLING = "BENCH"  # storescu's AE title


@dataclass
class Receiver:
    name: str
    called: str
    port: int
    proc: subprocess.Popen[Any]
    count: Callable[[], int]
    more: list[Receiver] = field(default_factory=list)  # bare:N's other processes

    @property
    def ports(self) -> list[int]:
        return [self.port, *(m.port for m in self.more)]

    @property
    def pids(self) -> list[int]:
        """Every process of the receiver (the node's receiving processes included)."""
        return [pid for r in (self, *self.more) for pid in process_tree(r.proc.pid)]

    def stop(self) -> None:
        for other in self.more:
            other.stop()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def send(port: int, called: str, files: list[Path], per_association: int = 0) -> float:
    """Seconds storescu needs to send ``files`` in one association, or one after another
    in associations of ``per_association`` instances each (fails loudly)."""
    step = per_association or len(files)
    return sum(storescu(port, called, files[i:i + step], calling=CALLING)
               for i in range(0, len(files), step))


def send_all(ports: list[int], called: str, batches: list[list[Path]],
             per_association: int = 0) -> float:
    """Seconds until every batch is sent, one storescu per batch, all in parallel, each
    in one association or in associations of ``per_association`` instances one after
    another; batch i goes to ``ports[i % len(ports)]``."""
    if len(batches) == 1:
        return send(ports[0], called, batches[0], per_association)
    errors: list[BaseException] = []

    def one(port: int, batch: list[Path]) -> None:
        try:
            send(port, called, batch, per_association)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(ports[i % len(ports)], b))
               for i, b in enumerate(batches)]
    # Each storescu run is bounded by SEND_TIMEOUT_S; a batch is one or several runs.
    runs = max(-(-len(b) // (per_association or len(b) or 1)) for b in batches)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(SEND_TIMEOUT_S * runs + 10)
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} storescu failed: {errors[0]}")
    if any(t.is_alive() for t in threads):
        raise RuntimeError("a storescu sender did not finish in time")
    return elapsed


def first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first line ``proc`` prints, or "" if none comes within ``timeout`` s."""
    assert proc.stdout is not None
    stdout = proc.stdout
    line_box: list[str] = []
    reader = threading.Thread(target=lambda: line_box.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return line_box[0] if line_box else ""


def start_node(work: Path, receivers: int = 1) -> Receiver:
    """``tessera node serve`` with the default (durable) settings, port 0, and
    ``receivers`` receiving processes (``dicom.receivers``)."""
    data_dir = work / "node"
    config = work / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{data_dir}"\n'
                      f'[dicom]\nport = 0\nreceivers = {receivers}\n')
    log = (work / "node.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "viewer_bridge.main", "node", "serve",
                             "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    line = first_line(proc, START_TIMEOUT_S)
    if not line:
        proc.kill()
        raise RuntimeError("the node printed no listening line; see " + str(work / "node.log"))
    port = int(json.loads(line)["port"])

    def count() -> int:
        with sqlite3.connect(data_dir / "node.db", timeout=30) as conn:
            return int(conn.execute("select count(*) from instance").fetchone()[0])

    return Receiver("node", "TESSERA", port, proc, count)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its child processes (the node's receivers), whichever thread started
    them."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(c) for c in (task / "children").read_text().split()]
    return [pid, *children]


def start_storescp(work: Path) -> Receiver:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    proc = spawn_peer([STORESCP, "-aet", "STORESCP", "-od", str(out), str(port)])
    wait_for(lambda: echo_ok(port, "STORESCP"), START_TIMEOUT_S, "storescp")
    return Receiver("storescp", "STORESCP", port, proc,
                    lambda: sum(1 for p in out.iterdir() if p.is_file()))


def start_orthanc(work: Path) -> Receiver:
    orthanc = launch_orthanc(work / "orthanc", name="Bench", timeout_s=START_TIMEOUT_S)
    wait_for(lambda: echo_ok(orthanc.dicom_port, orthanc.ae_title), START_TIMEOUT_S,
             "Orthanc DICOM")
    return Receiver("orthanc", orthanc.ae_title, orthanc.dicom_port, orthanc.proc,
                    lambda: int(orthanc.get("/statistics")["CountInstances"]))


def start_bare(work: Path) -> Receiver:
    """A bare pynetdicom SCP that accepts and discards (benchmarks/bare_scp.py)."""
    port = free_port()
    count_file = work / "count"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("bare_scp.py")),
                             str(port), str(count_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: echo_ok(port, "BARE"), START_TIMEOUT_S, "bare pynetdicom SCP")
    return Receiver("bare", "BARE", port, proc, lambda: int(count_file.read_text() or 0))


def start_bares(work: Path, processes: int) -> Receiver:
    """``processes`` bare pynetdicom SCPs, each on its own port; the sender splits the
    associations among them evenly (pynetdicom's own floor on several CPUs, with no
    hand-off at all)."""
    bares = []
    for i in range(processes):
        (work / str(i)).mkdir()
        bares.append(start_bare(work / str(i)))
    first = bares[0]
    return Receiver(f"bare:{processes}", first.called, first.port, first.proc,
                    lambda: sum(b.count() for b in bares), bares[1:])


STARTERS = {"node": start_node, "storescp": start_storescp, "orthanc": start_orthanc,
            "bare": start_bare}


def start(name: str, work: Path) -> Receiver:
    """The receiver a target names: one of :data:`STARTERS`, ``node:N`` (the node with
    N receiving processes) or ``bare:N`` (N bare pynetdicom SCPs)."""
    if name.startswith("node:"):
        return start_node(work, receivers=int(name.removeprefix("node:")))
    if name.startswith("bare:"):
        return start_bares(work, int(name.removeprefix("bare:")))
    return STARTERS[name](work)


def orthanc_fsyncs(batch: list[Path], scratch: Path) -> str:
    """Whether Orthanc, configured as benchmarked (SyncStorageArea left at its default,
    true in Debian's /etc/orthanc/orthanc.json), fsyncs: strace counts its syncs while
    it receives ``batch`` (not timed)."""
    strace = shutil.which("strace")
    if strace is None:
        return "Orthanc fsync: unknown (strace not installed)"
    work = scratch / "orthanc-strace"
    work.mkdir()
    receiver = start_orthanc(work)
    tracer = subprocess.Popen([strace, "-f", "-c", "-e", "trace=fsync,fdatasync,sync_file_range",
                               "-p", str(receiver.proc.pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # strace attaches to every thread before the send starts
        send(receiver.port, receiver.called, batch)
    finally:
        tracer.send_signal(2)
        _, report = tracer.communicate(timeout=30)
        receiver.stop()
    calls = {}
    for line in report.splitlines():
        parts = line.split()
        if parts and parts[-1] in ("fsync", "fdatasync", "sync_file_range"):
            calls[parts[-1]] = int(parts[3]) if len(parts) >= 5 else int(parts[-2])
    total = sum(calls.values())
    verdict = "fsyncs" if total >= len(batch) else ("syncs sometimes" if total else
                                                     "does NOT fsync")
    return (f"Orthanc (as benchmarked, Debian defaults): {verdict}: "
            f"{calls or 'no sync calls'} for {len(batch)} instances")
