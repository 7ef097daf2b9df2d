"""``tessera node ...``: init, serve, status."""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dicom_node.config import EXAMPLE_CONFIG, NodeConfig, load_config
from dicom_node.errors import ConfigError
from dicom_node.node_process import prepare_process

if TYPE_CHECKING:
    from dicom_node.node import Node
    from dicom_node.store.db import Database

LOGGER = logging.getLogger(__name__)

node_app = typer.Typer(help="The hospital-side DICOM node.", no_args_is_help=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Node TOML configuration file.")
]


def configure_logging(level: str = "INFO", json_logs: bool = False) -> None:
    from federation_grpc.jsonlog import configure_logging as configure

    configure(level, json_logs, quiet=("pynetdicom", "highdicom"))


@contextmanager
def open_node_database(path: Path | None) -> Iterator[Database]:
    """The node database the configuration at ``path`` names, schema ensured; disposed
    on exit. A bad configuration exits like every other command."""
    from dicom_node.store.db import Database

    cfg = load_or_exit(path)
    db = Database(cfg.node.resolved_database_url())
    db.create_schema()
    try:
        yield db
    finally:
        db.dispose()


def load_or_exit(path: Path | None, overrides: dict[str, object] | None = None) -> NodeConfig:
    try:
        return load_config(path, overrides=overrides)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def run_until_signal(make: Callable[[], Node], announce: Callable[[Node], dict[str, object]],
                     ) -> None:
    """Start what ``make`` builds, print one JSON line, run until SIGINT/SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        built = make()
        prepare_process()  # built, not started: no work in flight yet
        node = built.start()
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    print(json.dumps(announce(node)), flush=True)
    try:
        stop.wait()
    finally:
        node.stop()


@node_app.command("init")
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the example configuration.")],
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented example configuration."""
    if path.exists() and not force:
        typer.echo(f"error: {path} exists (use --force to overwrite)", err=True)
        raise typer.Exit(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(EXAMPLE_CONFIG, encoding="utf-8")
    typer.echo(f"wrote {path}")


@node_app.command("serve")
def serve(
    ctx: typer.Context,
    config: ConfigOption = None,
    ae_title: Annotated[str | None, typer.Option(help="Override dicom.ae_title.")] = None,
    port: Annotated[int | None, typer.Option(help="Override dicom.port (0: any free).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Override node.data_dir.")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING.")] = "INFO",
    json_logs: Annotated[bool, typer.Option("--json-logs", help="One JSON object per line.")]
    = False,
) -> None:
    """Run the node until SIGINT/SIGTERM."""
    from dicom_node.node import FrontEnds, Node

    # The composition root (viewer_bridge.main) passes the HTTP front end as ctx.obj.
    front_ends = ctx.obj if isinstance(ctx.obj, FrontEnds) else FrontEnds()

    configure_logging(log_level, json_logs)
    cfg = load_or_exit(config, {"dicom.ae_title": ae_title, "dicom.port": port,
                                "node.data_dir": str(data_dir) if data_dir else None})

    def announce(node: Node) -> dict[str, object]:
        # One machine-readable line so supervisors and tests learn the bound port.
        return {"event": "listening", "ae_title": cfg.dicom.ae_title, "host": cfg.dicom.host,
                "port": node.port}

    run_until_signal(lambda: Node(cfg, http=front_ends.http), announce)


@node_app.command("worker")
def worker(
    config: ConfigOption = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING.")] = "INFO",
    json_logs: Annotated[bool, typer.Option("--json-logs", help="One JSON object per line.")]
    = False,
) -> None:
    """Run job workers (assembly, inference, export, training) without the DICOM SCP.

    Start several on several hosts against one PostgreSQL database and a shared
    ``node.data_dir``; they share one queue (claims use FOR UPDATE SKIP LOCKED).
    """
    from dicom_node.node import Node

    configure_logging(log_level, json_logs)
    cfg = load_or_exit(config)
    run_until_signal(lambda: Node(cfg, serve_dicom=False),
                     lambda _node: {"event": "worker-started", "workers": cfg.jobs.workers})


@node_app.command("status")
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Series by state, outbox by state, dead letters and refusals with reasons, and
    each receiving process's intake journal (who holds it, what it has not applied)."""
    from dicom_node.status import node_status, render_status
    from dicom_node.store.opening import journal_dir, receiver_journals
    from dicom_node.store.quarantine import Quarantine

    cfg = load_or_exit(config)
    quarantine = Quarantine(cfg.quarantine_dir, cfg.node.quarantine_max_files,
                            int(cfg.node.quarantine_max_mb * 2**20))
    journals = {0: journal_dir(cfg, 0), **receiver_journals(cfg)}
    with open_node_database(config) as db:
        report = node_status(db, quarantine=quarantine, journals=journals,
                             receivers=cfg.dicom.receivers)
    typer.echo(json.dumps(report, indent=2, default=str) if as_json else render_status(report))


@node_app.command("reprocess")
def reprocess_command(
    series: Annotated[list[str] | None, typer.Argument(
        help="Series Instance UIDs to segment again.")] = None,
    refused: Annotated[bool, typer.Option(
        "--refused", help="Every refused series (e.g. after `tessera model bootstrap "
        "--data mr` built the model their rule names).")] = False,
    config: ConfigOption = None,
) -> None:
    """Segment stored series again by the segment rules that match them (nothing is
    forwarded twice); a running node or worker picks the jobs up."""
    from dicom_node.pipeline.reprocess import reprocess
    from dicom_node.store.jobs import JobQueue

    if not series and not refused:
        typer.echo("error: name series UIDs or pass --refused", err=True)
        raise typer.Exit(2)
    cfg = load_or_exit(config)
    with open_node_database(config) as db:
        done = reprocess(db, JobQueue(db, lease_s=cfg.jobs.lease_s), cfg,
                         series_uids=series or (), refused=refused)
    typer.echo(json.dumps({"event": "reprocess", "queued": list(done.queued),
                           "skipped": [{"series_uid": u, "reason": r}
                                       for u, r in done.skipped]}))
    if series and len(done.skipped) == len(series) and not done.queued:
        raise typer.Exit(1)


@node_app.command("migrate")
def migrate(
    config: ConfigOption = None,
    revision: Annotated[str, typer.Option(help="Alembic revision to reach.")] = "head",
) -> None:
    """Bring the node database schema to ``revision`` with the Alembic scripts.

    Run it once before starting a new version of the node (or its workers) against
    PostgreSQL; ``serve``/``worker`` also create an empty schema themselves.
    """
    from dicom_node.store.db import Database
    from dicom_node.store.private import private_dir

    cfg = load_or_exit(config)
    private_dir(cfg.node.data_dir)
    db = Database(cfg.node.resolved_database_url())
    try:
        before, after = db.migrate(revision)
    finally:
        db.dispose()
    typer.echo(json.dumps({"event": "migrated", "from": before, "to": after}))
