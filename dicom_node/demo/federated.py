"""``tessera demo --sites N``: a hub and N nodes on loopback learning together.

Each round, every site receives one phantom study of its own profile (noise, contrast,
field of view differ per site); the node segments it with the generation it serves,
the demo scores that SEG against the phantom's ground truth, then sends the ground
truth back as a radiologist's corrected SEG. The correction trains a local update,
the node uploads it, the hub merges it into a new generation, and every node serves
that generation before the next round. The hub runs without TLS on loopback (the
demo only; tests use mutual TLS).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import select

from dicom_node.config import load_config
from dicom_node.demo.run import send_to_node, wait_for, write_study
from dicom_node.errors import ConfigError
from dicom_node.learning.bootstrap import STARTER_DIR
from dicom_node.learning.scores import dice_per_label
from dicom_node.node import Node
from dicom_node.pipeline.hub_generations import known_hub_generation
from dicom_node.pipeline.model_sources import STARTER_MODEL
from dicom_node.pipeline.seg import SegAlgorithm, SegAlgorithmType, build_seg
from dicom_node.pipeline.seg_read import read_seg_labels
from dicom_node.pipeline.segmentation import segment_specs
from dicom_node.pipeline.site_adaptation import check_pending
from dicom_node.pipeline.versions import hub_base_generation
from dicom_node.pipeline.volume import build_volume
from dicom_node.store.models import (
    Instance,
    ModelVersion,
    OutboxState,
    Segmentation,
    UpdateOutboxItem,
)

LOGGER = logging.getLogger(__name__)

SITE_PROFILES = ("A", "B", "C")


@dataclass
class SiteRound:
    site: str
    round: int
    generation: int  # the hub generation that segmented the study, or its site fine-tune
    dice: dict[str, float] = field(default_factory=dict)
    served: str = "hub"  # "hub": as received; "fine-tuned": the site's fine-tune of it;
    #                      "local": a local round on it (its update not merged yet)

    @property
    def mean(self) -> float | None:
        return sum(self.dice.values()) / len(self.dice) if self.dice else None


@dataclass
class FederatedReport:
    sites: list[str]
    results: list[SiteRound]
    generations: list[dict[str, Any]]
    seconds: float
    workdir: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"sites": self.sites, "seconds": round(self.seconds, 1),
                "generations": self.generations,
                "results": [{"site": r.site, "round": r.round, "generation": r.generation,
                             "served": r.served, "dice": r.dice, "mean_dice": r.mean}
                            for r in self.results]}


def plot_report(report: FederatedReport, path: Path) -> Path | None:
    """Mean Dice of each site's new study per round (the generation it was segmented
    with, + for the site's fine-tune); None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for site in report.sites:
        rows = sorted((r for r in report.results if r.site == site and r.mean is not None),
                      key=lambda r: r.round)
        ax.plot([r.round for r in rows], [r.mean or 0.0 for r in rows], "o-", label=f"site {site}")
        for r in rows:
            mark = {"fine-tuned": "+", "local": "L"}.get(r.served, "")
            ax.annotate(f"{r.generation}{mark}", (r.round, r.mean or 0.0), fontsize=7,
                        textcoords="offset points", xytext=(0, 5), ha="center")
    ax.set_xticks(sorted({r.round for r in report.results}))
    ax.set_xlabel("round (label: hub generation that segmented it; + site fine-tune)")
    ax.set_ylabel("mean Dice vs ground truth")
    ax.set_title(f"Tessera federated demo: {len(report.sites)} sites")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _start_hub(root: Path) -> tuple[Any, Any]:
    from federation_grpc.hub.config import HubConfig
    from federation_grpc.hub.process import HubServer
    from federation_grpc.hub.service import HubService

    service = HubService(HubConfig(data_dir=root / "hub", port=0, max_workers=16))
    service.init_model((STARTER_DIR / "model.safetensors").read_bytes(),
                       (STARTER_DIR / "model.json").read_text())
    server = HubServer(service.config, service, insecure_loopback=True, watch_poll_s=0.2,
                       keepalive_s=5.0).start()
    return service, server


