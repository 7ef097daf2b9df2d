"""The intake journal (issue 24): kill -9 at random points while storescu sends, and
during the replay of a journal, never loses an acknowledged instance; on both index
backends, the node's default SQLite file and a real PostgreSQL database."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.dicom.meta import dataset_offset
from dicom_node.dicom.parse import InstanceHeader, parse_instance
from dicom_node.store.db import Database
from dicom_node.store.files import InstanceFiles
from dicom_node.store.instances import IngestOutcome, InstanceStore, Peer, dataset_digest
from dicom_node.store.intent import intent_of
from dicom_node.store.journal import frame
from dicom_node.store.models import Instance, Series, Study
from tests.node.conftest import (
    STORESCU,
    NodeProcess,
    Postgres,
    dataset_bytes,
    make_ct_series,
    node_config_data,
    wait_until,
    write_node_config,
)
from tests.peers import peer_env, require_binary

pytestmark = [pytest.mark.peers, pytest.mark.slow]

REPEATS = 5
SEED = int(os.environ.get("TESSERA_TEST_SEED", time.time_ns() % 10**6))


@dataclass(frozen=True)
class Backend:
    """Where a test node keeps its index, and how much each test sends to it."""

    name: str
    database_url: str  # "": the node's default, a SQLite file in its data_dir
    per_series: int    # instances sent per kill repetition
    replayed: int      # records in the unapplied journal
    replay_kills: int  # kills during its replay before the replay may complete

    def config(self, path: Path, data_dir: Path) -> Path:
        return write_node_config(path, node_config_data(
            data_dir, quiet_s=30, node={"database_url": self.database_url}))

    def database(self, data_dir: Path) -> Database:
        """The node's own Database on this index (as a node's start opens it)."""
        return Database(self.database_url
                        or f"sqlite:///{(data_dir / 'node.db').resolve()}")

    def reader(self, data_dir: Path) -> IndexReader:
        if self.database_url:
            return IndexReader(create_engine(self.database_url), data_dir)
        # Read-only and without the node's BEGIN IMMEDIATE: polling must not take the
        # write lock from the node it watches.
        db = (data_dir / "node.db").resolve()
        return IndexReader(create_engine(f"sqlite:///file:{db}?mode=ro&uri=true"), data_dir)


class IndexReader:
    """What a node's index holds, read through SQLAlchemy as an operator would."""

    def __init__(self, engine: Engine, data_dir: Path) -> None:
        self.engine = engine
        self.data_dir = data_dir

    def count(self) -> int:
        """Instance rows; 0 while the index cannot be read yet."""
        try:
            with self.engine.connect() as conn:
                return int(conn.execute(select(func.count()).select_from(Instance))
                           .scalar_one())
        except SQLAlchemyError:
            return 0

    def instance_paths(self) -> dict[str, Path]:
        root = self.data_dir / "instances"
        with self.engine.connect() as conn:
            return {uid: root / rel for uid, rel in conn.execute(
                select(Instance.sop_instance_uid, Instance.path)).all()}

    def miscounted_series(self) -> dict[str, tuple[int, int]]:
        """Series whose instance_count is not their number of rows: (count, rows)."""
        rows = (select(Instance.series_id, func.count().label("n"))
                .group_by(Instance.series_id).subquery())
        with self.engine.connect() as conn:
            return {uid: (count, n or 0) for uid, count, n in conn.execute(
                select(Series.series_uid, Series.instance_count, rows.c.n)
                .outerjoin(rows, rows.c.series_id == Series.id)).all()
                if count != (n or 0)}

    def close(self) -> None:
        self.engine.dispose()


@contextmanager
def fresh_database(postgres: Postgres) -> Iterator[str]:
    """An empty database on the session's cluster, dropped afterwards; its URL."""
    name = f"intake_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield postgres.url.rsplit("/", 1)[0] + "/" + name
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", "", per_series=40, replayed=200, replay_kills=2)
        return
    # On PostgreSQL fewer instances per repetition and one kill during the replay (the
    # completing start replays the already-indexed records again): the properties are
    # the same, a node start costs seconds, and the suite's time is budgeted.
    with fresh_database(request.getfixturevalue("postgres")) as url:
        yield Backend("postgresql", url, per_series=16, replayed=200, replay_kills=1)


