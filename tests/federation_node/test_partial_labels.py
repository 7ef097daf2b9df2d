"""Partial labels end to end: two nodes, one annotating the liver and one the spleen,
a real mTLS hub. Each receives a study, segments it, gets a radiologist's SEG holding
every organ, keeps only its own label, trains, uploads; the hub's generation takes
``heads.liver`` from the first node alone, ``heads.spleen`` from the second alone and
the encoder from both. A node declaring a label its models do not have does not start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load
from sqlalchemy import select

from dicom_node.config import load_config
from dicom_node.errors import ConfigError
from dicom_node.federation import hub_update_id
from dicom_node.learning.weights import arrays_from_bytes
from dicom_node.node import Node
from dicom_node.store.models import TrainingSample, UpdateOutboxItem
from federation_grpc.hub import strategies as agg
from federation_grpc.hub.parameters import group_of
from tests.corrections.helpers import Study, correction_for, send_corrected_study
from tests.node.conftest import wait_until, write_node_config

from .conftest import federated_node_data, model_json, node_tls


def test_a_label_no_served_model_has_stops_the_node_at_start(
    tmp_path: Path, model_file: Path
) -> None:
    data = federated_node_data(tmp_path / "site", model_file, "127.0.0.1:1", insecure=True)
    data["learning"]["annotated_labels"] = ["liver", "pancreas"]
    config = load_config(write_node_config(tmp_path / "node.toml", data), env={})
    with pytest.raises(ConfigError, match=r"learning\.annotated_labels: 'pancreas' is not a "
                                          r"label of any model this node serves"):
        Node(config)


@pytest.mark.slow
@pytest.mark.peers
def test_liver_site_and_spleen_site_build_one_model_head_by_head(
    tmp_path: Path, certs: Any, model_file: Path
) -> None:
    from federation_grpc.hub.config import HubConfig, TlsConfig
    from federation_grpc.hub.process import HubServer
    from federation_grpc.hub.service import HubService

    config = HubConfig(data_dir=tmp_path / "hub", port=0, max_workers=16,
                       tls=TlsConfig(certs["ca"].cert, certs["hub"].cert, certs["hub"].key))
    hub = HubService(config, strategy=agg.FedAvg(round_size=2))  # one round of two
    hub.init_model(model_file.read_bytes(), model_json(model_file))
    server = HubServer(config, hub, watch_poll_s=0.2, keepalive_s=1.0).start()
    base = load(hub.blobs.get(hub.generation(0).sha256))
    sites = {"A": "liver", "B": "spleen"}
    nodes: dict[str, Node] = {}
    try:
        for site, label in sites.items():
            token = hub.create_enrolment_token()[0]
            data = federated_node_data(tmp_path / f"site-{site}", model_file,
                                       f"127.0.0.1:{server.port}", token=token,
                                       tls=node_tls(certs), display_name=f"site {site}")
            data["learning"]["annotated_labels"] = [label]
            path = write_node_config(tmp_path / f"{site}.toml", data)
            nodes[site] = Node(load_config(path, env={})).start()
        for i, (site, node) in enumerate(nodes.items()):
            _correct_one_study(node, Study(site, i, seed=7700), tmp_path / site)
        wait_until(lambda: (hub.current_number() or 0) >= 1, timeout=240,
                   what="the hub's generation from both sites")
        generation = hub.generation(1)
        merged = load(hub.blobs.get(generation.sha256))
        updates = {site: _sent_update(node) for site, node in nodes.items()}
    finally:
        for node in nodes.values():
            node.stop()
        server.stop(grace=0.5)
        hub.close()

    for site, label in sites.items():
        arrays, meta = updates[site]
        assert meta["trained_groups"] == f'["encoder", "heads.{label}"]'
        assert {group_of(name) for name in arrays} == {"encoder", f"heads.{label}"}
        # The head comes from its one trainer, untouched by the other site.
        for name in (n for n in merged if group_of(n) == f"heads.{label}"):
            np.testing.assert_array_equal(merged[name], arrays[name])
    for name in (n for n in merged if group_of(n) in ("heads.body", "heads.kidneys")):
        np.testing.assert_array_equal(merged[name], base[name])  # nobody trained them
    a, b = updates["A"][0], updates["B"][0]
    na, nb = (int(updates[s][1]["num_samples"]) for s in "AB")
    for name in (n for n in merged if group_of(n) == "encoder"):
        np.testing.assert_allclose(merged[name], (na * a[name] + nb * b[name]) / (na + nb),
                                   rtol=1e-5, atol=1e-6)
    assert set(generation.update_ids) == {
        hub_update_id(nodes[s].parts.federation.node_id, updates[s][1]["update_id"])
        for s in sites}


def _correct_one_study(node: Node, study: Study, folder: Path) -> None:
    """Study in, AI SEG out, the radiologist's SEG (every organ drawn) back in."""
    seg_path = send_corrected_study(node, study, folder)
    import pydicom

    uid = str(pydicom.dcmread(seg_path, stop_before_pixels=True).SOPInstanceUID)
    correction = wait_until(lambda: correction_for(node, uid), timeout=60, what="correction")
    label = node.config.learning.annotated_labels[0]
    assert correction.state == "recorded", correction.reason
    assert "spleen" in correction.labels and "liver" in correction.labels  # all drawn
    with node.parts.db.session() as s:
        sample = s.execute(select(TrainingSample)).scalar_one()
        assert sample.annotated == [label]  # ... only its own label kept


def _sent_update(node: Node) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    def sent() -> UpdateOutboxItem | None:
        with node.parts.db.session() as s:
            return s.execute(select(UpdateOutboxItem).where(
                UpdateOutboxItem.state == "sent")).scalars().first()

    row = wait_until(sent, timeout=60, what="the update delivered")
    return arrays_from_bytes(Path(row.path).read_bytes())
