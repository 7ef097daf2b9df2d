"""The MR model next to the CT one: built on the node from Debian's mricron-data
(``tessera model bootstrap --data mr``), never shipped; until it is built, MR series
are refused with a reason that names that command."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from dicom_node.config import EXAMPLE_CONFIG, load_config
from dicom_node.learning import bootstrap_data
from dicom_node.learning.bootstrap import collect_samples
from dicom_node.learning.bootstrap_data import HEAD_MR_MODEL, head_mr_config
from dicom_node.learning.network import build_model
from dicom_node.learning.weights import save_model
from dicom_node.phantom import mr_atlas
from dicom_node.phantom.dicom import subject_datasets
from dicom_node.pipeline.model_sources import ModelNotBuilt, ModelRegistry
from dicom_node.status import node_status, render_status
from dicom_node.store.models import Segmentation, Series, SeriesState
from tests.node.conftest import node_config_data, storescu, tessera, wait_until
from tests.node.test_segmentation import write_series
from tests.peers import require_file
from viewer_bridge.main import app

COMMAND = "tessera model bootstrap --data mr"


def test_init_writes_a_segment_rule_per_modality(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(EXAMPLE_CONFIG)
    rules = {r.name: r for r in load_config(path, env={}).rules}
    assert {(r.match.modality, r.model) for r in rules.values() if r.model} == {
        (("CT",), "tessera-abdomen-ct"), (("MR",), HEAD_MR_MODEL)}
    assert COMMAND in EXAMPLE_CONFIG


def test_the_registry_names_the_command_until_the_model_is_built(tmp_path: Path) -> None:
    registry = ModelRegistry({}, tmp_path / "models")
    with pytest.raises(ModelNotBuilt, match=f"`{COMMAND} --config"):
        registry.get(HEAD_MR_MODEL)
    config = head_mr_config(input_size=32)
    save_model(build_model(config), config, tmp_path / "models" / HEAD_MR_MODEL /
               "model.safetensors")
    _, loaded = registry.get(HEAD_MR_MODEL)
    assert loaded.name == HEAD_MR_MODEL and loaded.preprocessing.modality.value == "MR"


def test_versions_start_from_the_built_file(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(EXAMPLE_CONFIG.replace('"var/node"', f'"{tmp_path / "var"}"'))
    cfg = load_config(path, env={})
    registry = ModelRegistry(dict(cfg.models), cfg.built_models_dir)
    with pytest.raises(ModelNotBuilt):
        registry.source(HEAD_MR_MODEL)
    built = cfg.built_models_dir / HEAD_MR_MODEL / "model.safetensors"
    config = head_mr_config(input_size=32)
    save_model(build_model(config), config, built)
    assert registry.source(HEAD_MR_MODEL) == built
    assert registry.origin(HEAD_MR_MODEL) == "built"


def test_mr_samples_keep_every_slice_that_shows_the_brain() -> None:
    require_file(mr_atlas.TEMPLATES / "aal.nii.gz")
    config = head_mr_config(input_size=32)
    data = bootstrap_data.source("mr")
    samples = collect_samples(config, "B", [0], seed=3, data=data)
    subject = data.subject("B", 0, 3)
    brain = int(sum(subject.labels[k].any() for k in range(subject.labels.shape[0])))
    assert brain <= len(samples) < subject.labels.shape[0]
    assert sum(int(s.labels.any()) for s in samples) == brain


def test_bootstrap_refuses_unknown_data_and_a_missing_atlas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["model", "bootstrap", "--data", "pet", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown --data 'pet'" in bad.output
    site = runner.invoke(app, ["model", "bootstrap", "--data", "mr", "--site", "Z",
                               "--out", str(tmp_path)])
    assert site.exit_code == 1 and "unknown phantom site 'Z'" in site.output
    monkeypatch.setattr(mr_atlas, "TEMPLATES", tmp_path / "nothing")
    mr_atlas.load_atlas.cache_clear()
    try:
        missing = runner.invoke(app, ["model", "bootstrap", "--data", "mr", "--subjects", "1",
                                      "--out", str(tmp_path / "m")])
    finally:
        mr_atlas.load_atlas.cache_clear()
    assert missing.exit_code == 1, missing.output
    assert "mricron-data" in missing.output and not (tmp_path / "m").exists()


def test_reprocess_names_what_it_cannot_queue(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(EXAMPLE_CONFIG.replace('"var/node"', f'"{tmp_path / "var"}"'))
    runner = CliRunner()
    nothing = runner.invoke(app, ["node", "reprocess", "--config", str(path)])
    assert nothing.exit_code == 2 and "--refused" in nothing.output
    unknown = runner.invoke(app, ["node", "reprocess", "1.2.3.4", "--config", str(path)])
    assert unknown.exit_code == 1
    assert json.loads(unknown.stdout)["skipped"] == [
        {"series_uid": "1.2.3.4", "reason": "no such series"}]
    none_refused = runner.invoke(app, ["node", "reprocess", "--refused", "--config", str(path)])
    assert none_refused.exit_code == 0 and json.loads(none_refused.stdout)["queued"] == []


def _series(node: Any, series_uid: str) -> Series | None:
    with node.parts.db.session() as s:
        return s.execute(select(Series).where(Series.series_uid == series_uid)
                         ).scalar_one_or_none()


def _segmentation(node: Any, series_uid: str) -> Segmentation | None:
    with node.parts.db.session() as s:
        return s.execute(select(Segmentation).where(
            Segmentation.series_uid == series_uid)).scalars().first()


@pytest.mark.slow
def test_mr_series_are_refused_until_the_model_is_built_then_segmented(
    tmp_path: Path, start_node: Any, storescp_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    require_file(mr_atlas.TEMPLATES / "aal.nii.gz")
    pacs = storescp_factory()
    data = node_config_data(tmp_path / "node", destinations={
        "pacs": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs.port}},
        rules=[{"name": "head-mr", "action": "segment", "model": HEAD_MR_MODEL,
                "destinations": ["pacs"], "match": {"modality": ["MR"]}}])
    with caplog.at_level(logging.WARNING, logger="dicom_node.node"):
        node = start_node(data)  # starts: the missing model is a warning, not an error
    assert any(COMMAND in r.getMessage() for r in caplog.records)
    config_path = tmp_path / "node-0.toml"  # where start_node wrote it

    first = subject_datasets(mr_atlas.generate_subject("B", 0, seed=11))
    first_uid = str(first[0].SeriesInstanceUID)
    assert storescu(node.port, *write_series(first, tmp_path / "first")).returncode == 0
    refused = wait_until(lambda: (s := _series(node, first_uid)) is not None
                         and s.state == SeriesState.REFUSED and s, timeout=120,
                         what="the MR series refused")
    assert COMMAND in (refused.state_reason or "") and "head-mr" in refused.state_reason
    assert COMMAND in render_status(node_status(node.parts.db))

    # Built by the documented command (a tiny budget: this checks the path, not Dice).
    built = tessera("model", "bootstrap", "--data", "mr", "--config", str(config_path),
                    "--subjects", "1", "--held-out", "1", "--time-budget", "3",
                    "--epochs", "1", "--input-size", "64", timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    weights = tmp_path / "node" / "models" / HEAD_MR_MODEL / "model.safetensors"
    assert weights.is_file() and "held-out Dice" in built.stdout

    # The refused series is segmented again on request; nothing was lost.
    again = tessera("node", "reprocess", "--refused", "--config", str(config_path))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["queued"] == [first_uid]
    first_seg = wait_until(lambda: _segmentation(node, first_uid), timeout=180,
                           what="the refused MR series segmented after reprocess")
    assert first_seg.model_name == HEAD_MR_MODEL

    second = subject_datasets(mr_atlas.generate_subject("B", 1, seed=11))
    second_uid = str(second[0].SeriesInstanceUID)
    assert storescu(node.port, *write_series(second, tmp_path / "second")).returncode == 0
    seg = wait_until(lambda: _segmentation(node, second_uid), timeout=180,
                     what="the MR series segmented")
    assert seg.model_name == HEAD_MR_MODEL
    received = wait_until(lambda: [d for d in (pydicom.dcmread(p) for p in pacs.received())
                                   if d.SOPInstanceUID == seg.seg_sop_instance_uid],
                          timeout=60, what="the MR SEG at the PACS")
    labels = [str(item.SegmentLabel) for item in received[0].SegmentSequence]
    assert labels == ["cerebrum_left", "cerebrum_right", "cerebellum", "deep_grey"]
    assert np.asarray(received[0].pixel_array).shape[-2:] == (
        int(second[0].Rows), int(second[0].Columns))
