"""Scale-out on PostgreSQL: three ``tessera node worker`` processes share one queue.

Every job's side effect happens exactly once; a worker SIGKILLed mid-job loses its
lease and the job is done once by another worker after the lease expires.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from dicom_node.store.db import Database
from dicom_node.store.jobs import JobQueue
from dicom_node.store.models import Job
from tests.deploy.conftest import PYTHON, REPO, subprocess_env
from tests.deploy.recording_handler import KIND, SCHEMA
from tests.node.conftest import node_config_data, wait_until, write_node_config

JOBS = 200
LEASE_S = 4.0


class WorkerProcess:
    def __init__(self, config: Path, log: Path, threads: int) -> None:
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "tests.deploy.recording_handler", "node", "worker", "--config",
             str(config)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=self.log,
            env=subprocess_env(TESSERA_JOBS__WORKERS=str(threads)))
        started: list[dict[str, Any]] = []
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        reader = threading.Thread(target=lambda: started.append(json.loads(stdout.readline())))
        reader.start()
        reader.join(120)
        if not started or started[0].get("event") != "worker-started":
            self.kill()
            pytest.fail(f"worker did not start; see {log}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for w in started:
        w.stop()


def test_three_workers_do_each_job_once_and_take_over_a_killed_one(
        tmp_path: Path, pg_database, workers: list[WorkerProcess]) -> None:  # type: ignore[no-untyped-def]
    url = pg_database()
    config = write_node_config(tmp_path / "node.toml", node_config_data(
        tmp_path / "shared", node={"database_url": url},
        jobs={"lease_s": LEASE_S, "heartbeat_s": 1.0, "poll_interval_s": 0.1, "workers": 2}))
    db = Database(url)
    db.create_schema()
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in SCHEMA:
            conn.execute(text(statement))

    def rows(table: str, where: str = "") -> list[tuple[int, int, int]]:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(  # type: ignore[misc]
                text(f"SELECT job_id, pid, attempt FROM {table} {where}"))]

    queue = JobQueue(db, lease_s=LEASE_S)
    try:
        # Worker A alone, one thread: it takes the job that hangs, and nothing else.
        workers.append(WorkerProcess(config, tmp_path / "worker-a.log", threads=1))
        hang = queue.enqueue(KIND, "hang", {"hang_first": True})
        started = wait_until(lambda: rows("test_started", f"WHERE job_id = {hang}"),
                             timeout=60, what="worker A to start the hanging job")
        assert started[0][1] == workers[0].proc.pid
        workers.append(WorkerProcess(config, tmp_path / "worker-b.log", threads=2))
        workers.append(WorkerProcess(config, tmp_path / "worker-c.log", threads=2))
        ids = [queue.enqueue(KIND, f"job-{i}", {"sleep_s": 0.01}) for i in range(JOBS)]
        wait_until(lambda: len(rows("test_effect")) >= JOBS // 4, timeout=120,
                   what="the others to make progress")
        workers[0].kill()  # mid-job: its lease stops being renewed

        def all_done() -> bool:
            with db.session() as s:
                states = s.execute(text("SELECT state, count(*) FROM job GROUP BY state")).all()
            return dict(states) == {"done": JOBS + 1}  # type: ignore[arg-type]

        wait_until(all_done, timeout=180, interval=0.5, what="every job done")
        effects = rows("test_effect")
        by_job: dict[int, list[tuple[int, int, int]]] = {}
        for effect in effects:
            by_job.setdefault(effect[0], []).append(effect)
        assert sorted(by_job) == sorted([hang, *ids])
        doubled = {job: e for job, e in by_job.items() if len(e) != 1}
        assert not doubled, f"jobs done more than once: {doubled}"
        # The hanging job: done by another worker on its second attempt, after the lease.
        (_, pid, attempt), = by_job[hang]  # type: ignore[index]
        assert pid != workers[0].proc.pid and attempt == 2
        with db.session() as s:
            job = s.get(Job, hang)
            assert job is not None and job.attempts == 2
        # Both survivors took part (claims spread, SKIP LOCKED keeps them from blocking).
        pids = {pid for _, pid, _ in effects}
        assert {workers[1].proc.pid, workers[2].proc.pid} <= pids
        for w in workers[1:]:
            assert w.proc.poll() is None, "a surviving worker exited"
    finally:
        engine.dispose()
        db.dispose()
    assert os.path.isdir(tmp_path / "shared")
