"""OHIF's own Save, clicked in Debian's chromium, makes a correction the node trains on.

One node (learning on, OHIF served at /) segments three phantom studies; one browser
session (tests/viewer/js/ohif_save.js) then, per case, opens a study in OHIF's
segmentation mode, paints with the brush on a chosen slice and saves through the
segmentation menu (⋮ → Export → DICOM SEG → "Store Segmentation" → Save), so OHIF
itself POSTs the SEG to the node's STOW-RS:

- ``labelmap``: the shipped deploy/ohif/app-config.js (OHIF 3.13's default store:
  Label Map SEG, RLE Lossless); the node's AI SEG hydrated, its liver painted;
- ``bitmap``: the same with ``SEG_STORE_MODE = 'bitmap'`` (binary SEG, 66.4);
- ``scratch``: no AI SEG loaded: "Add segmentation", its segment renamed "liver".

Each must give a recorded correction whose changed voxels are the brush stroke on the
painted slice, with the painted label, and a training round that uses it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import select

from dicom_node.pipeline.seg_read import (
    LABEL_MAP_SEGMENTATION_STORAGE,
    SEGMENTATION_STORAGE,
    read_seg_labels,
)
from dicom_node.pipeline.segmentation import segment_specs
from dicom_node.store.models import Correction, ModelVersion, Segmentation, TrainingSample
from tests.corrections.helpers import (
    TEST_MODEL,
    Study,
    learning_section,
    segment_rule,
    stored_dataset,
    tiny_model,
)
from tests.node.conftest import wait_until
from tests.peers import require_binary
from tests.viewer.conftest import (
    ARTIFACTS,
    REPO,
    BridgeNode,
    ai_segmentation,
    chromium_path,
    ensure_ohif,
    ensure_playwright,
    start_bridge_node,
)

pytestmark = [pytest.mark.peers, pytest.mark.slow]

RLE_LOSSLESS = "1.2.840.10008.1.2.5"
APP_CONFIG = REPO / "deploy" / "ohif" / "app-config.js"
SHIPPED_MODE = "const SEG_STORE_MODE = 'labelmap';"
PAINTED = "liver"
RADIUS_MM = 6.0
DRAG_PX = 4  # the stroke runs from col - DRAG_PX to col + DRAG_PX on one row
SLICE = 20   # volume index of the painted slice (of 32)
MODEL_SEED = 1


@dataclass(frozen=True)
class Case:
    name: str
    mode: str           # SEG_STORE_MODE served to OHIF
    sop_class: str      # what OHIF must then store
    hydrate: bool       # paint on the node's AI SEG, else on a new segmentation
    seed: int


CASES = {c.name: c for c in (
    Case("labelmap", "labelmap", LABEL_MAP_SEGMENTATION_STORAGE, True, 7501),
    Case("bitmap", "bitmap", SEGMENTATION_STORAGE, True, 7502),
    Case("scratch", "labelmap", LABEL_MAP_SEGMENTATION_STORAGE, False, 7503),
)}


@dataclass
class Target:
    study: Study
    ai: Segmentation
    row: int
    col: int


@dataclass
class Saved:
    bridge: BridgeNode
    targets: dict[str, Target]
    results: dict[str, dict[str, Any]]


def _specs(bridge: BridgeNode) -> Any:
    _, config = bridge.node.parts.models.get(TEST_MODEL)
    return segment_specs(config), config.label_values


def _labels(bridge: BridgeNode, sop_uid: str, study: Study) -> np.ndarray:
    specs, _ = _specs(bridge)
    return read_seg_labels(stored_dataset(bridge.node, sop_uid), study.volume(), specs)[0]


def _stroke_distance(shape: tuple[int, int], row: int, col: int) -> np.ndarray:
    """Distance (pixels) of every pixel of a slice from the brush's path."""
    rows, cols = np.indices(shape)
    along = np.clip(cols, col - DRAG_PX, col + DRAG_PX)
    return np.hypot(rows - row, cols - along)


