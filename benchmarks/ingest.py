"""Ingest benchmark: dcmtk storescu -> the node, dcmtk storescp, Orthanc, bare pynetdicom.

The same instances (CT_small derived, 128x128, fresh UIDs) are sent by
``/usr/bin/storescu`` (TCP_NODELAY=1, one association) to each receiver, with fresh
storage every repetition, repetitions interleaved across receivers. Prints the
median instances/s of each and the ratios node/storescp and node/Orthanc.

    python benchmarks/ingest.py [--count 500] [--repeats 3] [--associations 1] [--profile]

Receivers: the node, dcmtk storescp, Orthanc and a bare pynetdicom SCP that accepts and
discards (``bare_scp.py``: pynetdicom's own floor). ``--associations N`` splits the
instances into N series sent by N storescu processes in parallel. Each figure comes with
the load average and the receiver's peak RSS; whether Orthanc fsyncs is checked with
strace. ``--profile`` also runs the node in-process under cProfile (every thread) for
one send and prints a per-stage breakdown and the functions where the time goes. Every
wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_node.demo.orthanc import ORTHANC_BINARIES, free_port
from dicom_node.demo.orthanc import start_orthanc as launch_orthanc

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"
ORTHANC = ORTHANC_BINARIES[0]
SEND_TIMEOUT_S = 300.0
START_TIMEOUT_S = 60.0


def peer_env() -> dict[str, str]:
    return dict(os.environ, TCP_NODELAY="1")


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def wait_for(probe: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def echo_ok(port: int, called: str) -> bool:
    return subprocess.run([ECHOSCU, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, env=peer_env(), timeout=30).returncode == 0


def make_batches(directory: Path, count: int, associations: int) -> list[list[Path]]:
    """``count`` instances in all, one series per association."""
    batches = []
    for a in range(associations):
        sub = directory / f"series{a}"
        sub.mkdir()
        share = count // associations + (1 if a < count % associations else 0)
        batches.append(make_instances(sub, share))
    return batches


def make_instances(directory: Path, count: int) -> list[Path]:
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study, series = generate_uid(), generate_uid()
    z0 = float(template.ImagePositionPatient[2])
    files = []
    for i in range(count):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [*template.ImagePositionPatient[:2], z0 + i]
        path = directory / f"{i + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def send_all(port: int, called: str, batches: list[list[Path]]) -> float:
    """Seconds until every batch is sent, one storescu (association) per batch, all in
    parallel."""
    if len(batches) == 1:
        return send(port, called, batches[0])
    errors: list[BaseException] = []

    def one(batch: list[Path]) -> None:
        try:
            send(port, called, batch)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(b,)) for b in batches]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(SEND_TIMEOUT_S + 10)
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} storescu failed: {errors[0]}")
    return elapsed


def peak_rss_mib(pid: int) -> float:
    """VmHWM of a live process (MiB), 0 when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def send(port: int, called: str, files: list[Path]) -> float:
    """Seconds storescu needs to send ``files`` in one association (fails loudly)."""
    t0 = time.perf_counter()
    result = subprocess.run([STORESCU, "-aet", "BENCH", "-aec", called, "127.0.0.1",
                             str(port), *map(str, files)],
                            capture_output=True, text=True, env=peer_env(),
                            timeout=SEND_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {called} failed: {result.stdout[-2000:]}"
                           f"{result.stderr[-2000:]}")
    return elapsed