def _node(root: Path, site: str, hub_port: int, token: str, budget_s: float) -> Node:
    config = load_config(None, env={}, overrides={
        "node.data_dir": str(root / f"site-{site}"),
        "dicom.port": 0,
        "assembler.quiet_period_s": 1.0,
        "assembler.poll_interval_s": 0.2,
        "jobs.poll_interval_s": 0.2,
        "jobs.workers": 1,
        "http.enabled": False,  # the demo uses DICOM only: no fixed port to collide on
        "rules": [{"name": "segment-ct", "action": "segment", "model": STARTER_MODEL,
                   "destinations": [], "match": {"modality": ["CT"]}}],
        "learning": {"round": {"epochs": 2, "time_budget_s": budget_s}, "threads": 1,
                     "validation_every": 0, "neighbour_slices": 1},
        "federation": {"enabled": True, "hub": f"127.0.0.1:{hub_port}",
                       "insecure_loopback": True, "enrolment_token": token,
                       "display_name": f"site {site}", "model": STARTER_MODEL,
                       "upload_interval_s": 0.5, "upload_backoff_max_s": 2.0,
                       "metrics_interval_s": 2.0, "evaluation_interval_s": 0.5,
                       # each site serves its own short fine-tune of every generation
                       "adapt_epochs": 2, "adapt_time_budget_s": budget_s},
    })
    return Node(config).start()


def _segmentation(node: Node, series_uid: str) -> Segmentation | None:
    with node.parts.db.session() as s:
        return s.execute(select(Segmentation).where(
            Segmentation.series_uid == series_uid)).scalars().first()


def _sent_updates(node: Node) -> int:
    with node.parts.db.session() as s:
        return len(list(s.execute(select(UpdateOutboxItem.id).where(
            UpdateOutboxItem.state == OutboxState.SENT)).scalars()))


def _serves(node: Node, generation: int) -> bool:
    """The node has received ``generation`` and settled what it serves from it (the
    generation, its own fine-tune of it, or the version before on a local rollback)."""
    with node.parts.db.session() as s:
        checking = check_pending(s, STARTER_MODEL)
    return not checking and known_hub_generation(node.parts.db, STARTER_MODEL) >= generation


def _served(node: Node, version: int) -> tuple[int, str]:
    """The hub generation ``version`` is or descends from, and how."""
    with node.parts.db.session() as s:
        base = hub_base_generation(s, STARTER_MODEL, version)
        origin = s.execute(select(ModelVersion.origin).where(
            ModelVersion.name == STARTER_MODEL, ModelVersion.generation == version)).scalar()
    return base, ("hub" if version == base else
                  "fine-tuned" if origin == "adapted" else "local")


def run_federated_demo(*, sites: int = 3, rounds: int = 2, seed: int = 2000,
                       workdir: Path | None = None, budget_s: float = 8.0,
                       timeout_s: float = 180.0) -> FederatedReport:
    """Run ``rounds`` of study -> SEG -> correction -> update -> generation at each site,
    then one last round of studies scored with the final generation."""
    from dicom_node.phantom.ct import generate_subject
    from dicom_node.phantom.dicom import subject_datasets

    started = time.monotonic()
    names = list(SITE_PROFILES[:sites])
    root = workdir or Path(tempfile.mkdtemp(prefix="tessera-fed-demo-"))
    if (root / "hub").exists():
        raise ConfigError(f"{root} holds an earlier federated demo (its hub/); "
                          "give --work-dir an empty or new folder")
    root.mkdir(parents=True, exist_ok=True)
    service, server = _start_hub(root)
    nodes: dict[str, Node] = {}
    results: list[SiteRound] = []
    try:
        for site in names:
            token, _ = service.create_enrolment_token(0, f"demo site {site}")
            nodes[site] = _node(root, site, server.port, token, budget_s)
        for rnd in range(rounds + 1):
            learn = rnd < rounds
            expected = service.require_current().number
            for site, node in nodes.items():
                results.append(_one_study(node, site, rnd, seed, root, learn, timeout_s,
                                          generate_subject, subject_datasets))
            if not learn:
                break
            # Every site's update reached the hub; wait for the merges and the swap.
            wait_for(partial(_delivered, list(nodes.values()), rnd + 1), timeout_s, 0.5)
            wait_for(partial(_decided, service, len(nodes) * (rnd + 1)), 60, 0.5)
            current = int(service.require_current().number)
            if current == expected:
                LOGGER.warning("round %d: the hub made no new generation", rnd)
            wait_for(partial(_swapped, list(nodes.values()), current), 60, 0.5)
            for site, node in nodes.items():
                if not _serves(node, current):
                    LOGGER.warning("site %s has not settled on generation %d", site, current)
        generations = [{"generation": g.number, "parent": g.parent, "status": g.status,
                        "updates": len(g.update_ids), "nodes": len(set(g.node_ids)),
                        "notes": g.notes} for g in service.list_generations()]
        return FederatedReport(names, results, generations, time.monotonic() - started, root)
    finally:
        for node in nodes.values():
            node.stop()
        server.stop(grace=1)
        service.close()


