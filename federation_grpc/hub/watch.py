"""What every watcher of generations needs, read once per change and shared.

Each ``WatchGenerations`` stream waits for the current generation to change, then sends
it, naming the generations published since its last event that the current one already
replaced (a watcher is told of every generation and downloads only the newest). With a
thousand nodes watching, reading the state version and the current generation from the
store once per stream and per change would be thousands of queries (and connections) at
each publication, all at once. :class:`CurrentWatch` reads them (and the numbers
published) once per change notice (and, for changes made by another process, which send
no notice here, at most once per poll interval) and hands every stream the same snapshot.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from federation_grpc.hub.domain import GenerationView
from federation_grpc.hub.generations import GenerationLedger


@dataclass(frozen=True)
class CurrentState:
    """The hub state version and current generation, as read after ``notice`` notices."""

    version: int
    current: GenerationView | None
    notice: int
    read_at: float
    published: tuple[int, ...] = ()  # the newest generations published, oldest first

    def superseded(self, last_sent: int) -> list[int]:
        """Generations published after ``last_sent`` that the current one replaced."""
        if self.current is None or last_sent < 0:
            return []
        return [n for n in self.published if last_sent < n < self.current.number]


class CurrentWatch:
    def __init__(self, ledger: GenerationLedger) -> None:
        self.ledger = ledger
        self._read = threading.Lock()
        self._state: CurrentState | None = None

    def _fresh(self, notice: int, not_before: float) -> CurrentState:
        """A snapshot read after the ``notice``-th notice and not before ``not_before``."""
        state = self._state
        if state is not None and state.notice >= notice and state.read_at >= not_before:
            return state
        with self._read:  # one reader; the others take what it read
            state = self._state
            if state is not None and state.notice >= notice and state.read_at >= not_before:
                return state
            seen = self.ledger.wait_for_notice(-1, 0)
            read_at = time.monotonic()
            version = self.ledger.state_version()
            state = CurrentState(version, self.ledger.current_generation(), seen, read_at,
                                 self.ledger.published_numbers())
            self._state = state
            return state

    def wait(self, known_version: int, timeout: float) -> CurrentState:
        """The state once its version differs from ``known_version``, or after ``timeout``.

        Changes in this process wake the waiters at once; changes made elsewhere (the CLI,
        another replica) show within two ``timeout`` intervals.
        """
        notice = self.ledger.wait_for_notice(-1, 0)
        state = self._fresh(notice, time.monotonic() - timeout)
        if state.version != known_version:
            return state
        notice = self.ledger.wait_for_notice(notice, timeout)
        return self._fresh(notice, time.monotonic() - timeout)
