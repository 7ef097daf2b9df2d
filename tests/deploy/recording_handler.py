"""A job handler only the tests wire in: it records each run as a row (the side effect
the exactly-once test counts). ``run_worker`` starts the real ``tessera node worker``
command with this handler added, leaving the production wiring untouched.

    python -m tests.deploy.recording_handler node worker --config node.toml
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from dicom_node.store.jobs import ClaimedJob

LOGGER = logging.getLogger(__name__)

KIND = "test-record"
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS test_started (id SERIAL PRIMARY KEY, job_id INT, pid INT, "
    "attempt INT)",
    "CREATE TABLE IF NOT EXISTS test_effect (id SERIAL PRIMARY KEY, job_id INT, pid INT, "
    "attempt INT)",
)


class RecordingHandler:
    """``payload.hang_first``: the first attempt sleeps (heartbeating) until killed."""

    kinds = (KIND,)

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url, pool_size=4)

    def _record(self, table: str, job: ClaimedJob) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(f"INSERT INTO {table} (job_id, pid, attempt) "
                              "VALUES (:j, :p, :a)"),
                         {"j": job.id, "p": os.getpid(), "a": job.attempts})

    def run(self, job: ClaimedJob, heartbeat: Callable[[], None]) -> None:
        self._record("test_started", job)
        if job.payload.get("hang_first") and job.attempts == 1:
            time.sleep(600)
        time.sleep(float(job.payload.get("sleep_s", 0.0)))
        self._record("test_effect", job)

    def on_dead(self, job: ClaimedJob, error: str, s: Session) -> None:
        LOGGER.error("test job %s dead: %s", job.id, error)


def main() -> None:
    from dicom_node import node as node_module
    from viewer_bridge.main import main as tessera

    build = node_module.NodeParts.build.__func__  # type: ignore[attr-defined]

    def build_with_recorder(cls: type, config):  # type: ignore[no-untyped-def]
        parts = build(cls, config)
        parts.handlers.append(RecordingHandler(config.node.resolved_database_url()))
        return parts

    node_module.NodeParts.build = classmethod(build_with_recorder)  # type: ignore[assignment]
    sys.argv = ["tessera", *sys.argv[1:]]
    tessera()


if __name__ == "__main__":
    main()
