"""OHIF's prebuilt viewer in Debian's chromium against the bridge.

OHIF (npm @ohif/app, pinned in deploy/ohif/fetch-ohif.sh) is served by the node at /
with deploy/ohif/app-config.js; the browser signs in at /login, opens a segmented
phantom study with a SEG and must show the image, the overlay and our segment labels
with no DICOMweb errors. Then the STOW-RS request OHIF makes when a segmentation is
saved is sent from the page, and the node records the correction.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from dicom_node.phantom.codes import CT_SEGMENTS
from dicom_node.store.models import Correction
from tests.corrections.helpers import radiologist_seg
from tests.node.conftest import wait_until
from tests.peers import require_binary
from tests.viewer.conftest import (
    ARTIFACTS,
    Segmented,
    chromium_path,
    ensure_ohif,
    ensure_playwright,
    make_segmented,
)

pytestmark = [pytest.mark.peers, pytest.mark.slow]


@pytest.fixture(scope="module")
def ohif_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Segmented]:
    dist = ensure_ohif()
    yield from make_segmented(tmp_path_factory.mktemp("ohif"), ohif_dir=str(dist))


def run_browser(options: dict, timeout: float = 240) -> dict:
    js = ensure_playwright()
    with tempfile.TemporaryDirectory(prefix="tessera-chromium-") as profile:
        options = {**options, "userDataDir": profile, "chromium": chromium_path()}
        opt_file = Path(profile).with_suffix(".json")
        opt_file.write_text(json.dumps(options))
        result = subprocess.run([require_binary("node"), str(js / "ohif_open.js"), str(opt_file)],
                                capture_output=True, text=True, timeout=timeout, cwd=js)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no result from the browser driver: {result.stderr[-3000:]}"
    out = json.loads(lines[-1])
    assert "fatal" not in out, out["fatal"]
    return out


@pytest.mark.timeout(480)
def test_ohif_shows_the_study_and_its_segmentation_then_a_saved_seg_is_recorded(
    ohif_node: Segmented, tmp_path: Path
) -> None:
    bridge, study = ohif_node.bridge, ohif_node.study
    # The phantom's ground truth as a SEG, stored with STOW-RS like any viewer would.
    gt_path, _ = radiologist_seg(study, tmp_path / "ground-truth.dcm", specs=CT_SEGMENTS,
                                 author="tessera-phantom-ground-truth")
    gt = pydicom.dcmread(gt_path)
    stored = bridge.client().store_instances([gt])
    assert len(stored.ReferencedSOPSequence) == 1
    corrected_path, _ = radiologist_seg(study, tmp_path / "saved-in-ohif.dcm")
    corrected = pydicom.dcmread(corrected_path)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "ohif-phantom-seg.png"
    shot.unlink(missing_ok=True)
    labels = [s.name for s in CT_SEGMENTS]
    out = run_browser({
        "url": bridge.url, "token": bridge.token,
        "studyUid": str(study.datasets[0].StudyInstanceUID),
        "segSeriesUid": str(gt.SeriesInstanceUID), "labels": labels,
        "screenshot": str(shot),
        "stowPart10File": str(corrected_path),
        # OHIF's first load is slow on 2 busy cores (a CI run timed out at 60 s).
        "timeoutMs": 150000,
    }, timeout=280)
    (ARTIFACTS / "ohif-run.json").write_text(json.dumps(out, indent=2))
    assert "signed in" in out["steps"], out["steps"]
    assert out["dicomwebErrors"] == [], out["dicomwebErrors"]
    assert out["failedRequests"] == [], out["failedRequests"]
    assert sorted(out["labelsFound"]) == sorted(labels), out
    data_source_errors = [e for e in out["consoleErrors"]
                          if "dicomweb" in e.lower() or "data source" in e.lower()]
    assert data_source_errors == []

    # Inside the viewport (1280x800 window, study panel left, segment panel right):
    # the CT must be drawn (bright pixels) with coloured segmentation fill over it.
    view = np.asarray(Image.open(shot).convert("RGB")).astype(int)[130:740, 300:980]
    brightest, darkest = view.max(axis=-1), view.min(axis=-1)
    assert (brightest > 40).sum() > 50_000, "no image rendered"
    assert (brightest - darkest > 60).sum() > 5_000, "no segmentation overlay rendered"

    assert out["stow"]["status"] == 200, out["stow"]
    reply = json.loads(out["stow"]["body"])
    assert reply["00081199"]["Value"][0]["00081155"]["Value"] == [str(corrected.SOPInstanceUID)]

    def correction() -> Correction | None:
        with bridge.node.parts.db.session() as s:
            return s.execute(select(Correction).where(
                Correction.seg_sop_instance_uid == str(corrected.SOPInstanceUID))
            ).scalar_one_or_none()

    row = wait_until(correction, timeout=120, interval=0.5, what="the correction")
    assert row.state == "recorded", row.reason
    assert row.segmentation_id == ohif_node.ai.id
