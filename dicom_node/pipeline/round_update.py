"""What a round sends to the hub: a round trained from the hub generation itself.

A node's round may start from a local version rather than from a hub generation: an
earlier local round the hub has not replaced yet, or (``[federation] adapt``) this
site's fine-tune of the generation (``pipeline.site_adaptation``). Serving, the node
keeps that round. For the hub, the trained weights of such a round are the wrong thing
to send against the hub generation ``g`` it descends from:

* as they are, they hand the hub everything the start carried on top of ``g`` besides
  the round: earlier rounds the hub has had already and the site's fine-tune, counted
  again at every round. In ``benchmarks/federated_learning.py`` (CT, seed 0, delta
  strategy, sites adapting) every update after generation 4 lowered the hub's
  validation score from 0.86 to about 0.81 and was refused: the shared model stopped;
* the round's change alone, ``g + (trained - start)``, is tiny (the start already fits
  this site), and the shared model learned nothing: its Dice on the union of the sites'
  held-out cases stayed at 0.796 over 5 generations (the same run).

So such a round trains a second time, from ``g``, on the same new and replayed
corrections, and that is the update (FedAvg's local training: the site's data, from
the shared model). With it the shared model's union Dice rose 0.805, 0.832, 0.832,
0.846 over the first 4 generations (same run). It costs a second round of training
at a site whose start is not ``g``; a round that starts from a hub generation trains
once. An imported network (not our multi-head U-Net) sends its round as trained.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from dicom_node.learning.incremental import update_artifact
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import MultiHeadNetwork, SegmentationNetwork
from dicom_node.pipeline.versions import (
    hub_base_generation,
    is_local_generation,
    load_version,
    version_row,
)
from dicom_node.store.db import Database
from dicom_node.store.durable import write_atomic
from dicom_node.store.private import private_dir
from dicom_node.update_outbox import PAYLOAD_SHA256

LOGGER = logging.getLogger(__name__)


def hub_origin(db: Database, name: str, start_generation: int
               ) -> tuple[MultiHeadNetwork, ModelConfig] | None:
    """The hub generation a round from local version ``start_generation`` descends from,
    loaded, to train the hub's round from; None when the round starts from a hub
    generation (it is the hub's round), or when that generation cannot be had (logged:
    the round is then sent as trained)."""
    if not is_local_generation(start_generation):
        return None
    with db.session() as s:
        hub = hub_base_generation(s, name, start_generation)
        row = version_row(s, name, hub) if not is_local_generation(hub) else None
        path = row.path if row is not None else None
    if path is None:
        LOGGER.warning("%s: hub generation %d's weights not here; the update is the round "
                       "as trained from local version %d", name, hub, start_generation)
        return None
    loaded = load_version(name, hub, path)  # a failure to load is logged there
    if loaded is None:
        return None
    model, config = loaded
    return (model, config) if isinstance(model, MultiHeadNetwork) else None


def write_update(data_dir: Path, update_id: str, model: SegmentationNetwork,
                 groups: Sequence[str], metadata: Mapping[str, object]
                 ) -> tuple[Path, dict[str, str]]:
    """The update's trained groups and its metadata, durable under ``updates/``; the
    metadata returned (and beside the file) adds the file's sha256, which the upload
    declares to the hub: bytes that change on disk before they are sent are refused
    there, and the upload need not read the file twice."""
    data, meta = update_artifact(model, groups, metadata)
    meta = {**meta, PAYLOAD_SHA256: hashlib.sha256(data).hexdigest()}
    path = data_dir / "updates" / f"{update_id}.safetensors"
    private_dir(path.parent)
    write_atomic(path, data, durable=True)
    write_atomic(path.with_suffix(".json"), json.dumps(meta, indent=2).encode(),
                 durable=True)
    return path, meta
