"""A long-running node process's own settings (``dicom_node.node_process``): pure
process logic, with a stand-in node for the order. A real ``tessera node serve`` is in
``test_peer_input.py``."""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Iterator

import pydicom.config
import pytest

from dicom_node.node_cli import run_until_signal
from dicom_node.node_process import freeze_startup_objects


@pytest.fixture
def restored() -> Iterator[None]:
    """Nothing frozen before; the test process's objects go back to the collector and
    pydicom's reading validation to what it was, afterwards."""
    reading = pydicom.config.settings.reading_validation_mode
    gc.unfreeze()
    yield
    gc.unfreeze()
    pydicom.config.settings.reading_validation_mode = reading


def test_frozen_objects_leave_full_collections(restored: None) -> None:
    built = [[i] for i in range(50_000)]  # objects the collector tracks
    tracked = len(gc.get_objects())
    frozen = freeze_startup_objects()
    assert frozen >= len(built)
    assert gc.get_freeze_count() == frozen
    # A full collection now walks what was made since, not the frozen objects.
    assert len(gc.get_objects()) < tracked - len(built)
    later = [[i] for i in range(10)]
    assert any(obj is later[0] for obj in gc.get_objects())


def test_serve_prepares_the_process_once_built_and_before_starting(restored: None) -> None:
    seen: dict[str, object] = {}
    settings = pydicom.config.settings

    class StandIn:
        def start(self) -> StandIn:
            seen["at start"] = (gc.get_freeze_count(), settings.reading_validation_mode)
            os.kill(os.getpid(), signal.SIGTERM)  # run_until_signal's own handler stops it
            return self

        def stop(self) -> None:
            seen["stopped"] = True

    def make() -> StandIn:
        seen["when built"] = (gc.get_freeze_count(), settings.reading_validation_mode)
        return StandIn()

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_until_signal(make, lambda _node: {"event": "test"})  # type: ignore[arg-type]
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert seen["when built"] == (0, pydicom.config.WARN)
    frozen, reading = seen["at start"]  # type: ignore[misc]
    assert frozen > 0
    assert reading == pydicom.config.IGNORE
    assert seen["stopped"] is True