@pytest.fixture
def index_reader(backend: Backend) -> Iterator[Callable[[Path], IndexReader]]:
    opened: list[IndexReader] = []

    def _open(data_dir: Path) -> IndexReader:
        opened.append(backend.reader(data_dir))
        return opened[-1]

    yield _open
    for reader in opened:
        reader.close()


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
    tmp_path: Path, backend: Backend, node_process: Callable[..., NodeProcess],
    index_reader: Callable[[Path], IndexReader],
) -> None:
    rng = random.Random(SEED)
    data_dir = tmp_path / "node"
    config = backend.config(tmp_path / "node.toml", data_dir)
    index = index_reader(data_dir)
    acknowledged: dict[str, Path] = {}  # SOP Instance UID -> the file sent
    sent: set[str] = set()
    node = node_process(config)
    for rep in range(REPEATS):
        series = make_ct_series(tmp_path / f"ct{rep}", backend.per_series)
        uid_of = dict(zip(series.files, series.sop_uids, strict=True))
        kill_after = rng.randint(1, backend.per_series - 1)
        acked = send_and_kill_after(node.port, series.files, node, kill_after)
        where = f"seed {SEED}, {backend.name}, rep {rep}"
        # The node may answer one more C-STORE between the test seeing the kill_after-th
        # answer and the SIGKILL landing (more so on a busy machine): every answer
        # storescu saw was sent before the node died, so each must be kept all the same.
        assert len(acked) >= kill_after, f"{where}: storescu saw fewer answers than sent"
        acknowledged.update({uid_of[f]: f for f in acked})
        sent.update(series.sop_uids)
        node = node_process(config)  # replays what the killed one left
        stored = index.instance_paths()
        missing = set(acknowledged) - set(stored)
        assert not missing, f"{where}: acknowledged, not indexed: {missing}"
        # At most the one instance in flight at the kill is stored unacknowledged.
        assert len(set(stored) - set(acknowledged)) <= rep + 1, where
        assert set(stored) <= sent, where
        assert not index.miscounted_series(), where
        for uid, path in acknowledged.items():
            assert dataset_bytes(stored[uid]) == dataset_bytes(path), f"{where}: {uid}"
    node.stop()


def header_of(data: bytes) -> InstanceHeader:
    """The header the node reads from a Part 10 file's dataset."""
    return parse_instance(data[dataset_offset(data):], transfer_syntax_uid="1.2.840.10008.1.2.1",
                          context_sop_class_uid=None, command_sop_instance_uid=None,
                          max_bytes=1 << 30)


def write_unapplied_journal(data_dir: Path, files: list[Path]) -> Path:
    """A journal segment holding ``files`` as acknowledged records whose files and index
    rows never reached the disk (a power cut right after the acknowledgements)."""
    (data_dir / "intake").mkdir(mode=0o700, parents=True)
    segment = data_dir / "intake" / "000000000001.journal"
    with segment.open("wb") as out:
        for path in files:
            data = path.read_bytes()
            intent = intent_of(header_of(data), Peer(ae_title="REPLAYTEST"), False,
                               dataset_digest(data))
            out.write(frame(intent, data, 1) + intent + data)
        os.fsync(out.fileno())
    return segment


