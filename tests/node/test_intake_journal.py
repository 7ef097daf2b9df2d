"""The intake journal (issue 24): kill -9 at random points while storescu sends, and
during the replay of a journal, never loses an acknowledged instance."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node.dicom.meta import dataset_offset
from dicom_node.dicom.parse import parse_instance
from dicom_node.store.db import Database
from dicom_node.store.instances import Peer, dataset_digest
from dicom_node.store.intent import intent_of
from dicom_node.store.journal import frame
from tests.node.conftest import (
    STORESCU,
    Index,
    NodeProcess,
    dataset_bytes,
    make_ct_series,
    node_config_data,
    wait_until,
    write_node_config,
)
from tests.peers import peer_env, require_binary

pytestmark = [pytest.mark.peers, pytest.mark.slow]

REPEATS = 5
PER_SERIES = 40
REPLAYED = 200
SEED = int(os.environ.get("TESSERA_TEST_SEED", time.time_ns() % 10**6))


def send_and_kill_after(port: int, files: list[Path], node: NodeProcess,
                        kill_after: int) -> set[Path]:
    """storescu -v sends ``files``; SIGKILL the node once ``kill_after`` C-STOREs were
    answered Success. Returns the files storescu saw acknowledged."""
    proc = subprocess.Popen(
        [require_binary(STORESCU), "-v", "-aet", "STORESCU", "-aec", "TESSERA",
         "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=peer_env())
    assert proc.stdout is not None
    acknowledged: set[Path] = set()
    current: Path | None = None
    for line in proc.stdout:
        if "Sending file:" in line:
            current = Path(line.split("Sending file:", 1)[1].strip())
        elif "Received Store Response (Success)" in line:
            assert current is not None
            acknowledged.add(current)
            if len(acknowledged) == kill_after:
                node.kill()
    proc.wait(60)
    return acknowledged


def test_kill_9_at_random_points_acknowledged_equals_indexed(
    tmp_path: Path, node_process: Callable[..., NodeProcess],
    open_index: Callable[[Path], Index],
) -> None:
    rng = random.Random(SEED)
    data_dir = tmp_path / "node"
    config = write_node_config(tmp_path / "node.toml",
                               node_config_data(data_dir, quiet_s=30))
    acknowledged: dict[str, Path] = {}  # SOP Instance UID -> the file sent
    sent: set[str] = set()
    node = node_process(config)
    for rep in range(REPEATS):
        series = make_ct_series(tmp_path / f"ct{rep}", PER_SERIES)
        uid_of = dict(zip(series.files, series.sop_uids, strict=True))
        kill_after = rng.randint(1, PER_SERIES - 1)
        acked = send_and_kill_after(node.port, series.files, node, kill_after)
        assert len(acked) == kill_after, f"seed {SEED}: storescu went on after the kill"
        acknowledged.update({uid_of[f]: f for f in acked})
        sent.update(series.sop_uids)
        node = node_process(config)  # replays what the killed one left
        stored = open_index(data_dir).instance_paths()
        missing = set(acknowledged) - set(stored)
        assert not missing, f"seed {SEED}, rep {rep}: acknowledged, not indexed: {missing}"
        # At most the one instance in flight at the kill is stored unacknowledged.
        assert len(set(stored) - set(acknowledged)) <= rep + 1
        assert set(stored) <= sent
        for uid, path in acknowledged.items():
            assert dataset_bytes(stored[uid]) == dataset_bytes(path)
    node.stop()


def write_unapplied_journal(data_dir: Path, files: list[Path]) -> Path:
    """A journal segment holding ``files`` as acknowledged records whose files and index
    rows never reached the disk (a power cut right after the acknowledgements)."""
    (data_dir / "intake").mkdir(mode=0o700, parents=True)
    segment = data_dir / "intake" / "000000000001.journal"
    with segment.open("wb") as out:
        for path in files:
            data = path.read_bytes()
            header = parse_instance(data[dataset_offset(data):],
                                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                                    context_sop_class_uid=None,
                                    command_sop_instance_uid=None, max_bytes=1 << 30)
            intent = intent_of(header, Peer(ae_title="REPLAYTEST"), False,
                               dataset_digest(data))
            out.write(frame(intent, data) + intent + data)
        os.fsync(out.fileno())
    return segment


def indexed_count(data_dir: Path) -> int:
    db = data_dir / "node.db"
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute("select count(*) from instance").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_kill_9_during_replay_then_replay_completes(
    tmp_path: Path, node_process: Callable[..., NodeProcess],
    open_index: Callable[[Path], Index],
) -> None:
    rng = random.Random(SEED)
    data_dir = tmp_path / "node"
    config = write_node_config(tmp_path / "node.toml",
                               node_config_data(data_dir, quiet_s=30))
    db = Database(f"sqlite:///{(data_dir / 'node.db').resolve()}")
    db.create_schema()  # as a node's first start leaves it
    db.dispose()
    series = make_ct_series(tmp_path / "ct", REPLAYED)
    segment = write_unapplied_journal(data_dir, series.files)
    for attempt in range(2):
        kill_at = rng.randint(1, REPLAYED // 2)
        log = (tmp_path / f"replay-{attempt}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "viewer_bridge.main", "node", "serve",
                                 "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_until(lambda p=proc, k=kill_at: indexed_count(data_dir) >= k  # type: ignore[misc]
                       or p.poll() is not None, timeout=60, interval=0.01)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            log.close()
        seen = indexed_count(data_dir)
        assert seen < REPLAYED and segment.exists(), \
            f"seed {SEED}: the replay finished before the kill ({seen} indexed)"
    node_process(config).stop()
    stored = open_index(data_dir).instance_paths()
    assert set(series.sop_uids) <= set(stored)
    for uid, path in zip(series.sop_uids, series.files, strict=True):
        assert dataset_bytes(stored[uid]) == dataset_bytes(path)
    assert not list((data_dir / "intake").glob("*.journal"))
