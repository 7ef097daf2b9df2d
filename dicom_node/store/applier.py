"""Work applied behind an acknowledgement, in batches, by one thread.

The intake journal makes a received instance durable before the C-STORE is answered;
its file and index row need not hold up the answer. :class:`BatchApplier` takes such
records from the association threads and applies them on its own thread, as many as
have gathered (up to ``max_batch``, after lingering ``linger_s`` for more) at a time,
so one index transaction serves several instances. ``put`` blocks while
``max_waiting`` records wait (back-pressure: the associations slow down rather than
memory growing). :meth:`settle` applies what was put so far without lingering and
waits for it (an association asks to release: its instances are indexed before the
answer), and :meth:`stop` applies every record put before it returns.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from dicom_node.errors import StoreError

LOGGER = logging.getLogger(__name__)

T = TypeVar("T")

# How long a batch smaller than ``max_batch`` waits for more records (one association
# sends one every few milliseconds; ~50 ms lets a few dozen share a transaction).
LINGER_S = 0.05


class BatchApplier(Generic[T]):
    def __init__(self, apply: Callable[[list[T]], None], *, name: str,
                 max_waiting: int = 256, max_batch: int = 64,
                 linger_s: float | None = None) -> None:
        """``apply`` handles its own failures (an exception is logged, and the batch is
        counted as applied). A batch smaller than ``max_batch`` waits up to ``linger_s``
        for more records (default :data:`LINGER_S`), so that one association's instances
        share a transaction instead of taking one each."""
        self._apply = apply
        self.max_waiting = max_waiting
        self.max_batch = max_batch
        self.linger_s = LINGER_S if linger_s is None else linger_s
        self._waiting: deque[T] = deque()
        self._put = 0  # records put so far
        self._settle_upto = 0  # records put before a settle: applied without lingering
        self._busy = False
        self._stopping = False
        # One lock, two conditions: the applier thread waits on ``_ready`` (woken only
        # when a batch is due: the first record, a full batch, a settle, a stop), the
        # others on ``_changed`` (room in the queue, records applied). A put that
        # neither starts nor fills a batch wakes nobody.
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._changed = threading.Condition(self._lock)
        self.batches = 0  # how many apply calls, for the benchmark's figures
        self.applied = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: T) -> None:
        with self._lock:
            while len(self._waiting) >= self.max_waiting and not self._stopping:
                self._changed.wait()
            if self._stopping:
                raise StoreError("the node is stopping: nothing more is applied")
            self._waiting.append(item)
            self._put += 1
            if len(self._waiting) == 1 or len(self._waiting) >= self.max_batch:
                self._ready.notify()

    def _no_linger(self) -> int:
        """Have what was put so far applied without lingering for more; the count of
        records put so far. Called holding ``_lock``."""
        self._settle_upto = self._put
        self._ready.notify()
        return self._put

    def flush(self) -> None:
        """Apply what was put so far without lingering for more (a sender is gone)."""
        with self._lock:
            self._no_linger()

    def settle(self, timeout_s: float) -> bool:
        """Apply what was put so far without lingering, and wait for it; whether it was
        applied within ``timeout_s``. Records put meanwhile are not waited for."""
        with self._lock:
            upto = self._no_linger()
            return self._changed.wait_for(lambda: self.applied >= upto, timeout_s)

    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self._busy

    def wait_idle(self, timeout_s: float) -> bool:
        """Whether everything put so far was applied within ``timeout_s``."""
        with self._lock:
            self._no_linger()
            return self._changed.wait_for(lambda: not self._waiting and not self._busy,
                                          timeout_s)

    def stop(self, timeout_s: float = 120.0) -> None:
        """Apply what waits, then end the thread."""
        with self._lock:
            self._stopping = True
            self._ready.notify()
            self._changed.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            LOGGER.error("%s: %d record(s) still waiting after %.0f s", self._thread.name,
                         len(self._waiting), timeout_s)

    def _full_or_wanted(self) -> bool:
        """Whether to apply now rather than linger: a full batch, a stop, or someone
        waiting for records that are still queued."""
        return (len(self._waiting) >= self.max_batch or self._stopping
                or self._settle_upto > self.applied)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    self._ready.wait()
                if not self._waiting:
                    return  # stopping, and nothing left
                if self.linger_s > 0:
                    self._ready.wait_for(self._full_or_wanted, self.linger_s)
                batch = [self._waiting.popleft()
                         for _ in range(min(self.max_batch, len(self._waiting)))]
                self._busy = True
                self._changed.notify_all()  # room for the associations waiting in put()
            try:
                self._apply(batch)
            except Exception:
                LOGGER.exception("%s: applying %d record(s) failed", self._thread.name,
                                 len(batch))
            finally:
                with self._lock:
                    self._busy = False
                    self.batches += 1
                    self.applied += len(batch)
                    self._changed.notify_all()
