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
) -> None:
    """Run a node, a stand-in PACS and phantom studies end to end; print the results."""
    from rich.console import Console
    from rich.table import Table

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
