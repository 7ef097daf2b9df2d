"""The hub generation an update's round is trained again from (pipeline.round_update):
found through the local lineage; when its weights are missing or do not load the round
is sent as trained, and the reason is logged once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dicom_node.pipeline.round_update import hub_origin
from dicom_node.pipeline.versions import LOCAL_FLOOR
from dicom_node.store.db import Database
from dicom_node.store.models import ModelVersion
from tests.federation_node.conftest import TEST_MODEL

LOCAL = LOCAL_FLOOR + 2


def lineage(tmp_path: Path, hub_path: str | None) -> Database:
    """Hub generation 3, local version LOCAL_FLOOR+1 from it, LOCAL from that one."""
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    db.create_schema()
    with db.session() as s:
        s.add_all([
            ModelVersion(name=TEST_MODEL, generation=3, parent_generation=2, origin="hub",
                         path=hub_path, state="retired"),
            ModelVersion(name=TEST_MODEL, generation=LOCAL_FLOOR + 1, parent_generation=3,
                         origin="local", path=None, state="retired"),
            ModelVersion(name=TEST_MODEL, generation=LOCAL, parent_generation=LOCAL_FLOOR + 1,
                         origin="local", path=None, state="serving"),
        ])
        s.commit()
    return db


def test_the_round_descends_from_the_hub_generation_through_the_local_lineage(
    tmp_path: Path, model_file: Path,
) -> None:
    db = lineage(tmp_path, str(model_file))
    loaded = hub_origin(db, TEST_MODEL, LOCAL)
    assert loaded is not None and loaded[1].name == TEST_MODEL
    assert hub_origin(db, TEST_MODEL, 3) is None, "a round from a hub generation is the hub's"


@pytest.mark.parametrize("weights", ["missing", "garbage"])
def test_hub_weights_that_are_not_here_or_do_not_load_are_logged_once(
    tmp_path: Path, weights: str, caplog: pytest.LogCaptureFixture,
) -> None:
    path = None
    if weights == "garbage":
        garbage = tmp_path / "gen3.safetensors"
        garbage.write_bytes(b"not safetensors at all")
        path = str(garbage)
    db = lineage(tmp_path, path)
    with caplog.at_level(logging.WARNING):
        assert hub_origin(db, TEST_MODEL, LOCAL) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert ("not here" in warnings[0]) == (weights == "missing"), warnings
