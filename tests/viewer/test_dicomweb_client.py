"""dicomweb-client (PyPI) against the bridge: search, retrieve, store a correction SEG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from dicom_node.store.models import Correction, Instance, Series
from tests.corrections.helpers import radiologist_seg
from tests.node.conftest import wait_until
from tests.viewer.conftest import Segmented, json_body

PN = "00100010"
MODALITIES = "00080061"


def _uids(results: list[dict], tag: str) -> set[str]:
    return {r[tag]["Value"][0] for r in results}


def test_search_studies_series_and_instances(segmented: Segmented) -> None:
    client = segmented.bridge.client()
    study = segmented.study
    study_uid = str(study.datasets[0].StudyInstanceUID)
    found = client.search_for_studies(search_filters={"PatientName": "phantom^a*"})
    assert _uids(found, "0020000D") == {study_uid}
    assert found[0][PN]["Value"][0]["Alphabetic"] == str(study.datasets[0].PatientName)
    assert set(found[0][MODALITIES]["Value"]) == {"CT", "SEG"}  # the AI SEG is there too
    assert int(found[0]["00201208"]["Value"][0]) == len(study.datasets) + 1
    date = str(study.datasets[0].StudyDate)
    assert client.search_for_studies(search_filters={"StudyDate": f"{date}-{date}"})
    assert client.search_for_studies(search_filters={"StudyDate": "19000101-19000102"}) == []
    assert client.search_for_studies(search_filters={"PatientID": "nobody"}) == []
    assert client.search_for_studies(search_filters={"ModalitiesInStudy": "MR"}) == []
    with_desc = client.search_for_studies(fields=["StudyDescription", "00180015"])
    assert with_desc[0]["00081030"]["Value"] == [str(study.datasets[0].StudyDescription)]

    series = client.search_for_series(study_uid)
    by_modality = {s["00080060"]["Value"][0]: s for s in series}
    assert set(by_modality) == {"CT", "SEG"}
    assert by_modality["SEG"]["0020000E"]["Value"] == [segmented.ai.seg_series_uid]
    assert int(by_modality["CT"]["00201209"]["Value"][0]) == len(study.datasets)
    only_seg = client.search_for_series(search_filters={"Modality": "SEG"})
    assert _uids(only_seg, "0020000E") == {segmented.ai.seg_series_uid}

    page1 = client.search_for_instances(study_uid, study.series_uid, limit=10)
    page2 = client.search_for_instances(study_uid, study.series_uid, limit=10, offset=10)
    assert len(page1) == len(page2) == 10
    assert not _uids(page1, "00080018") & _uids(page2, "00080018")
    everything = client.search_for_instances(study_uid, study.series_uid)
    assert _uids(everything, "00080018") == {str(d.SOPInstanceUID) for d in study.datasets}
    one = str(study.datasets[5].SOPInstanceUID)
    assert _uids(client.search_for_instances(search_filters={"SOPInstanceUID": one}),
                 "00080018") == {one}


def test_retrieve_instances_metadata_and_frames(segmented: Segmented) -> None:
    client = segmented.bridge.client()
    src = segmented.study.datasets[7]
    study_uid, series_uid, sop = (str(src.StudyInstanceUID), str(src.SeriesInstanceUID),
                                  str(src.SOPInstanceUID))
    instance = client.retrieve_instance(study_uid, series_uid, sop)
    assert instance.SOPInstanceUID == sop
    assert np.array_equal(instance.pixel_array, src.pixel_array)
    assert str(instance.PatientID) == str(src.PatientID)

    series = client.retrieve_series(study_uid, series_uid)
    assert {str(d.SOPInstanceUID) for d in series} == \
        {str(d.SOPInstanceUID) for d in segmented.study.datasets}

    metadata = client.retrieve_series_metadata(study_uid, series_uid)
    assert len(metadata) == len(segmented.study.datasets)
    item = next(m for m in metadata if m["00080018"]["Value"] == [sop])
    assert item["00280010"]["Value"] == [src.Rows]
    assert "BulkDataURI" in item["7FE00010"]
    assert item["00083002"]["Value"] == ["1.2.840.10008.1.2.1"]

    frames = client.retrieve_instance_frames(study_uid, series_uid, sop, [1])
    assert frames[0] == src.PixelData

    # The AI SEG: 1-bit frames, read whole and frame by frame.
    ai = segmented.ai
    seg = client.retrieve_instance(study_uid, ai.seg_series_uid, ai.seg_sop_instance_uid)
    assert seg.Modality == "SEG"
    seg_meta = client.retrieve_instance_metadata(study_uid, ai.seg_series_uid,
                                                 ai.seg_sop_instance_uid)
    assert seg_meta["00620002"]["Value"]  # SegmentSequence
    count = int(seg.NumberOfFrames)
    got = client.retrieve_instance_frames(study_uid, ai.seg_series_uid,
                                          ai.seg_sop_instance_uid, [1, count])
    pixels = seg.pixel_array.reshape(count, seg.Rows, seg.Columns)
    for frame, index in zip(got, (0, count - 1), strict=True):
        bits = np.unpackbits(np.frombuffer(frame, np.uint8), bitorder="little")
        assert np.array_equal(bits[:seg.Rows * seg.Columns].reshape(seg.Rows, seg.Columns),
                              pixels[index])


def test_stored_seg_is_indexed_and_becomes_a_correction(
    segmented: Segmented, tmp_path: Path
) -> None:
    bridge = segmented.bridge
    path, _ = radiologist_seg(segmented.study, tmp_path / "corrected.dcm")
    seg = pydicom.dcmread(path)
    result = bridge.client().store_instances([seg])
    assert [str(i.ReferencedSOPInstanceUID) for i in result.ReferencedSOPSequence] == \
        [str(seg.SOPInstanceUID)]
    assert "FailedSOPSequence" not in result
    with bridge.node.parts.db.session() as s:
        row = s.execute(select(Instance.path, Series.series_uid).join(Series).where(
            Instance.sop_instance_uid == str(seg.SOPInstanceUID))).one()
    stored = pydicom.dcmread(bridge.node.parts.files.absolute(row.path))
    assert stored.SOPInstanceUID == seg.SOPInstanceUID
    assert row.series_uid == str(seg.SeriesInstanceUID)

    def correction() -> Correction | None:
        with bridge.node.parts.db.session() as s:
            return s.execute(select(Correction).where(
                Correction.seg_sop_instance_uid == str(seg.SOPInstanceUID))).scalar_one_or_none()

    row = wait_until(correction, timeout=120, interval=0.5, what="the correction")
    assert row.state == "recorded", row.reason
    assert row.source_series_uid == segmented.study.series_uid
    assert row.segmentation_id == segmented.ai.id
    assert set(row.dice) >= {"liver", "spleen"}

    status, _, body = bridge.request("/status.json")
    assert status == 200
    data = json_body(body)
    assert any(c["seg_series_uid"] == str(seg.SeriesInstanceUID) for c in data["corrections"])
    status, _, page = bridge.request("/status")
    html = page.decode()
    assert "<svg" in html and "open in OHIF" in html
    assert f"StudyInstanceUIDs={segmented.study.datasets[0].StudyInstanceUID}" in html


@pytest.mark.parametrize("level", ["studies", "series", "instances"])
def test_unknown_matching_key_is_a_400_with_the_reason(segmented: Segmented, level: str) -> None:
    status, _, body = segmented.bridge.request(f"/dicomweb/{level}?NoSuchAttribute=1")
    assert status == 400
    assert "NoSuchAttribute" in json_body(body)["error"]
