"""Model versions on the node: which one serves, lineage, rollback, and every process
following the table.

A *version* is a row of the ``model_version`` table: a weights file the node has, its
*generation* number, where it came from (``shipped``, ``built``, ``configured``, ``hub``,
``local``, ``adapted``) and its state. Hub generations keep the hub's number; the node's
own rounds are numbered from ``LOCAL_FLOOR`` up, so the two never collide.

The table is the truth; each node process's :class:`ModelRegistry` follows it. The
process that makes a version serving swaps its own registry at once (the federation
agent for a hub generation, the trainer for a local round). Other processes sharing the
database (``tessera node worker`` on this or other hosts) have their own registry, so
each polls the table (:class:`ServingFollower`) and loads a version another process made
serving, without a restart. A change made outside any serving process (``tessera model
rollback``) also queues a ``model-activate`` job so that a running node swaps at once.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.errors import DicomNodeError
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import SegmentationNetwork
from dicom_node.learning.weights import load_model
from dicom_node.loop_health import LoopHealth
from dicom_node.pipeline.flow import ActivatePayload, enqueue
from dicom_node.pipeline.model_sources import ModelRegistry
from dicom_node.store.db import Database
from dicom_node.store.jobs import JobQueue
from dicom_node.store.models import ModelVersion, ModelVersionState

LOGGER = logging.getLogger(__name__)



class VersionError(DicomNodeError):
    pass


def load_version(name: str, generation: int, path: str | None, *, level: int = logging.WARNING
                 ) -> tuple[SegmentationNetwork, ModelConfig] | None:
    """Version ``generation`` of ``name`` loaded from ``path``; None (logged at ``level``)
    when it has no weights file or they do not load."""
    if path is None:
        return None
    try:
        return load_model(path)
    except (DicomNodeError, OSError) as exc:
        LOGGER.log(level, "%s generation %d not loaded from %s: %s", name, generation, path,
                   exc)
        return None


def version_row(s: Session, name: str, generation: int) -> ModelVersion | None:
    """The row of ``name`` generation ``generation``, if the node has one."""
    return s.execute(select(ModelVersion).where(
        ModelVersion.name == name, ModelVersion.generation == generation)).scalar_one_or_none()


def ensure_base_version(s: Session, models: ModelRegistry,
                        model_config: ModelConfig) -> ModelVersion:
    """The row of the generation serving now; created for a shipped, built or configured
    model."""
    row = version_row(s, model_config.name, model_config.generation)
    if row is not None:
        return row
    row = ModelVersion(name=model_config.name, generation=model_config.generation,
                       parent_generation=None, origin=models.origin(model_config.name),
                       path=str(models.source(model_config.name)),
                       state=ModelVersionState.SERVING, samples=0, sample_ids=[], metrics={},
                       activated_at=datetime.now(UTC))
    s.add(row)
    s.flush()
    return row


def serving_version(s: Session, name: str) -> ModelVersion | None:
    return s.execute(select(ModelVersion).where(
        ModelVersion.name == name, ModelVersion.state == ModelVersionState.SERVING)
        .order_by(ModelVersion.activated_at.desc(), ModelVersion.id.desc())).scalars().first()


# On a federated node generation numbers below LOCAL_FLOOR are the hub's; a local
# round is numbered LOCAL_FLOOR + k (k counts local rounds on this node), so the hub's
# next generation can never collide with one trained here. A local version's hub base
# is found by following parent_generation down to a number below LOCAL_FLOOR.
LOCAL_FLOOR = 1_000_000


def next_generation(s: Session, name: str, base: int, *, local_floor: int = 0) -> int:
    """The number of a new local version: ``base + 1`` style on a standalone node,
    the next one above ``local_floor`` on a federated node (pass ``LOCAL_FLOOR``)."""
    known = s.execute(select(ModelVersion.generation).where(ModelVersion.name == name)).scalars()
    if local_floor:
        return max([local_floor, *(g for g in known if g >= local_floor)]) + 1
    return max([base, *known]) + 1


def is_local_generation(generation: int) -> bool:
    return generation >= LOCAL_FLOOR


def hub_base_generation(s: Session, name: str, generation: int) -> int:
    """The hub generation a (possibly local) version descends from."""
    seen = set()
    while generation >= LOCAL_FLOOR and generation not in seen:
        seen.add(generation)
        parent = s.execute(select(ModelVersion.parent_generation).where(
            ModelVersion.name == name, ModelVersion.generation == generation)).scalar()
        if parent is None:
            break
        generation = parent
    return generation


def activate_serving(db: Database, models: ModelRegistry, name: str | None = None) -> list[str]:
    """Make the registry serve what the table says serves (all models, or ``name``)."""
    with db.session() as s:
        q = select(ModelVersion).where(ModelVersion.state == ModelVersionState.SERVING)
        if name is not None:
            q = q.where(ModelVersion.name == name)
        rows = list(s.execute(q.order_by(ModelVersion.id)).scalars())
    done = []
    for row in rows:
        loaded = load_version(row.name, row.generation, row.path, level=logging.ERROR)
        if loaded is None:
            continue
        model, config = loaded
        models.replace(row.name, model, config)
        done.append(f"{row.name}:{row.generation}")
        LOGGER.info("serving %s generation %d (%s)", row.name, row.generation, row.origin)
    return done


def list_versions(db: Database, name: str | None = None) -> list[dict[str, Any]]:
    with db.session() as s:
        q = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.generation)
        if name:
            q = q.where(ModelVersion.name == name)
        return [
            {"name": r.name, "generation": r.generation, "parent": r.parent_generation,
             "state": r.state, "origin": r.origin, "samples": r.samples,
             "held_out_dice": (((r.metrics or {}).get("held_out") or {}).get("candidate")
                               or {}).get("mean"),
             "created_at": r.created_at.isoformat(), "path": r.path, "update_id": r.update_id}
            for r in s.execute(q).scalars()
        ]


def rollback(db: Database, queue: JobQueue, name: str,
             generation: int | None = None) -> tuple[int, int]:
    """Serve ``generation`` (default: the parent of the serving one) again.

    Returns ``(from, to)`` generations. A running node swaps when it runs the queued
    ``model-activate`` job.

    Raises
    ------
    VersionError
        No serving version, no such generation, or its weights file is missing.
    """
    with db.session() as s:
        current = serving_version(s, name)
        if current is None:
            raise VersionError(f"no serving version of {name!r} is recorded")
        target_gen = generation if generation is not None else current.parent_generation
        if target_gen is None:
            raise VersionError(f"{name} generation {current.generation} has no parent")
        target = version_row(s, name, target_gen)
        if target is None:
            raise VersionError(f"{name} has no generation {target_gen}")
        if target.path is None or not Path(target.path).exists():
            raise VersionError(f"weights of {name} generation {target_gen} are missing")
        if target.id != current.id:
            current.state = ModelVersionState.RETIRED
            target.state = ModelVersionState.SERVING
            target.activated_at = datetime.now(UTC)
        enqueue(queue, ActivatePayload(name), session=s, unique_active=False)
        return current.generation, target.generation


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