def _delivered(nodes: list[Node], wanted: int) -> bool:
    return all(_sent_updates(n) >= wanted for n in nodes)


def _decided(service: Any, wanted: int) -> bool:
    return _merged(service) >= wanted


def _swapped(nodes: list[Node], generation: int) -> bool:
    return all(_serves(n, generation) for n in nodes)


def _merged(service: Any) -> int:
    """Updates the hub has decided on: merged into the current generation's lineage, or
    refused (a candidate waiting for federated evaluation is neither yet)."""
    from federation_grpc.hub.generations import UNPUBLISHED

    merged = sum(len(g.update_ids) for g in service.list_generations()
                 if g.status not in UNPUBLISHED)
    return merged + len(service.list_rejections(1000))


def _one_study(node: Node, site: str, rnd: int, seed: int, root: Path, learn: bool,
               timeout_s: float, generate_subject: Any, subject_datasets: Any) -> SiteRound:
    subject = generate_subject(site, rnd, seed)
    datasets = subject_datasets(subject)
    series_uid = str(datasets[0].SeriesInstanceUID)
    send_to_node(node, write_study(datasets, root / "studies" / f"{site}-{rnd}"))
    found: list[Segmentation] = []

    def segmented() -> bool:
        # Scored once the SEG covers every slice sent: on a loaded machine a pause in the
        # sending can complete the series early, and the node segments it again.
        row = _segmentation(node, series_uid)
        if row is None or (row.metrics or {}).get("source_instances") != len(datasets):
            return False
        found.append(row)
        return True

    if not wait_for(segmented, timeout_s, 0.5):
        LOGGER.error("site %s round %d: no segmentation within %.0f s", site, rnd, timeout_s)
        return SiteRound(site, rnd, -1)
    row = found[0]
    _, mconfig = node.parts.models.get(STARTER_MODEL)
    with node.parts.db.session() as s:
        rel = s.execute(select(Instance.path).where(
            Instance.sop_instance_uid == row.seg_sop_instance_uid)).scalar_one()
    volume = build_volume(datasets)
    specs = segment_specs(mconfig)
    labels, _ = read_seg_labels(dcmread(node.parts.files.absolute(rel)), volume, specs)
    dice = {k: round(v, 4) for k, v in
            dice_per_label(labels, subject.labels, mconfig.label_values).items()}
    generation, served = _served(node, row.generation)
    result = SiteRound(site, rnd, generation, dice, served)
    if learn:
        # The radiologist's corrected SEG is the ground truth (another author, MANUAL).
        seg = build_seg(volume, subject.labels, specs,
                        SegAlgorithm("Demo Radiologist", 0, SegAlgorithmType.MANUAL),
                        manufacturer="DemoViewer", device_serial_number="viewer-1",
                        series_description="Corrected segmentation")
        path = root / "corrections" / f"{site}-{rnd}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        seg.save_as(path)
        send_to_node(node, write_study([dcmread(path)], path.parent / f"{site}-{rnd}"),
                     calling_ae="DEMOVIEWER")
    return result