def _brush_target(truth: np.ndarray, ai: np.ndarray, liver: int, radius_px: float,
                  ) -> tuple[int, int]:
    """Where a radiologist would paint liver on this slice: the stroke position with
    the most true liver that the AI missed."""
    best: tuple[int, int, int] | None = None
    for row in range(40, 216, 4):
        for col in range(40, 216, 4):
            near = _stroke_distance(ai.shape, row, col) <= radius_px + 1
            score = int(((truth[near] == liver) & (ai[near] != liver)).sum())
            if best is None or score > best[0]:
                best = (score, row, col)
    assert best is not None and best[0] > 0, "no liver on the painted slice"
    return best[1], best[2]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Saved]:
    dist = ensure_ohif()
    js = ensure_playwright()
    folder = tmp_path_factory.mktemp("ohif-save")
    # Untrained weights from a fixed seed whose AI SEGs have every label: OHIF 3.13's
    # 'bitmap' Save of a segmentation with an empty segment is inconsistent (see
    # test_frames_that_name_undeclared_segments_are_refused), which is not under test.
    torch.manual_seed(MODEL_SEED)
    bridge = start_bridge_node(folder, rules=[segment_rule()],
                               models={TEST_MODEL: str(tiny_model(folder))},
                               learning=learning_section(), ohif_dir=str(dist))
    try:
        targets = _segment_studies(bridge)
        results = _save_in_ohif(bridge, targets, js, folder)
        yield Saved(bridge, targets, results)
    finally:
        bridge.node.stop()


def _segment_studies(bridge: BridgeNode) -> dict[str, Target]:
    studies = {name: Study("A", i, seed=case.seed) for i, (name, case) in
               enumerate(CASES.items())}
    for study in studies.values():
        stored = bridge.client().store_instances(study.datasets)
        assert len(stored.ReferencedSOPSequence) == len(study.datasets)
    _, label_values = _specs(bridge)
    targets = {}
    for name, study in studies.items():
        ai = wait_until(lambda s=study: ai_segmentation(bridge.node, s.series_uid),
                        timeout=180, interval=0.5, what=f"the AI segmentation ({name})")
        ai_labels = _labels(bridge, ai.seg_sop_instance_uid, study)
        empty = [k for k, v in label_values.items() if not (ai_labels == v).any()]
        assert not empty, f"precondition: the AI SEG of {name} has no {empty}"
        spacing = float(study.volume().spacing[1])
        row, col = _brush_target(study.truth_in_volume_order()[SLICE], ai_labels[SLICE],
                                 label_values[PAINTED], RADIUS_MM / spacing)
        targets[name] = Target(study, ai, row, col)
    return targets


def _save_in_ohif(bridge: BridgeNode, targets: dict[str, Target], js: Path,
                  folder: Path) -> dict[str, dict[str, Any]]:
    shipped = APP_CONFIG.read_text()
    assert SHIPPED_MODE in shipped, "app-config.js no longer states its SEG store mode"
    shots = folder / "screenshots"
    shots.mkdir()
    cases = []
    for name, case in CASES.items():
        t = targets[name]
        cases.append({
            "name": name, "studyUid": str(t.study.datasets[0].StudyInstanceUID),
            "aiSegSeriesUid": t.ai.seg_series_uid if case.hydrate else None,
            "newSegmentLabel": None if case.hydrate else PAINTED,
            "segmentLabel": PAINTED,
            "sliceSopUid": t.study.volume().sop_instance_uids[SLICE],
            "brush": {"row": t.row, "col": t.col, "radiusMm": RADIUS_MM, "dragPx": DRAG_PX},
            "appConfig": shipped.replace(SHIPPED_MODE,
                                         f"const SEG_STORE_MODE = '{case.mode}';"),
            "shotsDir": str(shots),
        })
    with tempfile.TemporaryDirectory(prefix="tessera-chromium-") as profile:
        options = {"url": bridge.url, "token": bridge.token, "chromium": chromium_path(),
                   "userDataDir": profile, "timeoutMs": 150000, "cases": cases}
        opt_file = folder / "ohif-save.json"
        opt_file.write_text(json.dumps(options))
        result = subprocess.run([require_binary("node"), str(js / "ohif_save.js"),
                                 str(opt_file)], capture_output=True, text=True,
                                timeout=900, cwd=js)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no result from the browser driver: {result.stderr[-3000:]}"
    out = json.loads(lines[-1])
    assert "fatal" not in out, out["fatal"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "ohif-save-run.json").write_text(json.dumps(out, indent=2))
    for png in shots.glob("*.png"):
        shutil.copy(png, ARTIFACTS / f"ohif-save-{png.name}")
    return dict(out["cases"])


