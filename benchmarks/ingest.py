"""Ingest benchmark: dcmtk storescu -> the node, dcmtk storescp, Orthanc.

The same instances (CT_small derived, 128x128, fresh UIDs) are sent by
``/usr/bin/storescu`` (TCP_NODELAY=1, one association) to each receiver, with fresh
storage every repetition, repetitions interleaved across receivers. Prints the
median instances/s of each and the ratios node/storescp and node/Orthanc.

    python benchmarks/ingest.py [--count 500] [--repeats 3] [--profile]

``--profile`` also runs the node in-process under cProfile (every thread) for one
send and prints the functions where the time goes. Every wait is bounded.
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


def wait_for(probe: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def echo_ok(port: int, called: str) -> bool:
    return subprocess.run([ECHOSCU, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, env=peer_env(), timeout=30).returncode == 0


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


def run_once(name: str, files: list[Path], scratch: Path, rep: int) -> float:
    work = scratch / f"{name}-{rep}"
    work.mkdir()
    receiver = STARTERS[name](work)
    try:
        elapsed = send(receiver.port, receiver.called, files)
        with contextlib.suppress(TimeoutError):  # the bare SCP counts at release
            wait_for(lambda: receiver.count() >= len(files), 10, f"{name}'s count")
        stored = receiver.count()
        if stored != len(files):
            raise RuntimeError(f"{name} holds {stored} of {len(files)} instances")
        return len(files) / elapsed
    finally:
        receiver.stop()
        shutil.rmtree(work, ignore_errors=True)


def profile_node(files: list[Path], scratch: Path, top: int) -> str:
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
    threading.setprofile(hook)
    try:
        node.start()
        rate = len(files) / send(node.port, "TESSERA", files)
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
    stats = pstats.Stats(*busy, stream=out)  # type: ignore[arg-type]
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    stats.print_callees("ingest")
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", default="node,storescp,orthanc,bare")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=25)
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
        files = make_instances(inputs, args.count)
        size = sum(f.stat().st_size for f in files)
        print(f"{len(files)} instances ({size / len(files) / 1024:.1f} KiB each), "
              f"{args.repeats} repetitions, storescu with TCP_NODELAY=1", flush=True)
        rates: dict[str, list[float]] = {t: [] for t in targets}
        for rep in range(args.repeats):
            for name in targets:
                rate = run_once(name, files, scratch, rep)
                rates[name].append(rate)
                print(f"  rep {rep + 1} {name:<9} {rate:7.1f} instances/s", flush=True)
        medians = {t: statistics.median(r) for t, r in rates.items()}
        print("\nmedian instances/s")
        for name, value in medians.items():
            spread = ", ".join(f"{r:.0f}" for r in rates[name])
            print(f"  {name:<9} {value:7.1f}   ({spread})")
        if "node" in medians:
            for peer in ("storescp", "orthanc", "bare"):
                if peer in medians:
                    print(f"  node/{peer:<9} {medians['node'] / medians[peer]:.2f}")
        if args.profile:
            print()
            print(profile_node(files, scratch, args.top))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
