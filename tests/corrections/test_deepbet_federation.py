"""A correction to a real pretrained model federates to a second node (issue 23, item 3).

deepbet's TorchScript 3D U-Net (PyPI, MIT; brain extraction from T1 MR) is imported on
two nodes, each installing the script locally by its sha256; the hub under mTLS starts
from its weights. Node 1 segments the Colin27 T1 (Debian mricron-data, a DICOM MR
series); a radiologist's SEG, the brain mask of the AAL atlas (which has no brainstem),
comes back by C-STORE and trains a round (one step on the whole 224-cube, about 10 s on
one core); its update of the one group ``network`` goes to the hub, which merges it
into generation 1. Node 2, which never saw a correction and got only weights from the
hub, serves generation 1 with exactly the hub's weights, and its SEG of the same series
agrees with the AAL brain better than generation 0's did at node 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicom_node.config import load_config
from dicom_node.learning.model_import import import_torchscript
from dicom_node.learning.scores import dice_per_label
from dicom_node.node import Node
from dicom_node.phantom.dicom import subject_datasets
from dicom_node.phantom.mr_atlas import generate_subject
from dicom_node.pipeline.seg import SegAlgorithm, SegAlgorithmType, build_seg
from dicom_node.pipeline.seg_read import read_seg_labels
from dicom_node.pipeline.segmentation import segment_specs
from dicom_node.pipeline.volume import Volume, build_volume
from tests.corrections.helpers import (
    learning_section,
    segment_rule,
    segmentation_of,
    stored_dataset,
    versions,
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
from tests.node.test_byom_deepbet import DEEPBET, deepbet_model
from tests.node.test_segmentation import write_series

MODEL = "deepbet-brain"
# One Adam step at the node's learning rate on the whole volume: the smallest round.
ROUND = {"epochs": 1, "batch_size": 1, "time_budget_s": 60}


def install_deepbet(models: Path) -> Path:
    """deepbet imported into ``models`` as an operator does on each node: the script at
    ``models/torchscript/<sha256>.pt``, its weights in ``models/deepbet-brain``."""
    return import_torchscript(deepbet_model(), DEEPBET, models, name=MODEL).path


@pytest.fixture
def deepbet_hub(tmp_path: Path, certs: Any) -> Iterator[InProcessHub]:  # noqa: F811
    """A hub under mTLS, with its default gate, whose generation 0 is deepbet's weights
    (the hub never holds the script)."""
    with mtls_hub(tmp_path / "hub", certs, install_deepbet(tmp_path / "import")) as hub:
        yield hub


def _node(tmp_path: Path, name: str, hub: InProcessHub, tls: Any) -> Node:
    model_path = install_deepbet(tmp_path / name / "models")
    data = federated_node_data(tmp_path / name, model_path, hub.target, token=hub.token(),
                               tls=tls)
    data["models"] = {MODEL: str(model_path)}
    data["rules"] = [segment_rule(MODEL, modality=["MR"])]
    data["learning"] = learning_section(round=ROUND)
    data["federation"]["model"] = MODEL
    return Node(load_config(write_node_config(tmp_path / f"{name}.toml", data), env={}))


def _brain_of(node: Node, series_uid: str, generation: int, volume: Volume) -> np.ndarray:
    """The brain mask of the node's SEG of ``series_uid`` by ``generation``."""
    seg_row = wait_until(lambda: segmentation_of(node, series_uid, generation),
                         timeout=120, what=f"a segmentation by generation {generation}")
    config = node.parts.models.get(MODEL)[1]
    seg = stored_dataset(node, seg_row.seg_sop_instance_uid)
    return read_seg_labels(seg, volume, segment_specs(config))[0]


def _corrected_seg(node: Node, volume: Volume, brain: np.ndarray, path: Path) -> Path:
    """A radiologist's MANUAL SEG of ``brain`` from another vendor's viewer."""
    specs = segment_specs(node.parts.models.get(MODEL)[1])
    seg = build_seg(volume, brain, specs, SegAlgorithm("Reader", 0, SegAlgorithmType.MANUAL),
                    manufacturer="ViewerCo", device_serial_number="viewer-7",
                    series_description="Corrected brain")
    seg.save_as(path)
    return path


@pytest.mark.slow
def test_a_correction_to_deepbet_federates_to_a_second_node_that_serves_it(
        tmp_path: Path, deepbet_hub: InProcessHub, certs: Any) -> None:  # noqa: F811
    hub = deepbet_hub
    node1 = _node(tmp_path, "site1", hub, node_tls(certs, "node1")).start()
    node2 = _node(tmp_path, "site2", hub, node_tls(certs, "node2")).start()
    url1 = node1.config.node.resolved_database_url()
    url2 = node2.config.node.resolved_database_url()
    try:
        subject = generate_subject("A", 0, seed=7101)
        datasets = subject_datasets(subject)
        series = write_series(datasets, tmp_path / "series")
        volume = build_volume(datasets)
        order = {str(ds.SOPInstanceUID): k for k, ds in enumerate(datasets)}
        aal = (subject.labels > 0).astype(np.uint8)[[order[u] for u in volume.sop_instance_uids]]
        series_uid = str(datasets[0].SeriesInstanceUID)

        assert storescu(node1.port, *series).returncode == 0
        before = _brain_of(node1, series_uid, 0, volume)
        seg_path = _corrected_seg(node1, volume, aal, tmp_path / "seg.dcm")
        assert storescu(node1.port, seg_path, options=("-R",)).returncode == 0

        wait_until(lambda: hub.current() >= 1, timeout=180, what="hub generation 1")
        [version] = [v for v in versions(node1) if v.origin == "local"]
        assert version.metrics["trained_groups"] == ["network"]
        training = version.metrics["training"]
        assert training["volumes"] == 1 and training["steps"] >= 1, training
        [(_, state, _, error)] = settled_outbox(url1)
        assert (state, error) == ("sent", None)
        wait_until(lambda: serving(url2) == (1, "hub"), timeout=60,
                   what="node 2 to serve hub generation 1")

        config = assert_serves_hub_weights(hub, node2, MODEL)
        assert config.architecture.startswith("torchscript:")

        # node 2 segments the same series with generation 1: closer to the correction
        assert storescu(node2.port, *series).returncode == 0
        after = _brain_of(node2, series_uid, 1, volume)
        dice = {gen: dice_per_label(mask, aal, {"brain": 1})["brain"]
                for gen, mask in ((0, before), (1, after))}
        print(f"deepbet vs AAL brain: gen 0 (node 1) {dice[0]:.4f}, gen 1 (node 2) "
              f"{dice[1]:.4f}; round {training['seconds']} s, {training['steps']} step(s)")
        assert dice[1] > dice[0], dice
    finally:
        node1.stop()
        node2.stop()
