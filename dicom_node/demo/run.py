"""The demo: a node on embedded defaults, a stand-in PACS, phantom studies segmented.

Each phantom study is sent to the node by C-STORE; a segment rule runs the shipped
starter model and sends the DICOM-SEG to the PACS; the demo reads the SEG back from
the PACS and scores it against the phantom's ground truth.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from dicom_node.config import Destination, NodeConfig, load_config
from dicom_node.demo.pacs import Pacs, start_pacs
from dicom_node.dicom.scu import (
    AssociationFailed,
    OutgoingInstance,
    is_delivered,
    send_instances,
)
from dicom_node.learning.scores import dice_per_label
from dicom_node.node import Node
from dicom_node.pipeline.model_sources import STARTER_MODEL
from dicom_node.pipeline.seg_read import read_seg_labels
from dicom_node.pipeline.segmentation import segment_specs
from dicom_node.pipeline.volume import build_volume

LOGGER = logging.getLogger(__name__)


@dataclass
class StudyResult:
    site: str
    subject: int
    series_uid: str
    slices: int
    acknowledged: int
    seg_received: bool
    turnaround_s: float | None
    dice: dict[str, float] = field(default_factory=dict)

    @property
    def mean_dice(self) -> float | None:
        return float(np.mean(list(self.dice.values()))) if self.dice else None


@dataclass
class DemoReport:
    pacs: str
    node_port: int
    model: str
    studies: list[StudyResult]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for study, result in zip(out["studies"], self.studies, strict=True):
            study["mean_dice"] = result.mean_dice
        return out


def demo_config(workdir: Path, pacs: Pacs, model: str) -> NodeConfig:
    return load_config(None, env={}, overrides={
        "node.data_dir": str(workdir / "node"),
        "dicom.port": 0,
        "assembler.quiet_period_s": 1.0,
        "assembler.poll_interval_s": 0.2,
        "jobs.poll_interval_s": 0.2,
        "http.enabled": False,  # the demo uses DICOM only: no fixed port to collide on
        "destinations": {"pacs": {"ae_title": pacs.ae_title, "host": "127.0.0.1",
                                  "port": pacs.port}},
        "rules": [{"name": "segment-ct", "action": "segment", "model": model,
                   "destinations": ["pacs"], "match": {"modality": ["CT"]}}],
    })


def write_study(datasets: list[Dataset], folder: Path) -> list[OutgoingInstance]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        items.append(OutgoingInstance(str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                      str(ds.file_meta.TransferSyntaxUID), path))
    return items


def send_to_node(node: Node, items: list[OutgoingInstance], calling_ae: str = "DEMOPACS") -> int:
    """C-STORE ``items`` to the node; returns how many it acknowledged."""
    target = Destination(ae_title=node.config.dicom.ae_title, host="127.0.0.1", port=node.port)
    return send_until_acknowledged(target, calling_ae, items)


def send_until_acknowledged(destination: Destination, calling_ae: str,
                            items: list[OutgoingInstance], *, attempts: int = 2,
                            timeout_s: float = 30.0) -> int:
    """C-STORE ``items``; an association lost before every instance was answered is
    opened again for the unanswered ones, up to ``attempts`` associations in all (as a
    PACS router retries; the receiver keeps one copy of an instance sent twice). Returns
    how many were acknowledged; a refusal (a failure status) is not sent again.

    pynetdicom's requestor can lose a response to a race between its reactor thread and
    ``send_c_store`` (the reactor takes the response as an unexpected message, the
    sender waits out the DIMSE timeout): seen once on a loaded machine."""
    answered: dict[str, int] = {}

    def on_result(item: OutgoingInstance, status: int | None, _err: str | None) -> None:
        if status is not None:
            answered[item.sop_instance_uid] = status

    for attempt in range(1, attempts + 1):
        pending = [i for i in items if i.sop_instance_uid not in answered]
        try:
            send_instances(destination, calling_ae, pending, on_result, timeout_s=timeout_s)
            break
        except AssociationFailed as error:
            if attempt == attempts:
                raise
            LOGGER.warning("%s; sending the %d unanswered instances again", error,
                           len(items) - len(answered))
    return sum(is_delivered(status) for status in answered.values())


def wait_for(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return check()


def _seg_for(pacs: Pacs, series_uid: str) -> Dataset | None:
    for seg in pacs.instances("SEG"):
        refs = seg.get("ReferencedSeriesSequence") or []
        if any(str(r.SeriesInstanceUID) == series_uid for r in refs):
            return seg
    return None


def run_demo(*, subjects: int = 2, site: str = "A", seed: int = 1000,
             workdir: Path | None = None, prefer_orthanc: bool = True,
             timeout_s: float = 300.0) -> DemoReport:
    from dicom_node.phantom.ct import generate_subject
    from dicom_node.phantom.dicom import subject_datasets

    root = workdir or Path(tempfile.mkdtemp(prefix="tessera-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    pacs = start_pacs(root, prefer_orthanc)
    try:
        with Node(demo_config(root, pacs, STARTER_MODEL)) as node:
            _, mconfig = node.parts.models.get(STARTER_MODEL)
            results = []
            for index in range(subjects):
                subject = generate_subject(site, index, seed)
                datasets = subject_datasets(subject)
                series_uid = str(datasets[0].SeriesInstanceUID)
                items = write_study(datasets, root / "studies" / f"{site}-{index}")
                acked = send_to_node(node, items)
                sent_at = time.monotonic()
                found: list[Dataset] = []

                def arrived(uid: str = series_uid, box: list[Dataset] = found) -> bool:
                    seg = _seg_for(pacs, uid)
                    if seg is not None:
                        box.append(seg)
                    return seg is not None

                ok = wait_for(arrived, timeout_s, 0.5)
                result = StudyResult(site=site, subject=index, series_uid=series_uid,
                                     slices=len(datasets), acknowledged=acked, seg_received=ok,
                                     turnaround_s=round(time.monotonic() - sent_at, 2)
                                     if ok else None)
                if ok:
                    volume = build_volume(datasets)
                    labels, _ = read_seg_labels(found[0], volume, segment_specs(mconfig))
                    # subject_datasets() lists slices along the normal, as build_volume sorts
                    truth = subject.labels
                    result.dice = {k: round(v, 4) for k, v in dice_per_label(
                        labels, truth, mconfig.label_values).items()}
                results.append(result)
            return DemoReport(pacs=pacs.kind, node_port=node.port,
                              model=f"{mconfig.name} gen {mconfig.generation}", studies=results)
    finally:
        pacs.stop()
