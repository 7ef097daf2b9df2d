"""``tessera model ...``: bootstrap the starter model, list model versions in a directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dicom_node.learning import model_import
from dicom_node.learning.bootstrap import (
    MONAI_HEADS_ARCH,
    STARTER_DIR,
    TWO_D_ARCHES,
    BootstrapPlan,
    BootstrapResult,
    bootstrap,
)
from dicom_node.learning.bootstrap_data import SOURCES, source
from dicom_node.learning.errors import LearningError
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.training import TrainingProgress
from dicom_node.learning.weights import read_file_config

LOGGER = logging.getLogger(__name__)

model_app = typer.Typer(
    help="Segmentation models: train the starter model, list model versions.",
    no_args_is_help=True,
)


def _default_out(data: str, config: Path | None) -> Path:
    """The shipped starter's folder for ``ct``; the node's built-models folder
    (``<data_dir>/models/<name>``, where the node looks) for models built on site."""
    if data == "ct":
        return STARTER_DIR
    from dicom_node.node_cli import load_or_exit

    return load_or_exit(config).built_models_dir / source(data).model_name


@model_app.command("bootstrap")
def bootstrap_command(
    data: Annotated[str, typer.Option(
        help="Phantom source: ct (abdomen, the shipped starter) or mr (head, Colin27 + AAL "
             "from Debian mricron-data; built on each node, never shipped).")] = "ct",
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="Node configuration: with --data mr and no --out, the model "
        "goes to <node.data_dir>/models/tessera-head-mr, where the node finds it.")] = None,
    site: Annotated[str, typer.Option(help="Phantom site to train on.")] = "A",
    subjects: Annotated[int, typer.Option(min=1, help="Training subjects (indexes 0..N-1).")] = 16,
    held_out: Annotated[
        int, typer.Option(min=1, help="Held-out subjects scored after training.")
    ] = 3,
    seed: Annotated[int, typer.Option(help="Phantom and training seed.")] = 0,
    out: Annotated[Path | None, typer.Option(
        help="Directory for model.safetensors/.json (default: see --data/--config).")] = None,
    time_budget: Annotated[
        float, typer.Option(min=1.0, help="Training time budget, seconds (generating the "
                            "subjects and scoring add ~1 min for mr on 2 CPU cores).")
    ] = 420.0,
    epochs: Annotated[
        int, typer.Option(min=1, help="Epochs at most (the budget may stop earlier).")
    ] = 12,
    input_size: Annotated[int, typer.Option(help="In-plane size the network sees.")] = 128,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
    arch: Annotated[str, typer.Option(
        help="unet2d-monai: the starter's heads on a 2D MONAI UNet encoder (the shipped "
             "starter); unet2d: our own multi-head 2D U-Net (earlier starters); segresnet "
             "or dynunet: a 3D MONAI network for --data ct, trained on whole volumes at "
             "4 mm; unet3d-monai: the starter's heads on a 3D MONAI UNet encoder, likewise "
             "(3D needs --out; serve it through [models]).")] = MONAI_HEADS_ARCH,
) -> None:
    """Train a starter model from phantom subjects and print held-out Dice per label.

    ``--data mr`` builds the MR head model a node needs for its MR rule (about 9
    minutes on 2 CPU cores with the defaults)."""
    console = Console()
    if data not in SOURCES:
        console.print(f"[red]bootstrap failed:[/red] unknown --data {escape(data)!r}; "
                      f"known: {', '.join(SOURCES)}")
        raise typer.Exit(2)
    if arch not in TWO_D_ARCHES and out is None:
        console.print(f"[red]bootstrap failed:[/red] --arch {escape(arch)} needs --out (the "
                      "shipped starter and the MR model are 2D)")
        raise typer.Exit(2)
    out = out if out is not None else _default_out(data, config)
    plan = BootstrapPlan(
        data=data,
        arch=arch,
        site=site,
        subjects=subjects,
        held_out=held_out,
        seed=seed,
        time_budget_s=time_budget,
        epochs=epochs,
        input_size=input_size,
        device=device,
    )
    result = _train_with_progress(plan, out, console, time_budget)
    _print_result(console, result, f"held-out Dice, {data} site {site}, {held_out} subjects")


def _train_with_progress(plan: BootstrapPlan, out: Path, console: Console,
                         time_budget: float) -> BootstrapResult:
    """Run the bootstrap under a progress bar; a learning error exits with status 1."""
    columns = (
        TextColumn("[bold]training"),
        BarColumn(),
        TextColumn("step {task.fields[step]}"),
        TextColumn("epoch {task.fields[epoch]}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("train", total=1.0, step=0, epoch=0, loss=float("nan"))

        def on_progress(p: TrainingProgress) -> None:
            # the budget or the step count, whichever ends training first
            done = max(p.step / p.total_steps, p.elapsed_s / time_budget)
            bar.update(task, completed=min(done, 1.0), step=p.step, epoch=p.epoch, loss=p.loss)

        try:
            result = bootstrap(plan, out, progress=on_progress, status=console.log)
        except LearningError as exc:
            console.print(f"[red]bootstrap failed:[/red] {exc}")
            raise typer.Exit(1) from exc
        bar.update(task, completed=1.0)
    return result


def _print_result(console: Console, result: BootstrapResult, title: str) -> None:
    """Held-out Dice per label as a table, then the training summary."""
    table = Table(title=title)
    table.add_column("label")
    table.add_column("Dice", justify="right")
    for name, value in result.held_out_dice.items():
        style = "bold" if name == "mean" else ""
        table.add_row(name, f"{value:.4f}", style=style)
    console.print(table)
    report = result.report
    console.print(
        f"{report.steps} steps, {report.epochs_completed} full epochs on {report.samples} "
        f"{'volumes' if result.config.spatial_dims == 3 else 'slices'} in "
        f"{report.seconds:.0f} s; total {result.seconds:.0f} s; saved {result.path}"
    )


@model_app.command("list")
def list_command(
    directory: Annotated[
        Path, typer.Argument(help="Directory holding *.safetensors.")
    ] = STARTER_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """List model versions (name, generation, heads) found under a directory."""
    found: list[tuple[Path, ModelConfig]] = []
    for path in sorted(directory.glob("**/*.safetensors")):
        try:
            found.append((path, read_file_config(path)))
        except LearningError as exc:
            LOGGER.warning("skipping %s: %s", path, exc)
    found.sort(key=lambda pc: (pc[1].name, pc[1].generation))
    if as_json:
        rows = [
            {
                "name": config.name,
                "generation": config.generation,
                "architecture": config.architecture,
                "heads": {h.name: list(h.labels) for h in config.heads},
                "input_size": config.preprocessing.input_size,
                "modality": config.preprocessing.modality.value,
                "size_bytes": path.stat().st_size,
                "path": str(path),
            }
            for path, config in found
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    if not found:
        typer.echo(f"no models under {directory}")
        return
    table = Table(title=f"models in {directory}")
    for col in ("name", "generation", "heads", "modality", "size", "path"):
        table.add_column(col, overflow="fold")
    for path, config in found:
        heads = ", ".join(f"{h.name}[{'+'.join(h.labels)}]" for h in config.heads)
        pp = config.preprocessing
        table.add_row(
            config.name,
            str(config.generation),
            escape(heads),
            f"{pp.modality.value} " + ("3D" if config.spatial_dims == 3
                                       else f"{pp.input_size}px"),
            f"{path.stat().st_size / 1e6:.1f} MB",
            str(path),
        )
    Console().print(table)


@model_app.command("import")
def import_command(
    source: Annotated[Path, typer.Argument(
        help="A MONAI bundle directory, or a TorchScript file (then --labels is required).")],
    out: Annotated[Path, typer.Option(
        help="Models directory: writes <out>/<name>/model.safetensors (and, for "
             "TorchScript, <out>/torchscript/<sha256>.pt).")] = Path("models"),
    name: Annotated[str | None, typer.Option(help="Model name (default: from the source).")
                    ] = None,
    labels: Annotated[Path | None, typer.Option(
        help="JSON: labels by output channel ({\"1\": \"brain\"} or {\"1\": {name, code, "
             "meaning}}); for TorchScript also spatial_dims, in_channels, output, modality, "
             "preprocessing.")] = None,
) -> None:
    """Import a model a hospital already uses (MONAI bundle or TorchScript) as a Tessera
    model; nothing is written unless every check passes."""
    console = Console()
    try:
        described = json.loads(labels.read_text()) if labels is not None else None
        if source.is_dir():
            overrides = described.get("labels", described) if described else None
            result = model_import.import_bundle(source, out, name=name, labels=overrides)
        elif described is None:
            raise model_import.ModelImportError(
                "a TorchScript file needs --labels (its JSON description)")
        else:
            result = model_import.import_torchscript(source, described, out, name=name)
    except (LearningError, OSError, json.JSONDecodeError) as exc:
        console.print(f"[red]import failed:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    config = result.config
    console.print(f"imported {escape(config.name)} ({escape(config.architecture)}): labels "
                  f"{', '.join(lab.name for lab in config.labels)}; saved {result.path}")
    console.print(f'route to it with model = "{escape(config.name)}" and add to [models]: '
                  f'{escape(config.name)} = "{result.path}"')


# Node-side model versions (learning from corrections), in their own module.
from dicom_node.learning import versions_cli  # noqa: E402

model_app.command("list-versions")(versions_cli.list_versions_command)
model_app.command("rollback")(versions_cli.rollback_command)
