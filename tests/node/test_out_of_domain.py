"""Input a model was not made for is flagged before its SEG goes out: a real head CT
(Debian's invesalius-examples) sent to the abdomen starter, next to an abdomen phantom."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from dicom_node import prometheus as metrics
from dicom_node.phantom.ct import generate_subject
from dicom_node.phantom.dicom import subject_datasets
from dicom_node.phantom.head_ct import CRANIUM, head_ct_subject
from dicom_node.pipeline.domain import check_domain
from dicom_node.pipeline.flow import InferencePayload
from dicom_node.pipeline.model_sources import STARTER_MODEL
from dicom_node.pipeline.segmentation import SegmentationJob
from dicom_node.status import node_status, render_status
from dicom_node.store.jobs import ClaimedJob
from dicom_node.store.models import Instance, OutboxItem, OutboxState, Segmentation
from tests.node.conftest import node_config_data, storescu, wait_until
from tests.node.test_segmentation import write_series
from tests.peers import require_file

VALUES = {"body": 1, "liver": 2, "spleen": 3}


def _labels(body: int, liver: int, spleen: int) -> np.ndarray:
    return np.array([1] * body + [2] * liver + [3] * spleen + [0] * 10, np.uint8)[None, None]


def test_the_check_reads_structure_fractions() -> None:
    inside = check_domain(_labels(80, 15, 5), (1.0, 1.0, 1.0), VALUES, 0.05)
    assert inside.in_domain and inside.structure_fraction == pytest.approx(0.2)
    outside = check_domain(_labels(97, 2, 1), (1.0, 1.0, 1.0), VALUES, 0.05)
    assert not outside.in_domain and "body" in (outside.reason or "")
    assert check_domain(_labels(97, 2, 1), (1.0, 1.0, 1.0), VALUES, 0.0).in_domain  # off
    assert check_domain(_labels(50, 0, 0), (1.0, 1.0, 1.0), {"brain": 1}, 0.05).in_domain
    assert not check_domain(_labels(0, 0, 0), (1.0, 1.0, 1.0), VALUES, 0.05).in_domain


def _segmentation(node: Any, series_uid: str) -> Segmentation | None:
    with node.parts.db.session() as s:
        return s.execute(select(Segmentation).where(
            Segmentation.series_uid == series_uid)).scalars().first()


@pytest.mark.slow
def test_a_head_ct_given_to_the_abdomen_model_is_marked_and_held(
    tmp_path: Path, start_node: Any, storescp_factory: Any
) -> None:
    require_file(CRANIUM)
    pacs = storescp_factory()
    data = node_config_data(tmp_path / "node", destinations={
        "pacs": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs.port}},
        rules=[{"name": "abdomen", "action": "segment", "model": STARTER_MODEL,
                "destinations": ["pacs"], "out_of_domain": "hold",
                "match": {"modality": ["CT"]}}])
    node = start_node(data)
    head = subject_datasets(head_ct_subject())
    abdomen = subject_datasets(generate_subject("A", 3, seed=7020))
    for name, datasets in (("head", head), ("abdomen", abdomen)):
        assert storescu(node.port, *write_series(datasets, tmp_path / name)).returncode == 0
    head_uid, abdomen_uid = (str(d[0].SeriesInstanceUID) for d in (head, abdomen))
    head_seg = wait_until(lambda: _segmentation(node, head_uid), timeout=180,
                          what="the head CT's segmentation")
    abdomen_seg = wait_until(lambda: _segmentation(node, abdomen_uid), timeout=180,
                             what="the abdomen's segmentation")

    assert head_seg.metrics["domain"]["in_domain"] is False
    assert abdomen_seg.metrics["domain"]["in_domain"] is True
    with node.parts.db.session() as s:
        path = s.execute(select(Instance.path).where(
            Instance.sop_instance_uid == head_seg.seg_sop_instance_uid)).scalar_one()
    stored = pydicom.dcmread(node.parts.files.absolute(path), stop_before_pixels=True)
    assert str(stored.SeriesDescription).startswith("OUT OF DOMAIN?")

    # The abdomen's SEG reaches the PACS; the head's is held back (stored, never queued).
    wait_until(lambda: _outbox_state(node, abdomen_seg.seg_sop_instance_uid)
               == OutboxState.SENT, timeout=60, what="the abdomen SEG delivered")
    assert _outbox_state(node, head_seg.seg_sop_instance_uid) is None
    assert abdomen_seg.seg_sop_instance_uid in {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in pacs.received()}

    report = node_status(node.parts.db)
    assert [e["series_uid"] for e in report["out_of_domain"]] == [head_uid]
    assert "(hold)" in report["out_of_domain"][0]["reason"]
    assert head_uid in render_status(report)
    assert b"tessera_node_segmentations_out_of_domain_total 1.0" in metrics.render(
        node.parts.db)

    # The job again (the series sent again, or a retry after a crash between the row and
    # the export): the held SEG stays held, the abdomen's is not delivered twice.
    segmenter = next(h for h in node.parts.handlers if isinstance(h, SegmentationJob))
    for series_uid in (head_uid, abdomen_uid):
        payload = InferencePayload(series_uid, "abdomen", STARTER_MODEL, ("pacs",))
        segmenter.run(ClaimedJob(0, payload.kind, payload.key, payload.to_json(), 2, 3),
                      lambda: None)
    assert _outbox_state(node, head_seg.seg_sop_instance_uid) is None
    assert _outbox_state(node, abdomen_seg.seg_sop_instance_uid) == OutboxState.SENT


def _outbox_state(node: Any, sop_uid: str) -> str | None:
    with node.parts.db.session() as s:
        return s.execute(select(OutboxItem.state).where(
            OutboxItem.sop_instance_uid == sop_uid)).scalar_one_or_none()
