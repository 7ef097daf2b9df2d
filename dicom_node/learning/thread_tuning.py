"""How many intra-op threads a training step on CPU runs with, measured while training."""

from __future__ import annotations

import logging

import numpy as np
import torch

LOGGER = logging.getLogger(__name__)


class ThreadTuner:
    """Picks the intra-op thread count that trains fastest right now, and keeps checking.

    On shared cores, one thread can beat all of them (other processes hold the rest);
    on an idle machine all threads win. Steps alternate between one thread and
    ``max_threads`` at the start and for a few steps every ``recheck`` steps; the
    faster median wins. Costs nothing when there is a single core.
    """

    def __init__(self, max_threads: int, probe: int = 3, recheck: int = 100) -> None:
        self.options = sorted({1, max(1, max_threads)})
        self.probe, self.recheck = probe, recheck
        self.times: dict[int, list[float]] = {n: [] for n in self.options}
        self.current = self.options[-1]
        self._probing = len(self.options) > 1

    def before_step(self, step: int) -> None:
        if len(self.options) == 1:
            return
        if step and step % self.recheck == 0:
            self.times = {n: [] for n in self.options}
            self._probing = True
        if self._probing:
            self.current = self.options[step % len(self.options)]
        torch.set_num_threads(self.current)

    def after_step(self, seconds: float) -> None:
        if not self._probing:
            return
        self.times[self.current].append(seconds)
        if all(len(t) > self.probe for t in self.times.values()):
            # the first sample of each is a warm-up (allocations, thread start)
            medians = {n: float(np.median(t[1:])) for n, t in self.times.items()}
            best = min(medians, key=lambda n: medians[n])
            if best != self.current or self._probing:
                LOGGER.info("training with %d thread(s): step medians %s", best, medians)
            self.current, self._probing = best, False
            torch.set_num_threads(best)
