"""The real hub inside a benchmark's process (``HubService``: upload intake, validation,
the configured strategy, the gate), as the learning benchmarks drive it: start it on a
model, enrol the sites, upload a site's update, read the current generation's model."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import MultiHeadNetwork
from dicom_node.learning.weights import model_from_bytes, model_to_bytes
from federation_grpc.hub.config import AggregationConfig, GateConfig, HubConfig
from federation_grpc.hub.domain import UpdateHeader, UploadState
from federation_grpc.hub.service import HubService


def start_hub(folder: Path, strategy: str, buffer_size: int, model: MultiHeadNetwork,
              config: ModelConfig, evaluator: Any = None,
              aggregation: Mapping[str, float] | None = None, **gate: Any) -> HubService:
    """A hub under ``folder`` whose generation 0 is ``model``; ``aggregation`` and
    ``gate`` override the ``[aggregation]`` and ``[gate]`` defaults; ``evaluator`` scores
    candidates for the gate."""
    hub = HubService(HubConfig(
        data_dir=folder, port=0,
        aggregation=replace(AggregationConfig(), strategy=strategy, buffer_size=buffer_size,
                            **(aggregation or {})),
        gate=replace(GateConfig(), **gate)), evaluator=evaluator)
    try:
        hub.init_model(model_to_bytes(model, config), config.to_json())
    except BaseException:
        hub.close()
        raise
    return hub


def enrol(hub: HubService, site: str) -> str:
    """A node id for ``site`` (token made and spent at once)."""
    return hub.enrol(hub.create_enrolment_token()[0], f"site {site}").node_id


def upload(hub: HubService, node_id: str, payload: bytes, groups: list[str], base: int,
           num_samples: int = 1) -> str:
    """One update through the hub's upload intake; its id (fails unless received)."""
    header = UpdateHeader(update_id=str(uuid.uuid4()), base_generation=base,
                          num_samples=num_samples, trained_groups=tuple(groups),
                          local_metrics={}, total_size=len(payload),
                          sha256=hashlib.sha256(payload).hexdigest())
    session = hub.uploads.begin(node_id, header)
    session.write(payload)  # type: ignore[union-attr]
    status = session.finish()  # type: ignore[union-attr]
    if status.state != UploadState.RECEIVED:
        raise RuntimeError(f"hub did not take the update: {status.state} {status.reason}")
    return header.update_id


def current_model(hub: HubService, config: ModelConfig) -> MultiHeadNetwork:
    """The model of the hub's current generation."""
    model, _ = model_from_bytes(hub.blobs.get(hub.require_current().sha256), config)
    assert isinstance(model, MultiHeadNetwork)
    return model
