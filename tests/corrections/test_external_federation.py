"""A federated round of an imported MONAI 3D network between two nodes under mTLS
(issue 23): node 1 segments a study, a radiologist's SEG trains a round there, its
update of the one group ``network`` goes to a real hub in this process, which merges
it into generation 1; node 2, which never saw a correction, serves generation 1 with
exactly the hub's weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.config import load_config
from dicom_node.federation import hub_update_id
from dicom_node.node import Node
from tests.corrections.external_model import EXTERNAL_MODEL, imported_monai_model
from tests.corrections.helpers import (
    Study,
    learning_section,
    radiologist_seg,
    segment_rule,
    segmentation_of,
)
from tests.federation.conftest import certs  # noqa: F401 - pytest fixture
from tests.federation_node.conftest import (
    InProcessHub,
    assert_serves_hub_weights,
    federated_node_data,
    mtls_hub,
    node_tls,
    serving,
    settled_outbox,
)
from tests.node.conftest import storescu, wait_until, write_node_config


@pytest.fixture
def monai_hub(tmp_path: Path, certs: Any) -> Iterator[tuple[InProcessHub, Path]]:  # noqa: F811
    """A hub under mTLS, with its default gate, whose generation 0 is the imported MONAI
    network."""
    model_path = imported_monai_model(tmp_path / "import")
    with mtls_hub(tmp_path / "hub", certs, model_path) as hub:
        yield hub, model_path


def _node(tmp_path: Path, name: str, hub: InProcessHub, model_path: Path, tls: Any) -> Node:
    data = federated_node_data(tmp_path / name, model_path, hub.target, token=hub.token(),
                               tls=tls)
    data["models"] = {EXTERNAL_MODEL: str(model_path)}
    data["rules"] = [segment_rule(EXTERNAL_MODEL)]
    data["learning"] = learning_section()
    data["federation"]["model"] = EXTERNAL_MODEL
    return Node(load_config(write_node_config(tmp_path / f"{name}.toml", data), env={}))


@pytest.mark.slow
def test_a_round_of_an_imported_model_federates_to_a_second_node(
        tmp_path: Path, monai_hub: tuple[InProcessHub, Path], certs: Any) -> None:  # noqa: F811
    hub, model_path = monai_hub
    node1 = _node(tmp_path, "site1", hub, model_path, node_tls(certs, "node1")).start()
    node2 = _node(tmp_path, "site2", hub, model_path, node_tls(certs, "node2")).start()
    url1 = node1.config.node.resolved_database_url()
    url2 = node2.config.node.resolved_database_url()
    try:
        study = Study("B", 0, seed=7400, slices=24)
        assert storescu(node1.port, *study.write(tmp_path / "study")).returncode == 0
        wait_until(lambda: segmentation_of(node1, study.series_uid), timeout=120,
                   what="node 1's AI segmentation")
        seg_path, _ = radiologist_seg(study, tmp_path / "seg.dcm")
        assert storescu(node1.port, seg_path, options=("-R",)).returncode == 0

        wait_until(lambda: hub.current() >= 1, timeout=180, what="hub generation 1")
        [(update_id, state, _, error)] = settled_outbox(url1)
        assert (state, error) == ("sent", None)
        generation = hub.service.list_generations()[-1]
        assert generation.number == 1 and len(generation.update_ids) == 1
        node_id = node1.parts.federation.node_id
        assert generation.update_ids == (hub_update_id(node_id, update_id),)
        wait_until(lambda: serving(url2) == (1, "hub"), timeout=60,
                   what="node 2 to serve hub generation 1")
        config = assert_serves_hub_weights(hub, node2, EXTERNAL_MODEL)
        assert config.architecture == "monai:UNet"
    finally:
        node1.stop()
        node2.stop()
