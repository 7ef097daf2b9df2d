"""Serving a hub generation: downloaded bytes -> model -> ModelVersion row -> hot swap.

A hub generation keeps the hub's number on the node (``ModelVersion.generation``,
origin ``hub``); local rounds are numbered from ``LOCAL_FLOOR`` up (see
``dicom_node.pipeline.versions``), so the two never collide. Weights are written with
their config embedded (``save_model``), so a restarted node serves the same version
from the table without asking the hub.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select

from dicom_node.errors import DicomNodeError
from dicom_node.learning.errors import ModelConfigError
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.weights import model_from_bytes, save_model
from dicom_node.pipeline.flow import AdaptPayload, enqueue
from dicom_node.pipeline.model_sources import ModelRegistry
from dicom_node.pipeline.versions import hub_base_generation, serving_version, version_row
from dicom_node.store.db import Database
from dicom_node.store.jobs import JobQueue
from dicom_node.store.models import ModelVersion, ModelVersionState

LOGGER = logging.getLogger(__name__)


class HubGenerationError(DicomNodeError):
    """A downloaded generation cannot serve this node's model (names, shapes, config)."""


def hub_config_for(config_json: str, current: ModelConfig, generation: int) -> ModelConfig:
    """The config a hub generation serves under: the hub's, when it describes this model,
    else the serving one; numbered with the hub generation."""
    try:
        announced = ModelConfig.from_json(config_json)
    except (ModelConfigError, ValueError, TypeError):
        announced = None
    if announced is None or announced.name != current.name:
        announced = current
    return announced.with_generation(generation)


def known_hub_generation(db: Database, name: str) -> int:
    """The newest hub generation this node has had: the one the serving version is or
    descends from, or a later one it received and rolled back (so that a rolled-back
    generation is not downloaded again); -1 when nothing serves."""
    with db.session() as s:
        row = serving_version(s, name)
        if row is None:
            return -1
        received = s.execute(select(func.max(ModelVersion.generation)).where(
            ModelVersion.name == name, ModelVersion.origin == "hub")).scalar()
        return max(hub_base_generation(s, name, row.generation),
                   -1 if received is None else int(received))


def serve_hub_generation(
    db: Database,
    models: ModelRegistry,
    name: str,
    data: bytes,
    *,
    generation: int,
    parent: int,
    config_json: str,
    models_dir: Path,
    adapt_queue: JobQueue | None = None,
) -> ModelVersion:
    """Make ``data`` (safetensors of a whole model, sha256 already checked) serve ``name``.

    With ``adapt_queue``, a ``generation-adapt`` job is queued in the same transaction
    (``pipeline.site_adaptation``: this site's fine-tune of it, or a local rollback).

    A ``torchscript:<sha256>`` model is rebuilt from the file the operator installed on
    this node (``models_dir/torchscript`` or beside the configured weights), never from
    the hub; without it the generation is refused, saying so.

    Raises
    ------
    HubGenerationError
        The tensors do not fit the model's architecture.
    """
    _, current = models.get(name)
    config = hub_config_for(config_json, current, generation)
    try:
        model, config = model_from_bytes(
            data, config, code_dirs=(models_dir, *models.code_dirs(name)))
    except DicomNodeError as exc:
        raise HubGenerationError(f"hub generation {generation} does not fit {name}: {exc}") from exc
    path = save_model(model, config, models_dir / name / f"hub-generation-{generation:05d}")
    now = datetime.now(UTC)
    with db.session() as s:
        before = serving_version(s, name)
        previous = -1 if before is None or before.generation == generation else before.generation
        for row in s.execute(select(ModelVersion).where(
                ModelVersion.name == name,
                ModelVersion.state == ModelVersionState.SERVING)).scalars():
            row.state = ModelVersionState.RETIRED
        version = version_row(s, name, generation)
        if version is None:
            version = ModelVersion(name=name, generation=generation,
                                   parent_generation=parent if parent >= 0 else None,
                                   origin="hub", samples=0, sample_ids=[], metrics={},
                                   created_at=now)
            s.add(version)
        version.path = str(path)
        version.state = ModelVersionState.SERVING
        version.activated_at = now
        if adapt_queue is not None:
            enqueue(adapt_queue, AdaptPayload(name, generation, previous), session=s)
        s.flush()
        s.expunge(version)
    models.replace(name, model, config)
    LOGGER.info("serving %s hub generation %d (parent %d)", name, generation, parent)
    return version
