"""Job workers: threads that claim jobs from the queue and run their handlers."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

from sqlalchemy.orm import Session

from dicom_node.errors import DicomNodeError
from dicom_node.loop_health import LoopHealth
from dicom_node.pipeline.flow import JobKind
from dicom_node.prometheus import observe_job
from dicom_node.store.jobs import Backoff, ClaimedJob, JobQueue, LeaseLost

LOGGER = logging.getLogger(__name__)


class JobHandler(Protocol):
    kinds: tuple[JobKind, ...]

    def run(self, job: ClaimedJob, heartbeat: Callable[[], None]) -> None:
        """Do the work; raise to fail the attempt (it is retried with backoff)."""

    def on_dead(self, job: ClaimedJob, error: str, s: Session) -> None:
        """Called once when the job is given up (dead-lettered), inside the transaction
        that marks it dead: write its consequences through ``s``. If it raises, they are
        rolled back and the job is dead all the same."""


class PermanentJobError(DicomNodeError):
    """Retrying cannot help (e.g. a refused series): dead-letter at once."""


class JobDeferred(DicomNodeError):
    """The job waits for something another job does: put it back, due in ``delay_s``,
    without counting the attempt (its worker takes other jobs meanwhile)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(f"deferred for {delay_s:g} s")
        self.delay_s = delay_s


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class JobWorker:
    """``threads`` workers claiming the kinds of ``handlers``; heartbeats while running."""

    def __init__(self, queue: JobQueue, handlers: Sequence[JobHandler], *, threads: int,
                 backoff: Backoff, poll_interval_s: float, heartbeat_s: float) -> None:
        self.queue = queue
        self.by_kind: dict[str, JobHandler] = {kind: h for h in handlers for kind in h.kinds}
        self.threads = threads
        self.backoff = backoff
        self.poll = poll_interval_s
        self.heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.threads):
            t = threading.Thread(target=self._loop, name=f"job-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def wake(self) -> None:
        """New work was queued in this process: skip the poll wait."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)

    def _loop(self) -> None:
        owner = worker_identity()
        health = LoopHealth("job worker", self.poll, logger=LOGGER)
        while not self._stop.is_set():
            try:
                ran = self.run_one(owner)
            except Exception as exc:
                # The queue itself failed (database, disk): back off, say so once.
                self._stop.wait(health.failed(exc))
                continue
            health.succeeded()
            if not ran:
                self._wake.wait(self.poll)
                self._wake.clear()

    def run_one(self, owner: str) -> bool:
        job = self.queue.claim(self.by_kind, owner)
        if job is None:
            return False
        handler = self.by_kind[job.kind]
        lost = threading.Event()
        done = threading.Event()

        def beat() -> None:
            try:
                self.queue.heartbeat(job.id, owner)
            except LeaseLost:
                lost.set()
                raise

        def beat_loop() -> None:
            while not done.wait(self.heartbeat_s):
                try:
                    beat()
                except LeaseLost:
                    return
                except Exception:
                    LOGGER.exception("heartbeat of job %s failed", job.id)

        ticker = threading.Thread(target=beat_loop, name=f"heartbeat-{job.id}", daemon=True)
        ticker.start()
        started = time.monotonic()
        try:
            handler.run(job, beat)
        except LeaseLost:
            LOGGER.warning("job %s (%s) lost its lease; result dropped", job.id, job.kind)
            observe_job(job.kind, "lost", time.monotonic() - started)
            return True
        except JobDeferred as deferred:
            self.queue.defer(job.id, owner, deferred.delay_s)
            return True
        except Exception as exc:
            permanent = isinstance(exc, PermanentJobError)
            error = f"{type(exc).__name__}: {exc}"
            state = self.queue.fail(job.id, owner, error, self.backoff, permanent=permanent,
                                    on_dead=lambda s: handler.on_dead(job, error, s))
            log = LOGGER.error if state == "dead" else LOGGER.warning
            log("job %s (%s %s) attempt %d failed -> %s: %s", job.id, job.kind, job.key,
                job.attempts, state, error)
            observe_job(job.kind, "dead" if state == "dead" else "retry",
                        time.monotonic() - started)
            return True
        finally:
            done.set()
        elapsed = time.monotonic() - started
        if not self.queue.complete(job.id, owner):
            LOGGER.warning("job %s finished after losing its lease", job.id)
            observe_job(job.kind, "lost", elapsed)
        else:
            observe_job(job.kind, "done", elapsed)
        return True
