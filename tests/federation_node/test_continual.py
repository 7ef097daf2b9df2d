"""Continual classes end to end, against a real mTLS hub over gRPC.

``tessera hub add-head kidneys`` (a real CLI process on the hub's database) -> the node
serves the new generation with the head pending (seeded, not run, not in its SEG) -> a
radiologist's SEG annotating only the kidneys -> the node's round trains only
``heads.kidneys`` on the frozen encoder (encoder and old heads bit-identical) -> the hub
takes the first weights of the head and marks it trained -> the node's SEG of the next
study carries the kidney segments with their SNOMED CT codes (read back with highdicom,
checked by dciodvfy)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import torch
from sqlalchemy import select

from dicom_node.config import load_config as load_node_config
from dicom_node.learning.continual import init_head_arrays
from dicom_node.learning.model_config import ModelConfig, UNetHyperparameters, abdomen_ct_config
from dicom_node.learning.network import build_model
from dicom_node.learning.weights import arrays_from_bytes, load_model, save_model
from dicom_node.node import Node
from dicom_node.phantom.codes import CT_SEGMENTS
from dicom_node.store.models import ModelVersion, UpdateOutboxItem
from federation_grpc.hub.config import load_config as load_hub_config
from federation_grpc.hub.process import HubServer
from federation_grpc.hub.service import HubService
from tests.corrections.helpers import (
    TEST_MODEL,
    Study,
    correction_for,
    radiologist_seg,
    segmentation_of,
    stored_dataset,
)
from tests.federation.hubproc import REPO, write_config
from tests.node.conftest import storescu, wait_swapped, wait_until, write_node_config
from tests.peers import SYSTEM_PATH, require_binary, venv_tool

from .conftest import (
    federated_node_data,
    node_tls,
    outbox,
    serving,
    serving_base,
    site_checked,
)

KIDNEYS = [
    {"name": "kidney_left", "value": 4, "code": "18639004", "meaning": "Left kidney"},
    {"name": "kidney_right", "value": 5, "code": "9846003", "meaning": "Right kidney"},
]


def _liver_spleen_model(folder: Path) -> Path:
    """The tiny test model before kidneys existed: heads body, liver, spleen."""
    full = abdomen_ct_config(input_size=64, name=TEST_MODEL)
    config: ModelConfig = replace(full, labels=full.labels[:3], heads=full.heads[:3],
                                  hyperparameters=UNetHyperparameters(channels=(8, 16, 32)))
    torch.manual_seed(0)
    return save_model(build_model(config), config, folder / f"{TEST_MODEL}.safetensors")


def _tessera(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([venv_tool("tessera"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env={"COLUMNS": "300", "PATH": SYSTEM_PATH})


def _segments(ds: pydicom.Dataset) -> dict[str, str]:
    seg = hd.seg.Segmentation.from_dataset(ds)
    return {d.segment_label: d.segmented_property_type.value
            for d in (seg.get_segment_description(n) for n in seg.segment_numbers)}


def _local_version(node: Node) -> ModelVersion | None:
    with node.parts.db.session() as s:
        query = select(ModelVersion).where(ModelVersion.origin == "local")
        row = s.execute(query).scalars().first()
        if row is not None:
            s.expunge(row)
        return row


def test_add_head_then_a_kidney_annotating_node_teaches_it_and_its_seg_carries_it(
    tmp_path: Path, certs: Any
) -> None:
    storescu_ok = require_binary("/usr/bin/storescu")
    assert storescu_ok
    model_file = _liver_spleen_model(tmp_path / "model")
    toml = write_config(tmp_path / "hub.toml", tmp_path / "hub", certs)
    hub_config = load_hub_config(toml)
    service = HubService(hub_config)
    service.init_model(model_file.read_bytes(), model_file.with_suffix(".json").read_text())
    server = HubServer(hub_config, service, watch_poll_s=0.2, keepalive_s=1.0).start()
    token = service.create_enrolment_token()[0]
    data = federated_node_data(tmp_path / "site", model_file, f"127.0.0.1:{server.port}",
                               token=token, tls=node_tls(certs))
    node = Node(load_node_config(write_node_config(tmp_path / "node.toml", data), env={}))
    node.start()
    url = node.config.node.resolved_database_url()
    try:
        # -- the operator adds the head (the CLI opens the hub's database) ----------------
        added = _tessera("hub", "add-head", "kidneys", "--labels", json.dumps(KIDNEYS),
                         "--hub-config", str(toml), "--seed", "4242")
        assert added.returncode == 0, added.stdout + added.stderr
        assert service.require_current().number == 1
        wait_until(lambda: serving(url) == (1, "hub"), timeout=90, what="hub generation 1")
        wait_swapped(node, TEST_MODEL, 1)
        model, config = node.parts.models.get(TEST_MODEL)
        assert config.pending_heads == ("kidneys",)
        seeded = init_head_arrays(model, "kidneys", 4242)
        for name, value in seeded.items():
            np.testing.assert_array_equal(model.state_dict()[name].numpy(), value)
        served = {k: v.clone() for k, v in model.state_dict().items()}

        # -- pending: the AI SEG does not list the kidneys ------------------------------
        first = Study("B", 0, seed=7400)
        assert storescu(node.port, *first.write(tmp_path / "s1")).returncode == 0
        ai = wait_until(lambda: segmentation_of(node, first.series_uid, 1), timeout=120,
                        what="the AI segmentation by generation 1")
        assert set(_segments(stored_dataset(node, ai.seg_sop_instance_uid))) == {
            "body", "liver", "spleen"}

        # -- a radiologist annotates the kidneys only -------------------------------------
        truth = first.truth_in_volume_order()
        kidneys_only = np.where(np.isin(truth, (4, 5)), truth, 0).astype(np.uint8)
        specs = [s for s in CT_SEGMENTS if s.label in (4, 5)]
        seg_path, _ = radiologist_seg(first, tmp_path / "corr" / "seg.dcm", kidneys_only, specs)
        assert storescu(node.port, seg_path, options=("-R",)).returncode == 0
        sop = str(pydicom.dcmread(seg_path).SOPInstanceUID)
        correction = wait_until(lambda: correction_for(node, sop), timeout=60,
                                what="the correction")
        assert set(correction.labels) == {"kidney_left", "kidney_right"}
        wait_until(lambda: [r for r in outbox(url) if r[1] == "sent"], timeout=240,
                   what="the kidneys update delivered")

        with node.parts.db.session() as s:
            item = s.execute(select(UpdateOutboxItem)).scalars().one()
            update, meta = arrays_from_bytes(Path(item.path).read_bytes())
        assert json.loads(meta["trained_groups"]) == ["heads.kidneys"]
        assert update and all(k.startswith("heads.kidneys.") for k in update)
        local = _local_version(node)
        assert local is not None and local.state in ("serving", "retired")
        trained, local_config = load_model(local.path)
        assert local_config.pending_heads == ()
        after = trained.state_dict()
        for name, value in served.items():
            same = torch.equal(value, after[name])
            assert same != name.startswith("heads.kidneys."), name  # only the new head moved

        # -- the hub takes the head's first weights and marks it trained ----------------
        wait_until(lambda: service.require_current().number >= 2, timeout=60,
                   what="the hub to merge the kidneys update")
        current = service.require_current()
        assert json.loads(current.config_json)["added_heads"]["kidneys"]["trained"] is True
        merged = service.generation_tensors(current.number)
        for name, value in update.items():
            np.testing.assert_array_equal(merged[name], value)  # no prior: taken, not mixed
        # The node serves the generation, then its own fine-tune of it (it has trained
        # a correction): either carries the head.
        wait_until(lambda: serving_base(url) == current.number, timeout=90,
                   what=f"hub generation {current.number} at the node")
        assert node.parts.models.get(TEST_MODEL)[1].pending_heads == ()
        wait_until(lambda: site_checked(url), timeout=120, what="the site's check")

        # -- the next study's SEG carries the new segments with their codes -------------
        served_now = node.parts.models.get(TEST_MODEL)[1].generation
        second = Study("B", 1, seed=7400)
        assert storescu(node.port, *second.write(tmp_path / "s2")).returncode == 0
        ai2 = wait_until(lambda: segmentation_of(node, second.series_uid, served_now),
                         timeout=120, what="the AI segmentation with the kidneys head")
        ds = stored_dataset(node, ai2.seg_sop_instance_uid)
        assert _segments(ds) == {"body": "38266002", "liver": "10200004", "spleen": "78961009",
                                 "kidney_left": "18639004", "kidney_right": "9846003"}
        path = tmp_path / "ai2.dcm"
        ds.save_as(path, enforce_file_format=True)
        dciodvfy = require_binary("dciodvfy")
        check = subprocess.run([dciodvfy, "-new", str(path)], capture_output=True, text=True)
        errors = [line for line in check.stderr.splitlines() if line.startswith("Error")]
        assert check.returncode == 0 and not errors, check.stderr
    finally:
        node.stop()
        server.stop(grace=0.5)
        service.close()
