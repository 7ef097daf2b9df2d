"""``tessera model list-versions`` and ``tessera model rollback``: versions on a node.

These read the node's index (``model_version``): what serves, its lineage (parent
generation, samples, held-out Dice), and serve an earlier generation again. A running
node follows a rollback without a restart (it runs the queued ``model-activate`` job).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dicom_node.node_cli import open_node_database

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Node TOML configuration file.")
]


def list_versions_command(
    config: ConfigOption = None,
    name: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Model versions known to the node: generation, parent, state, samples, held-out Dice."""
    from dicom_node.pipeline.versions import list_versions

    with open_node_database(config) as db:
        rows = list_versions(db, name)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no model versions recorded yet (the first training round records them)")
        return
    typer.echo(f"{'name':<24} {'gen':>4} {'parent':>6} {'state':<10} {'origin':<10} "
               f"{'samples':>7} {'held-out':>8}  created")
    for r in rows:
        held = f"{r['held_out_dice']:.3f}" if r["held_out_dice"] is not None else "-"
        parent = "-" if r["parent"] is None else str(r["parent"])
        typer.echo(f"{r['name']:<24} {r['generation']:>4} {parent:>6} {r['state']:<10} "
                   f"{r['origin']:<10} {r['samples']:>7} {held:>8}  {r['created_at'][:19]}")


def rollback_command(
    name: Annotated[str, typer.Argument(help="Model name, e.g. tessera-abdomen-ct.")],
    config: ConfigOption = None,
    generation: Annotated[
        int | None, typer.Option(help="Generation to serve (default: the serving one's parent).")
    ] = None,
) -> None:
    """Serve an earlier generation again; a running node swaps without a restart."""
    from dicom_node.pipeline.versions import VersionError, rollback
    from dicom_node.store.jobs import JobQueue

    with open_node_database(config) as db:
        try:
            before, after = rollback(db, JobQueue(db), name, generation)
        except VersionError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"{name}: generation {after} serves (was {before})")
