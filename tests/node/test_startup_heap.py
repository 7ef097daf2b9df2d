"""The node's process leaves what it built at start out of the cyclic collector's passes
(``dicom_node.startup_heap``): pure process logic, with a stand-in node for the order."""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Iterator

import pytest

from dicom_node.node_cli import run_until_signal
from dicom_node.startup_heap import freeze_startup_objects


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Nothing frozen before; the test process's objects go back to the collector
    afterwards."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_frozen_objects_leave_full_collections(unfrozen: None) -> None:
    built = [[i] for i in range(50_000)]  # objects the collector tracks
    tracked = len(gc.get_objects())
    frozen = freeze_startup_objects()
    assert frozen >= len(built)
    assert gc.get_freeze_count() == frozen
    # A full collection now walks what was made since, not the frozen objects.
    assert len(gc.get_objects()) < tracked - len(built)
    later = [[i] for i in range(10)]
    assert any(obj is later[0] for obj in gc.get_objects())


def test_serve_freezes_once_built_and_before_starting(unfrozen: None) -> None:
    seen: dict[str, int] = {}

    class StandIn:
        def start(self) -> StandIn:
            seen["frozen at start"] = gc.get_freeze_count()
            os.kill(os.getpid(), signal.SIGTERM)  # run_until_signal's own handler stops it
            return self

        def stop(self) -> None:
            seen["stopped"] = 1

    def make() -> StandIn:
        seen["frozen when built"] = gc.get_freeze_count()
        return StandIn()

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_until_signal(make, lambda _node: {"event": "test"})  # type: ignore[arg-type]
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert seen["frozen when built"] == 0
    assert seen["frozen at start"] > 0
    assert seen["stopped"] == 1