def test_kill_9_during_replay_then_replay_completes(
    tmp_path: Path, backend: Backend, node_process: Callable[..., NodeProcess],
    index_reader: Callable[[Path], IndexReader],
) -> None:
    rng = random.Random(SEED)
    data_dir = tmp_path / "node"
    config = backend.config(tmp_path / "node.toml", data_dir)
    db = backend.database(data_dir)
    db.create_schema()  # as a node's first start leaves it
    db.dispose()
    index = index_reader(data_dir)
    series = make_ct_series(tmp_path / "ct", backend.replayed)
    segment = write_unapplied_journal(data_dir, series.files)
    seen = 0
    for attempt in range(backend.replay_kills):
        # Past what earlier attempts indexed: records already applied replay as no-ops.
        kill_at = seen + rng.randint(1, max(1, (backend.replayed - seen) // 2))
        log = (tmp_path / f"replay-{attempt}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "viewer_bridge.main", "node", "serve",
                                 "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_until(lambda p=proc, k=kill_at: index.count() >= k  # type: ignore[misc]
                       or p.poll() is not None, timeout=60, interval=0.01)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            log.close()
        seen = index.count()
        assert seen < backend.replayed and segment.exists(), \
            f"seed {SEED}, {backend.name}: the replay finished before the kill ({seen})"
    problem = node_process(config).stop(grace_s=60)
    assert problem is None, problem  # its final checkpoint drops the segments
    stored = index.instance_paths()
    assert index.count() == len(stored) == backend.replayed, "each record indexed once"
    assert set(series.sop_uids) == set(stored)
    assert not index.miscounted_series()
    for uid, path in zip(series.sop_uids, series.files, strict=True):
        assert dataset_bytes(stored[uid]) == dataset_bytes(path)
    assert not list((data_dir / "intake").glob("*.journal"))


# Header values a sender may put in an instance that SQLite holds and PostgreSQL refuses
# (a NUL inside a text value; an IS value beyond 32 bits, invalid DICOM but seen).
ODD_VALUES = {"SeriesDescription": "AB\x00CD", "StudyDate": "2020\x000101",
              "InstanceNumber": "99999999999", "SeriesNumber": "-99999999999"}


def odd_instances(directory: Path) -> list[Path]:
    """One CT per :data:`ODD_VALUES` entry, each of its own study and series."""
    files = []
    for i, (keyword, value) in enumerate(ODD_VALUES.items()):
        path = make_ct_series(directory / str(i), 1).files[0]
        ds = pydicom.dcmread(path)
        setattr(ds, keyword, value)
        ds.save_as(path)
        files.append(path)
    return files


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_header_values_an_index_refuses_fail_neither_the_store_nor_the_replay(
    tmp_path: Path, backend: Backend,
) -> None:
    """Once journaled, an instance is acknowledged or replayed: an index row the backend
    cannot hold would answer a failure for a journaled record and, after a crash, stop
    every later start at its replay."""
    data_dir = tmp_path / "node"
    db = backend.database(data_dir)
    db.create_schema()
    store = InstanceStore(db, InstanceFiles(data_dir / "instances", data_dir / "quarantine"))
    write_unapplied_journal(data_dir, odd_instances(tmp_path / "journaled"))
    try:
        assert store.open_journal(data_dir / "intake") == len(ODD_VALUES)
        for path in odd_instances(tmp_path / "received"):
            data = path.read_bytes()
            assert store.ingest(data, header_of(data), Peer(ae_title="ODD")) \
                == IngestOutcome.STORED
    finally:
        store.close_journal()
    with db.session() as s:
        assert s.execute(select(func.count()).select_from(Instance)).scalar_one() == 8
        assert set(s.execute(select(Series.series_description)).scalars()) == {
            "ABCD", "tessera test"}
        assert not any(date and "\x00" in date
                       for date in s.execute(select(Study.study_date)).scalars())
        assert set(s.execute(select(Series.series_number)).scalars()) - {None} == {1}
        assert None in set(s.execute(select(Instance.instance_number)).scalars())
    db.dispose()


@pytest.mark.peers
def test_on_postgresql_the_intake_writes_of_two_processes_never_interleave(
    postgres: Postgres,
) -> None:
    """Receiving processes share one index: on PostgreSQL a relaxed session (an intake
    write: check the row, place the file, insert) holds an advisory lock to its commit,
    as SQLite's BEGIN IMMEDIATE does, so two receivers given two versions of one SOP
    Instance UID cannot both find no row and both write the file."""
    first_db, second_db = Database(postgres.url), Database(postgres.url)
    first_db.create_schema()
    inside, leave = threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        with first_db.relaxed_session():
            inside.set()
            leave.wait(30)
            order.append("first")

    def second() -> None:
        with second_db.relaxed_session():
            order.append("second")

    holder = threading.Thread(target=first)
    holder.start()
    assert inside.wait(30)
    waiter = threading.Thread(target=second)
    waiter.start()
    waiter.join(1.0)
    try:
        assert waiter.is_alive() and not order, "a second writer got in beside the first"
    finally:
        leave.set()
        holder.join(30)
        waiter.join(30)
        first_db.dispose()
        second_db.dispose()
    assert order == ["first", "second"]
