"""Ingest benchmark: dcmtk storescu -> the node, dcmtk storescp, Orthanc, bare pynetdicom.

The same instances (CT_small derived, 128x128, fresh UIDs) are sent by
``/usr/bin/storescu`` (TCP_NODELAY=1, one association) to each receiver, with fresh
storage every repetition, repetitions interleaved across receivers. Prints the
median instances/s of each and the ratios node/storescp and node/Orthanc.

    python benchmarks/ingest.py [--count 500] [--repeats 3] [--associations 1] [--profile]
        [--per-association K] [--targets node,node:2,storescp,orthanc,bare]

Receivers: the node, dcmtk storescp, Orthanc and a bare pynetdicom SCP that accepts and
discards (``bare_scp.py``: pynetdicom's own floor); ``node:N`` in ``--targets`` is the
node with N receiving processes (``dicom.receivers``), its peak RSS their sum, and
``bare:N`` N bare pynetdicom SCPs on their own ports, the associations split evenly
among them (pynetdicom's own ceiling on N processes).
``--associations N`` splits the instances into N series sent by N storescu processes in
parallel, and ``--per-association K`` has each send its series in associations of K
instances, one after another (what an association costs). Each figure comes with
the load average, the receiver's peak RSS and its CPU per instance (with the ceiling
the machine's CPUs allow); whether Orthanc fsyncs is checked with
strace. ``--profile`` also runs the node in-process under cProfile (every thread) for
one send and prints a per-stage breakdown and the functions where the time goes. Every
wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pydicom
from harness import (
    ECHOSCU,
    STORESCP,
    STORESCU,
    cpu_seconds,
    load_average,
    missing_peer,
    peak_rss_mib,
    wait_for,
)
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from receivers import ORTHANC, orthanc_fsyncs, send_all, start


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


@dataclass
class Result:
    rate: float
    rss_mib: float
    cpu_ms: float  # the receiver's CPU per instance, its processes together, until indexed
    sender_ms: float  # storescu's CPU per instance


def tree_cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each process still alive."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            out[pid] = cpu_seconds(pid)
    return out


def run_once(name: str, batches: list[list[Path]], scratch: Path, rep: int,
             per_association: int = 0) -> Result:
    files = [f for b in batches for f in b]
    work = scratch / f"{name}-{rep}"
    work.mkdir()
    receiver = start(name, work)
    try:
        before, senders = tree_cpu(receiver.pids), os.times()
        elapsed = send_all(receiver.ports, receiver.called, batches, per_association)
        senders_cpu = sum(os.times()[2:4]) - sum(senders[2:4])  # the reaped storescus
        with contextlib.suppress(TimeoutError):  # the bare SCP counts at release
            wait_for(lambda: receiver.count() >= len(files), 10, f"{name}'s count")
        stored = receiver.count()
        if stored != len(files):
            raise RuntimeError(f"{name} holds {stored} of {len(files)} instances")
        after = tree_cpu(receiver.pids)
        if set(after) != set(before):  # a receiving process exited (and was replaced)
            print(f"  ({name}: its processes changed during the send, {sorted(before)} -> "
                  f"{sorted(after)}: its CPU figure is not comparable)", flush=True)
        used = sum(after[pid] - before.get(pid, 0.0) for pid in after)
        # The node's receiving processes included: the sum of each one's peak.
        rss = sum(peak_rss_mib(pid) for pid in receiver.pids)
        return Result(len(files) / elapsed, rss, 1000 * used / len(files),
                      1000 * senders_cpu / len(files))
    finally:
        receiver.stop()
        shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", default="node,node:2,storescp,orthanc,bare,bare:2",
                        help="receivers, comma-separated; node:N is the node with N "
                             "receiving processes (dicom.receivers)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--associations", type=int, default=1,
                        help="storescu processes in parallel, each with its own series")
    parser.add_argument("--per-association", type=int, default=0, metavar="K",
                        help="each storescu process sends its series in associations of K "
                             "instances, one after another (a PACS that opens one per "
                             "study or per few instances); 0: its whole series in one. The "
                             "rate then includes storescu's start per association: the "
                             "receiver's CPU per instance is the figure to compare")
    return parser.parse_args(argv)


def repetitions(targets: list[str], batches: list[list[Path]], scratch: Path,
                repeats: int, per_association: int = 0) -> dict[str, list[Result]]:
    """Every receiver once per repetition, interleaved; a line per send."""
    results: dict[str, list[Result]] = {t: [] for t in targets}
    for rep in range(repeats):
        for name in targets:
            result = run_once(name, batches, scratch, rep, per_association)
            results[name].append(result)
            print(f"  rep {rep + 1} {name:<9} {result.rate:7.1f} instances/s  "
                  f"CPU {result.cpu_ms:4.2f} ms/instance (storescu {result.sender_ms:4.2f})  "
                  f"peak RSS {result.rss_mib:6.0f} MiB  load {load_average(1)}", flush=True)
    return results


def report(results: dict[str, list[Result]], associations: int) -> None:
    """The median rate of each receiver, and the node's against each peer: the ratio of
    the medians, and each repetition's own."""
    medians = {t: statistics.median(r.rate for r in rs) for t, rs in results.items()}
    print(f"\nmedian instances/s ({associations} association(s); "
          f"load average {load_average(1)})")
    for name, value in medians.items():
        spread = ", ".join(f"{r.rate:.0f}" for r in results[name])
        rss = max(r.rss_mib for r in results[name])
        print(f"  {name:<9} {value:7.1f}   ({spread})  peak RSS {rss:.0f} MiB")
    cpus = len(os.sched_getaffinity(0))
    print(f"\nCPU per instance, median (ms; the receiver's processes until every instance "
          f"is indexed, and the storescu senders); the ceiling is what {cpus} CPUs allow "
          "when receiver and senders share them")
    for name, rs in results.items():
        cpu = statistics.median(r.cpu_ms for r in rs)
        sender = statistics.median(r.sender_ms for r in rs)
        print(f"  {name:<9} {cpu:5.2f} + storescu {sender:4.2f}  ceiling "
              f"{1000 * cpus / (cpu + sender):7.1f} instances/s")
    peers = [t for t in medians if t in ("storescp", "orthanc", "bare") or
             t.startswith("bare:")]
    for node in (t for t in medians if t == "node" or t.startswith("node:")):
        for peer in peers:
            # Each repetition's two sends ran minutes apart at most: their ratio leaves
            # out the machine's slower drift, which the ratio of the medians keeps.
            paired = [n.rate / p.rate for n, p in zip(results[node], results[peer],
                                                      strict=True)]
            print(f"  {node}/{peer:<9} {medians[node] / medians[peer]:.2f}   (per "
                  f"repetition {', '.join(f'{r:.2f}' for r in paired)}: median "
                  f"{statistics.median(paired):.2f})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    targets = args.targets.split(",")
    absent = missing_peer(STORESCU, ECHOSCU, *(STORESCP,) * ("storescp" in targets),
                          *(ORTHANC,) * ("orthanc" in targets))
    if absent is not None:
        print(f"missing {absent}", file=sys.stderr)
        return 2

    scratch = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    try:
        inputs = scratch / "inputs"
        inputs.mkdir()
        batches = make_batches(inputs, args.count, args.associations)
        files = [f for b in batches for f in b]
        size = sum(f.stat().st_size for f in files)
        print(f"{len(files)} instances ({size / len(files) / 1024:.1f} KiB each) in "
              f"{args.associations} association(s) in parallel, one series each"
              + (f" (sent {args.per_association} instance(s) per association)"
                 if args.per_association else "") + ", "
              f"{args.repeats} repetitions, storescu with TCP_NODELAY=1; "
              f"{len(os.sched_getaffinity(0))} CPUs, load average {load_average(1)}", flush=True)
        report(repetitions(targets, batches, scratch, args.repeats, args.per_association),
               args.associations)
        if "orthanc" in targets:
            print(orthanc_fsyncs(files[:20], scratch))
        if args.profile:
            from ingest_profile import profile_node  # imports the node only when asked

            print()
            print(profile_node(batches, scratch, args.top, args.per_association))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
