"""The demo: a node on embedded defaults, a stand-in PACS, phantom studies sent."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset

from dicom_node.config import NodeConfig, load_config
from dicom_node.demo.pacs import Pacs, start_pacs
from dicom_node.dicom.scu import OutgoingInstance, send_instances
from dicom_node.node import Node

LOGGER = logging.getLogger(__name__)


@dataclass
class StudyResult:
    site: str
    subject: int
    series_uid: str
    instances: int
    delivered: int
    turnaround_s: float | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoReport:
    pacs: str
    node_port: int
    studies: list[StudyResult]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def demo_config(workdir: Path, pacs: Pacs, rules: list[dict[str, Any]]) -> NodeConfig:
    return load_config(None, env={}, overrides={
        "node.data_dir": str(workdir / "node"),
        "dicom.port": 0,
        "assembler.quiet_period_s": 1.0,
        "assembler.poll_interval_s": 0.2,
        "jobs.poll_interval_s": 0.2,
        "destinations": {"pacs": {"ae_title": pacs.ae_title, "host": "127.0.0.1",
                                  "port": pacs.port}},
        "rules": rules,
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
    from dicom_node.config import Destination
    from dicom_node.dicom.scu import is_delivered

    acked = 0

    def on_result(_item: OutgoingInstance, status: int | None, _err: str | None) -> None:
        nonlocal acked
        acked += is_delivered(status)

    target = Destination(ae_title=node.config.dicom.ae_title, host="127.0.0.1", port=node.port)
    send_instances(target, calling_ae, items, on_result)
    return acked


def wait_for(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return check()


def run_demo(*, subjects: int = 2, site: str = "A", seed: int = 0, workdir: Path | None = None,
             prefer_orthanc: bool = True, timeout_s: float = 120.0) -> DemoReport:
    from dicom_node.phantom.ct import generate_subject
    from dicom_node.phantom.dicom import subject_datasets

    root = workdir or Path(tempfile.mkdtemp(prefix="tessera-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    pacs = start_pacs(root, prefer_orthanc)
    try:
        rules = [{"name": "forward-ct", "action": "forward", "destinations": ["pacs"],
                  "match": {"modality": ["CT"]}}]
        with Node(demo_config(root, pacs, rules)) as node:
            results = []
            for index in range(subjects):
                subject = generate_subject(site, index, seed)
                datasets = subject_datasets(subject)
                series_uid = str(datasets[0].SeriesInstanceUID)
                items = write_study(datasets, root / "studies" / f"{site}-{index}")
                acked = send_to_node(node, items)
                sent_at = time.monotonic()

                def delivered(uid: str = series_uid) -> int:
                    return sum(1 for ds in pacs.instances("CT")
                               if str(ds.SeriesInstanceUID) == uid)

                ok = wait_for(lambda n=len(items): delivered() >= n, timeout_s, 0.5)
                results.append(StudyResult(
                    site=site, subject=index, series_uid=series_uid, instances=acked,
                    delivered=delivered(),
                    turnaround_s=round(time.monotonic() - sent_at, 2) if ok else None))
            return DemoReport(pacs=pacs.kind, node_port=node.port, studies=results)
    finally:
        pacs.stop()