def _correction(bridge: BridgeNode, sop_uid: str) -> Correction | None:
    with bridge.node.parts.db.session() as s:
        return s.execute(select(Correction).where(
            Correction.seg_sop_instance_uid == sop_uid)).scalar_one_or_none()


def _round_with(bridge: BridgeNode, correction_id: int) -> ModelVersion | None:
    """The model version a training round made from this correction's sample."""
    with bridge.node.parts.db.session() as s:
        sample = s.execute(select(TrainingSample).where(
            TrainingSample.correction_id == correction_id)).scalar_one_or_none()
        if sample is None:
            return None
        for version in s.execute(select(ModelVersion)).scalars():
            if sample.id in (version.sample_ids or []):
                return version
    return None


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(CASES))
def test_ohif_save_is_a_correction_where_the_brush_painted(saved: Saved, name: str) -> None:
    case, target, out = CASES[name], saved.targets[name], saved.results[name]
    bridge, study = saved.bridge, target.study
    assert "error" not in out, (out.get("error"), out["steps"])
    assert out["storeMode"] == {"labelmap": "labelmap", "bitmap": "bitmap"}[case.mode]
    assert out["dicomwebErrors"] == [], out["dicomwebErrors"]
    assert len(out["screenshots"]) == 2  # before and after the brush
    if case.hydrate:
        assert "hydrated" in out["steps"], out["steps"]
    volume = study.volume()
    assert out["paintedSop"] == volume.sop_instance_uids[SLICE]
    assert float(out["brushRadiusShown"]) == RADIUS_MM

    # OHIF's own STOW-RS: one instance of the store mode's SOP class.
    assert out["stow"]["status"] == 200, out["stow"]
    assert out["stow"]["contentType"].startswith("multipart/related")
    item = json.loads(out["stow"]["body"])["00081199"]["Value"][0]
    assert item["00081150"]["Value"] == [case.sop_class]
    sop_uid = item["00081155"]["Value"][0]
    seg = stored_dataset(bridge.node, sop_uid)
    assert seg.SOPClassUID == case.sop_class
    assert seg.file_meta.TransferSyntaxUID == RLE_LOSSLESS
    assert PAINTED in [str(s.SegmentLabel) for s in seg.SegmentSequence]

    row = wait_until(lambda: _correction(bridge, sop_uid), timeout=120, interval=0.5,
                     what=f"the correction ({name})")
    assert row.state == "recorded", row.reason
    assert row.segmentation_id == target.ai.id
    assert PAINTED in row.labels

    # Where the brush painted, checked voxel by voxel against the AI SEG.
    _, label_values = _specs(bridge)
    liver = label_values[PAINTED]
    corrected = _labels(bridge, sop_uid, study)
    ai = _labels(bridge, target.ai.seg_sop_instance_uid, study)
    radius_px = RADIUS_MM / float(volume.spacing[1])
    stroke = _stroke_distance(ai.shape[1:], target.row, target.col)
    if case.hydrate:
        changed = corrected != ai
        assert row.changed_slices == [SLICE]
        assert sorted(set(np.flatnonzero(changed.reshape(len(ai), -1).any(axis=1)))) == [SLICE]
        painted = changed[SLICE]
        assert (corrected[SLICE][painted] == liver).all(), "changed voxels not on the liver"
        expected = (stroke <= radius_px - 1) & (ai[SLICE] != liver)
    else:
        assert row.labels == [PAINTED]
        assert SLICE in row.changed_slices
        drawn = corrected == liver
        assert sorted(set(np.flatnonzero(drawn.reshape(len(ai), -1).any(axis=1)))) == [SLICE]
        painted = drawn[SLICE]
        expected = stroke <= radius_px - 1
    assert painted.any()
    assert stroke[painted].max() <= radius_px + 1.5, "voxels changed away from the stroke"
    assert painted[expected].mean() >= 0.9, "the stroke's middle was not painted"

    version = wait_until(lambda: _round_with(bridge, row.id), timeout=300, interval=1,
                         what=f"a training round with the correction ({name})")
    assert version.name == TEST_MODEL and version.generation >= 1