@dataclass
class Receiver:
    name: str
    called: str
    port: int
    proc: subprocess.Popen[Any]
    count: Callable[[], int]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_node(work: Path) -> Receiver:
    """``tessera node serve`` with the default (durable) settings, port 0."""
    data_dir = work / "node"
    config = work / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{data_dir}"\n[dicom]\nport = 0\n')
    log = (work / "node.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "node", "serve",
                             "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    line_box: list[str] = []
    reader = threading.Thread(target=lambda: line_box.append(proc.stdout.readline()),  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    reader.join(START_TIMEOUT_S)
    if not line_box or not line_box[0]:
        proc.kill()
        raise RuntimeError("the node printed no listening line; see " + str(work / "node.log"))
    port = int(json.loads(line_box[0])["port"])

    def count() -> int:
        import sqlite3

        with sqlite3.connect(data_dir / "node.db", timeout=30) as conn:
            return int(conn.execute("select count(*) from instance").fetchone()[0])

    return Receiver("node", "TESSERA", port, proc, count)


def start_storescp(work: Path) -> Receiver:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen([STORESCP, "-aet", "STORESCP", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=peer_env())
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


STARTERS = {"node": start_node, "storescp": start_storescp, "orthanc": start_orthanc,
            "bare": start_bare}


@dataclass
class Result:
    rate: float
    rss_mib: float


def run_once(name: str, batches: list[list[Path]], scratch: Path, rep: int) -> Result:
    files = [f for b in batches for f in b]
    work = scratch / f"{name}-{rep}"
    work.mkdir()
    receiver = STARTERS[name](work)
    try:
        elapsed = send_all(receiver.port, receiver.called, batches)
        with contextlib.suppress(TimeoutError):  # the bare SCP counts at release
            wait_for(lambda: receiver.count() >= len(files), 10, f"{name}'s count")
        stored = receiver.count()
        if stored != len(files):
            raise RuntimeError(f"{name} holds {stored} of {len(files)} instances")
        return Result(len(files) / elapsed, peak_rss_mib(receiver.proc.pid))
    finally:
        receiver.stop()
        shutil.rmtree(work, ignore_errors=True)


STAGES = (  # (label, function name, file name ending): cumulative time per instance
    ("handle_store (whole handler)", "handle_store", "dicom/scp.py"),
    ("  read the data set (pynetdicom)", "encoded_dataset", "pynetdicom/events.py"),
    ("  header read + checks", "parse_instance", "dicom/parse.py"),
    ("  Part 10 framing", "part10", "dicom/meta.py"),
    ("  journal append", "append", "store/journal.py"),
    ("  journal commit (fdatasync, shared)", "commit", "store/journal.py"),
    ("  file + index row (unsynced)", "_apply", "store/instances.py"),
    ("    index statements", "_index", "store/instances.py"),
    ("    file write (no fsync)", "place", "store/files.py"),
    ("DIMSE decode (pynetdicom)", "receive_primitive", "dicom/association.py"),
    ("DUL reactor (pynetdicom, whole thread)", "run_reactor", "pynetdicom/dul.py"),
)


def stage_table(stats: pstats.Stats, instances: int) -> str:
    table = stats.stats  # type: ignore[attr-defined]
    lines = ["per-stage time of the node, ms per instance (cumulative, under cProfile):"]
    for label, func, where in STAGES:
        total = sum(v[3] for (fn, _, name), v in table.items()
                    if name == func and fn.endswith(where))
        lines.append(f"  {label:<42} {1000 * total / instances:7.2f}")
    return "\n".join(lines)


def profile_node(batches: list[list[Path]], scratch: Path, top: int) -> str:
    """Run the node in-process with cProfile in every thread; one send."""
    from dicom_node.config import load_config
    from dicom_node.node import Node

    profilers: list[cProfile.Profile] = []
    lock = threading.Lock()

    def hook(*_: Any) -> None:
        prof = cProfile.Profile()
        with lock:
            profilers.append(prof)
        prof.enable()  # replaces this hook for the rest of the thread

    work = scratch / "profile"
    work.mkdir()
    config = work / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{work / "node"}"\n[dicom]\nport = 0\n')
    node = Node(load_config(config, env={}))
    count = sum(len(b) for b in batches)
    threading.setprofile(hook)
    try:
        node.start()
        rate = count / send_all(node.port, "TESSERA", batches)
        journal = node.parts.store.journal
        commits = (journal.records, journal.fsyncs) if journal is not None else (0, 0)
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
        for prof in profilers:
            prof.disable()
        node.stop()
    # Only the threads that carry associations (the acceptor's association and DUL
    # threads); the idle job workers and assembler would only add their waits.
    def carries_associations(prof: cProfile.Profile) -> bool:
        keys = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        return any(fn in ("handle_store", "run_reactor") for _, _, fn in keys)

    busy = [p for p in profilers if carries_associations(p)]
    out = io.StringIO()
    out.write(f"node in-process under cProfile: {rate:.0f} instances/s "
              f"(profiling overhead included); {len(busy)} association thread(s) shown\n")
    if commits[1]:
        out.write(f"group commit: {commits[0]} journal records, {commits[1]} fdatasyncs "
                  f"({commits[0] / commits[1]:.2f} instances per fsync)\n")
    stats = pstats.Stats(*busy, stream=out)  # type: ignore[arg-type]
    out.write(stage_table(stats, count) + "\n")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", default="node,storescp,orthanc,bare")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--associations", type=int, default=1,
                        help="storescu processes in parallel, each with its own series")
    args = parser.parse_args(argv)
    targets = args.targets.split(",")
    for exe in (STORESCU, ECHOSCU, *(STORESCP,) * ("storescp" in targets),
                *(ORTHANC,) * ("orthanc" in targets)):
        if not os.access(exe, os.X_OK):
            print(f"missing {exe}", file=sys.stderr)
            return 2

    scratch = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    try:
        inputs = scratch / "inputs"
        inputs.mkdir()
        batches = make_batches(inputs, args.count, args.associations)
        files = [f for b in batches for f in b]
        size = sum(f.stat().st_size for f in files)
        print(f"{len(files)} instances ({size / len(files) / 1024:.1f} KiB each) in "
              f"{args.associations} association(s) in parallel, one series each, "
              f"{args.repeats} repetitions, storescu with TCP_NODELAY=1; "
              f"{os.cpu_count()} CPUs, load average {load()}", flush=True)
        results: dict[str, list[Result]] = {t: [] for t in targets}
        for rep in range(args.repeats):
            for name in targets:
                result = run_once(name, batches, scratch, rep)
                results[name].append(result)
                print(f"  rep {rep + 1} {name:<9} {result.rate:7.1f} instances/s  "
                      f"peak RSS {result.rss_mib:6.0f} MiB  load {load()}", flush=True)
        medians = {t: statistics.median(r.rate for r in rs) for t, rs in results.items()}
        print(f"\nmedian instances/s ({args.associations} association(s); "
              f"load average {load()})")
        for name, value in medians.items():
            spread = ", ".join(f"{r.rate:.0f}" for r in results[name])
            rss = max(r.rss_mib for r in results[name])
            print(f"  {name:<9} {value:7.1f}   ({spread})  peak RSS {rss:.0f} MiB")
        if "node" in medians:
            for peer in ("storescp", "orthanc", "bare"):
                if peer in medians:
                    print(f"  node/{peer:<9} {medians['node'] / medians[peer]:.2f}")
        if "orthanc" in targets:
            print(orthanc_fsyncs(files[:20], scratch))
        if args.profile:
            print()
            print(profile_node(batches, scratch, args.top))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
