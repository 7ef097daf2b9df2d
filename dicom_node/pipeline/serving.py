"""Every node process serves what the ``model_version`` table says serves.

The process that makes a version serving swaps its own registry at once (the
federation agent for a hub generation, the trainer for a local round). Other processes
sharing the database — ``tessera node worker`` on this or other hosts — have their own
registry, so each process polls the table and loads a version that another process made
serving (a hub generation, a local round, ``tessera model rollback``), without a
restart.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import select

from dicom_node.loop_health import LoopHealth
from dicom_node.pipeline.model_sources import ModelRegistry
from dicom_node.pipeline.versions import activate_serving
from dicom_node.store.db import Database
from dicom_node.store.models import ModelVersion, ModelVersionState

LOGGER = logging.getLogger(__name__)


class ServingFollower:
    """Polls the serving versions every ``interval_s`` and swaps the ones that changed."""

    def __init__(self, db: Database, models: ModelRegistry, interval_s: float) -> None:
        self.db = db
        self.models = models
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def serving(self) -> dict[str, int]:
        """``{model name: generation}`` as the table says (the latest activation wins)."""
        out: dict[str, int] = {}
        with self.db.session() as s:
            for name, generation in s.execute(
                select(ModelVersion.name, ModelVersion.generation)
                .where(ModelVersion.state == ModelVersionState.SERVING)
                .order_by(ModelVersion.activated_at, ModelVersion.id)
            ):
                out[name] = generation
        return out

    def check(self) -> list[str]:
        """Swap every model whose serving generation is not the one this process serves."""
        swapped = []
        for name, generation in self.serving().items():
            loaded = self.models.loaded_generation(name)
            if loaded is None or loaded == generation:
                continue  # not used by this process yet (loads from the table), or current
            LOGGER.info("%s generation %d serves now (this process served %d); swapping",
                        name, generation, loaded)
            swapped += activate_serving(self.db, self.models, name)
        return swapped

    def start(self) -> ServingFollower:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="serving-follower", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        health = LoopHealth("following the serving model versions", self.interval_s,
                            max_s=max(60.0, self.interval_s), logger=LOGGER)
        wait = health.interval_s
        while not self._stop.wait(wait):
            try:
                self.check()
            except Exception as exc:  # the database or a weights file: try again later
                wait = health.failed(exc)
            else:
                wait = health.succeeded()
