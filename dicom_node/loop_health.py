"""Background loops that fail (database gone, disk full) back off and say so once.

A loop tick that raises doubles the wait, up to ``max_s``; the first failure is
logged with its traceback, later ones of the same kind only at debug, a different
error once more as a warning, and the recovery once. A full disk used to print the
same traceback thirty times in twenty seconds.
"""

from __future__ import annotations

import logging


class LoopHealth:
    """The failing/healthy state of one background loop and its next wait."""

    def __init__(self, name: str, interval_s: float, max_s: float = 30.0,
                 logger: logging.Logger | None = None) -> None:
        self.name = name
        self.interval_s = interval_s
        self.max_s = max(max_s, interval_s)
        self.failures = 0
        self._delay = interval_s
        self._last_error: str | None = None
        self._log = logger or logging.getLogger(__name__)

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self, exc: BaseException) -> float:
        """Record a failed tick; returns how long to wait before the next one."""
        self.failures += 1
        error = f"{type(exc).__name__}: {exc}"[:300]
        if self.failures == 1:
            self._log.error("%s failed; backing off (up to %g s) until it works again",
                            self.name, self.max_s, exc_info=exc)
        elif error != self._last_error:
            self._log.warning("%s still failing, now with %s", self.name, error)
        else:
            self._log.debug("%s failed again (%d in a row)", self.name, self.failures)
        self._last_error = error
        self._delay = min(self.max_s, max(self.interval_s, self._delay * 2))
        return self._delay

    def succeeded(self) -> float:
        """Record a good tick; returns the normal interval."""
        if self.failures:
            self._log.warning("%s works again after %d failed attempt(s)", self.name,
                              self.failures)
        self.failures = 0
        self._last_error = None
        self._delay = self.interval_s
        return self.interval_s
