"""Turnaround benchmark: last C-STORE response -> DICOM-SEG stored in Orthanc.

The end point is Orthanc's C-STORE response for the SEG: Orthanc answers Success only
once the instance is written and indexed, so that is when it is stored. The benchmark
then confirms through Orthanc's REST API that the SEG is there and references the
series; how long that polling took is printed as ``rest_seen`` outside the total.

A 128-slice 256x256 phantom CT series (site D) is sent by dcmtk storescu (TCP_NODELAY=1) to an
in-process node whose segment rule sends the SEG to a real Orthanc. Five repetitions
(fresh UIDs each); the median of each stage is printed:

    quiet      last instance received -> series complete (the configured quiet period)
    pickup     series complete -> inference job running (queue poll, model already loaded)
    volume     reading the instances and building the volume
    inference  batched 2D inference
    encode     DICOM-SEG encoding (highdicom); quality metrics follow the export
    store      SEG written durably and indexed
    export     SEG queued -> acknowledged by Orthanc (stored: the end of the total)
    rest_seen  acknowledged -> found through Orthanc's REST API (benchmark polling;
               not part of the total)

Run: ``python benchmarks/turnaround.py [--repeats 5] [--quiet 2] [--model PATH ...]``

``--model`` (repeatable) runs the same repetitions with each model file (safetensors +
JSON, e.g. a 3D starter from ``tessera model bootstrap --arch segresnet --out DIR``)
instead of the shipped 2D starter, and also scores each on held-out phantom subjects of
sites A-D (``--dice-subjects`` per site, 3D Dice per label); the models are printed side
by side at the end.
Targets (issue 4): total excluding quiet <= 10 s on 2 CPU cores, non-inference work
<= 20 % of it. Peak RSS is the benchmark process's (the node runs in-process).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import storescu, wait_for
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.config import NodeConfig, load_config
from dicom_node.demo.pacs import OrthancPacs
from dicom_node.learning.bootstrap import STARTER_DIR
from dicom_node.node import Node
from dicom_node.phantom.ct import generate_subject
from dicom_node.phantom.dicom import subject_datasets
from dicom_node.pipeline.model_sources import STARTER_MODEL
from dicom_node.store.models import OutboxItem, Segmentation, Series

SLICES = 128


def phantom_series(out: Path, rep: int) -> tuple[str, list[Path]]:
    """128 slices of a phantom subject with fresh UIDs for this repetition.

    Site D (2 mm slices) gives 150+ slices per subject; the middle 128 are sent.
    """
    datasets = subject_datasets(generate_subject("D", 0, seed=9100))
    if len(datasets) < SLICES:
        raise SystemExit(f"phantom subject has {len(datasets)} slices, fewer than {SLICES}")
    start = (len(datasets) - SLICES) // 2
    datasets = datasets[start:start + SLICES]
    series_uid, study_uid = generate_uid(), generate_uid()
    folder = out / f"rep{rep}"
    folder.mkdir(parents=True)
    paths = []
    for i, ds in enumerate(datasets):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return str(series_uid), paths


def seg_in_orthanc(pacs: OrthancPacs, series_uid: str) -> bool:
    url = f"http://127.0.0.1:{pacs.http_port}/tools/find"
    query = json.dumps({"Level": "Series", "Query": {"Modality": "SEG"}, "Expand": True})
    req = urllib.request.Request(url, data=query.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        found = json.loads(resp.read())
    for series in found:
        iid = series["Instances"][0]
        with urllib.request.urlopen(
            f"http://127.0.0.1:{pacs.http_port}/instances/{iid}/tags?simplify", timeout=10
        ) as resp:
            tags = json.loads(resp.read())
        refs = tags.get("ReferencedSeriesSequence") or []
        if any(r.get("SeriesInstanceUID") == series_uid for r in refs):
            return True
    return False


STAGES = ("quiet", "pickup", "volume", "inference", "encode", "store", "export",
          "total_excl_quiet", "rest_seen")


def node_config(work: Path, pacs: OrthancPacs, quiet: float,
                model: tuple[str, Path | None] = (STARTER_MODEL, None)) -> NodeConfig:
    """An in-process node whose segment rule runs ``model`` (name, file; None: shipped)
    and sends each SEG to ``pacs``."""
    name, path = model
    return load_config(None, env={}, overrides={
        "node.data_dir": str(work / "node"), "dicom.port": 0, "http.enabled": False,
        "models": {name: str(path)} if path is not None else None,
        "assembler.quiet_period_s": quiet, "assembler.poll_interval_s": 0.1,
        "jobs.poll_interval_s": 0.1,
        "destinations": {"pacs": {"ae_title": pacs.ae_title, "host": "127.0.0.1",
                                  "port": pacs.port}},
        "rules": [{"name": "segment", "action": "segment", "model": name,
                   "destinations": ["pacs"]}],
    })


def record_stages(node: Node, series_uid: str, last_ack: float, arrived: float,
                  stages: dict[str, list[float]], slices_per_s: list[float]) -> None:
    """One repetition's stages, from the node's own records of the series and its SEG."""
    with node.parts.db.session() as s:
        series = s.execute(select(Series).where(
            Series.series_uid == series_uid)).scalar_one()
        seg = s.execute(select(Segmentation).where(
            Segmentation.series_uid == series_uid)).scalar_one()
        sent = s.execute(select(OutboxItem).where(
            OutboxItem.sop_instance_uid == seg.seg_sop_instance_uid)).scalar_one()
        t = seg.timings
        completed = series.completed_at.timestamp()
        work_s = sum(t[f"{k}_s"] for k in ("volume", "inference", "encode", "store"))
        created = seg.created_at.timestamp()
        stages["quiet"].append(completed - series.last_received_at.timestamp())
        stages["pickup"].append(created - work_s - completed)
        for key in ("volume", "inference", "encode", "store"):
            stages[key].append(t[f"{key}_s"])
        stages["export"].append(sent.sent_at.timestamp() - created)
        stored = sent.sent_at.timestamp()
        stages["rest_seen"].append(arrived - stored)
        stages["total_excl_quiet"].append(
            stored - last_ack - (completed - series.last_received_at.timestamp()))
        slices_per_s.append(SLICES / t["inference_s"])


def repetition(node: Node, config: NodeConfig, pacs: OrthancPacs, work: Path, rep: int,
               stages: dict[str, list[float]], slices_per_s: list[float]) -> None:
    """Send a fresh series, wait for its SEG in Orthanc, record the stages."""
    series_uid, paths = phantom_series(work / "series", rep)
    storescu(node.port, config.dicom.ae_title, paths)
    last_ack = time.time()
    try:
        wait_for(lambda: seg_in_orthanc(pacs, series_uid), 300, "the SEG", interval=0.05)
    except TimeoutError:
        raise SystemExit(f"no SEG in Orthanc for repetition {rep}") from None
    record_stages(node, series_uid, last_ack, time.time(), stages, slices_per_s)
    print(f"repetition {rep + 1}: total excl. quiet "
          f"{stages['total_excl_quiet'][-1]:.2f} s", file=sys.stderr)


def report(stages: dict[str, list[float]], slices_per_s: list[float],
           args: argparse.Namespace, model: str = STARTER_MODEL) -> dict[str, float]:
    """The median of each stage against the targets."""
    med = {k: statistics.median(v) for k, v in stages.items()}
    print(f"\nTurnaround of a {SLICES}-slice 256x256 CT series with {model}, median of "
          f"{args.repeats} (quiet period {args.quiet:.1f} s):")
    for key, value in med.items():
        print(f"  {key:<18} {value:7.3f} s")
    non_inference = med["total_excl_quiet"] - med["inference"]
    print(f"  inference          {statistics.median(slices_per_s):7.1f} slices/s")
    print(f"  non-inference share {100 * non_inference / med['total_excl_quiet']:6.1f} % "
          f"(target <= 20 %)")
    print(f"  total excl. quiet   {med['total_excl_quiet']:6.2f} s (target <= 10 s)")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS            {rss_mb:6.0f} MB (node + benchmark, one process)")
    return {**med, "slices_per_s": statistics.median(slices_per_s)}


def site_dice(path: Path | None, subjects: int) -> dict[str, float]:
    """Mean 3D Dice over ``subjects`` unseen phantom subjects of each site A-D."""
    from dicom_node.learning.bootstrap import evaluate
    from dicom_node.learning.weights import load_model

    model, config = load_model(path if path is not None else STARTER_DIR / "model.safetensors")
    held = range(1000, 1000 + subjects)  # indexes no bootstrap trained on
    return {site: evaluate(model, config, site, held, seed=4242)[0]["mean"]
            for site in ("A", "B", "C", "D")}


def run_model(model: tuple[str, Path | None], args: argparse.Namespace,
              work: Path, pacs: OrthancPacs) -> dict[str, float]:
    """``work``: this model's own folder (two model files may carry the same name)."""
    config = node_config(work, pacs, args.quiet, model)
    stages: dict[str, list[float]] = {k: [] for k in STAGES}
    slices_per_s: list[float] = []
    with Node(config) as node:
        for rep in range(args.repeats):
            repetition(node, config, pacs, work, rep, stages, slices_per_s)
    return report(stages, slices_per_s, args, model[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quiet", type=float, default=2.0, help="quiet period, seconds")
    parser.add_argument("--model", type=Path, action="append", default=[],
                        help="a model file to run instead of the shipped starter "
                             "(repeatable; then the starter runs first, for comparison)")
    parser.add_argument("--dice-subjects", type=int, default=2,
                        help="with --model: held-out phantom subjects per site A-D")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="tessera-turnaround-"))
    models: list[tuple[str, Path | None]] = [(STARTER_MODEL, None)]
    models += [(_model_name(path), path) for path in args.model]
    pacs = OrthancPacs(work / "pacs")
    results: list[dict[str, float]] = []
    try:
        for i, model in enumerate(models):
            results.append(run_model(model, args, work / f"{i}-{model[0]}", pacs))
    finally:
        pacs.stop()
    if args.model:
        side_by_side(models, results, args)
    return 0


def _model_name(path: Path) -> str:
    from dicom_node.learning.weights import read_file_config

    return read_file_config(path).name


def side_by_side(models: list[tuple[str, Path | None]], results: list[dict[str, float]],
                 args: argparse.Namespace) -> None:
    """Each model's turnaround, inference and Dice at sites A-D, one row each."""
    print(f"\nSide by side (Dice: mean over labels, {args.dice_subjects} unseen subjects "
          "per site):")
    print(f"  {'model':<28} {'total s':>8} {'infer s':>8} {'A':>7} {'B':>7} {'C':>7} {'D':>7}")
    for (name, path), r in zip(models, results, strict=True):
        dice = site_dice(path, args.dice_subjects)
        label = name if path is None else f"{name} ({path.parent.name}/{path.name})"[:28]
        print(f"  {label:<28} {r['total_excl_quiet']:8.2f} {r['inference']:8.2f} "
              + " ".join(f"{dice[s]:7.4f}" for s in "ABCD"))


if __name__ == "__main__":
    raise SystemExit(main())
