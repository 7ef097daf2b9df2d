"""``tessera demo``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer


def demo(
    subjects: Annotated[int, typer.Option(min=1, max=20, help="Phantom studies to send.")] = 2,
    site: Annotated[str, typer.Option(help="Phantom site profile.")] = "A",
    seed: Annotated[int, typer.Option(help="Phantom seed.")] = 1000,
    work_dir: Annotated[Path | None, typer.Option(help="Keep everything here.")] = None,
    orthanc: Annotated[bool, typer.Option(help="Use Orthanc as the PACS when installed.")]
    = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    sites: Annotated[int, typer.Option(
        min=1, max=3, help="2-3: a hub and that many federated nodes learning from "
                           "corrections (loopback, no TLS); 1: the single-node demo.")] = 1,
    rounds: Annotated[int, typer.Option(
        min=1, max=10, help="Federated rounds (with --sites 2 or 3).")] = 2,
) -> None:
    """Run a node, a stand-in PACS and phantom studies end to end; print the results.

    With ``--sites 2`` or ``3``: a hub and nodes on loopback; each round every site
    segments a study, sends the ground truth back as a correction, trains, uploads;
    the hub merges new generations that every node then serves. Prints Dice per
    generation per site."""
    from rich.console import Console
    from rich.table import Table

    if sites > 1:
        _federated(sites, rounds, seed, work_dir, as_json)
        return
    from dicom_node.demo.run import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = run_demo(subjects=subjects, site=site, seed=seed, workdir=work_dir,
                      prefer_orthanc=orthanc)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    labels = list(report.studies[0].dice) if report.studies and report.studies[0].dice else []
    table = Table(title=f"Tessera demo: {report.model}, PACS {report.pacs}, "
                        f"node port {report.node_port}")
    for col in ("site", "subject", "slices", "SEG at PACS", "turnaround s", *labels,
                "mean Dice"):  # Dice columns: one per label, vs the phantom's ground truth
        table.add_column(col)
    for r in report.studies:
        mean = r.mean_dice
        table.add_row(r.site, str(r.subject), str(r.slices), "yes" if r.seg_received else "NO",
                      "timeout" if r.turnaround_s is None else f"{r.turnaround_s:.1f}",
                      *(f"{r.dice.get(lab, 0):.3f}" for lab in labels),
                      "-" if mean is None else f"{mean:.3f}")
    console = Console()
    # rich folds to 80 columns when stdout is not a terminal; keep the table readable.
    Console(width=max(console.width, 132)).print(table)
    if not all(r.seg_received for r in report.studies):
        raise typer.Exit(1)


def _federated(sites: int, rounds: int, seed: int, work_dir: Path | None, as_json: bool) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from dicom_node.demo.federated import plot_report, run_federated_demo
    from dicom_node.errors import ConfigError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = run_federated_demo(sites=sites, rounds=rounds, seed=seed, workdir=work_dir)
    except ConfigError as error:
        # One line, never folded at the terminal's width (a path can be long).
        Console(stderr=True, soft_wrap=True).print(
            f"[red]demo failed:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    table = Table(title=f"Tessera federated demo: hub + {sites} sites, mean Dice vs ground "
                        f"truth of each site's new study ({report.seconds:.0f} s)")
    table.add_column("round")
    for site in report.sites:
        table.add_column(f"site {site} gen")
        table.add_column(f"site {site} Dice")
    for rnd in sorted({r.round for r in report.results}):
        cells = [str(rnd)]
        for site in report.sites:
            r = next(x for x in report.results if x.round == rnd and x.site == site)
            mark = {"fine-tuned": "+", "local": "L"}.get(r.served, "")
            cells += [f"{r.generation}{mark}", "-" if r.mean is None else f"{r.mean:.4f}"]
        table.add_row(*cells)
    table.caption = ("gen: the hub generation that segmented the study; + the site's own "
                     "fine-tune of it, L a local round on it")
    console = Console(width=max(Console().width, 132))
    console.print(table)
    lineage = Table(title="Hub generations")
    for col in ("generation", "parent", "status", "updates", "nodes", "gate notes"):
        lineage.add_column(col)
    for g in report.generations:
        lineage.add_row(str(g["generation"]), "-" if g["parent"] < 0 else str(g["parent"]),
                        g["status"], str(g["updates"]), str(g["nodes"]), g["notes"])
    console.print(lineage)
    if report.workdir is not None:
        png = plot_report(report, report.workdir / "federated_demo.png")
        console.print(f"plot: {png}" if png else "plot skipped: pip install 'tessera[bench]'")
    if any(r.generation < 0 for r in report.results):
        raise typer.Exit(1)
