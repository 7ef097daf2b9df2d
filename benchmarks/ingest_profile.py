"""The ingest benchmark's ``--profile``: the node in-process under cProfile (every
thread) for one send, with a per-stage breakdown and the functions where the time goes.

Each thread's profiler counts that thread's CPU time (``time.thread_time``), not the
wall clock: a thread waiting for the GIL, the socket or the disk is not charged, so
the figures add up to the work the node does."""

from __future__ import annotations

import cProfile
import io
import pstats
import threading
import time
from pathlib import Path
from typing import Any

from receivers import send_all

from dicom_node.config import load_config
from dicom_node.node import Node
from dicom_node.node_process import prepare_process

STAGES = (  # (label, function name, file name ending): cumulative time per instance
    ("handle_store (whole handler)", "handle_store", "dicom/scp.py"),
    ("  read the data set (pynetdicom)", "encoded_dataset", "pynetdicom/events.py"),
    ("  header read + checks", "parse_instance", "dicom/parse.py"),
    ("  Part 10 framing", "part10", "dicom/meta.py"),
    ("  journal append", "append", "store/journal.py"),
    ("  journal commit (fdatasync, shared)", "commit", "store/journal.py"),
    ("applier (its own thread, behind the answer)", "_apply_batch", "store/instances.py"),
    ("  duplicate check + index statements", "_apply_all", "store/instances.py"),
    ("    index statements", "index_instances", "store/instance_index.py"),
    ("    file write (no fsync)", "place", "store/files.py"),
    ("DIMSE decode (pynetdicom)", "receive_primitive", "dicom/association.py"),
    ("upper layer (DUL) thread, whole", "run_reactor", "dicom/upper_layer.py"),
    ("association thread, whole", "_run_reactor", "dicom/reactor.py"),
)


def stage_table(stats: pstats.Stats, instances: int) -> str:
    table = stats.stats  # type: ignore[attr-defined]
    lines = ["per-stage CPU time of the node, ms per instance (cumulative, under cProfile):"]
    for label, func, where in STAGES:
        total = sum(v[3] for (fn, _, name), v in table.items()
                    if name == func and fn.endswith(where))
        lines.append(f"  {label:<42} {1000 * total / instances:7.2f}")
    return "\n".join(lines)


def carries_associations(prof: cProfile.Profile) -> bool:
    """Whether a thread carried associations or applied what they received (the
    acceptor's association and DUL threads, the applier); the idle job workers and
    assembler would only add their waits."""
    keys = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    return any(fn in ("handle_store", "run_reactor", "_apply_batch") for _, _, fn in keys)


def profiled_send(batches: list[list[Path]], work: Path, per_association: int = 0
                  ) -> tuple[list[cProfile.Profile], float, tuple[int, int]]:
    """One send to an in-process node profiled in every thread: the profiles, the rate
    and the journal's (records, fsyncs)."""
    profilers: list[cProfile.Profile] = []
    lock = threading.Lock()

    def hook(*_: Any) -> None:
        prof = cProfile.Profile(time.thread_time)
        with lock:
            profilers.append(prof)
        prof.enable()  # replaces this hook for the rest of the thread

    config = work / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{work / "node"}"\n[dicom]\nport = 0\n')
    node = Node(load_config(config, env={}))
    prepare_process()  # as `tessera node serve` does once the node is built
    count = sum(len(b) for b in batches)
    threading.setprofile(hook)
    try:
        node.start()
        rate = count / send_all([node.port], "TESSERA", batches, per_association)
        journal = node.parts.store.journal
        commits = (journal.records, journal.fsyncs) if journal is not None else (0, 0)
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
        for prof in profilers:
            prof.disable()
        node.stop()
    return profilers, rate, commits


def profile_node(batches: list[list[Path]], scratch: Path, top: int,
                 per_association: int = 0) -> str:
    """Run the node in-process with cProfile in every thread; one send."""
    work = scratch / "profile"
    work.mkdir()
    profilers, rate, commits = profiled_send(batches, work, per_association)
    busy = [p for p in profilers if carries_associations(p)]
    out = io.StringIO()
    out.write(f"node in-process under cProfile: {rate:.0f} instances/s "
              f"(profiling overhead included); {len(busy)} thread(s) shown "
              "(associations, applier)\n")
    if commits[1]:
        out.write(f"group commit: {commits[0]} journal records, {commits[1]} fdatasyncs "
                  f"({commits[0] / commits[1]:.2f} instances per fsync)\n")
    stats = pstats.Stats(*busy, stream=out)  # type: ignore[arg-type]
    out.write(stage_table(stats, sum(len(b) for b in batches)) + "\n")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()
