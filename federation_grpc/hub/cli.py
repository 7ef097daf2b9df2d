"""``tessera hub ...``: serve the hub and administer it (nodes, generations, rejections).

Admin commands open the hub's database directly (same config file as ``serve``); a
running hub notices promotions and rollbacks within its watch poll interval.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from federation_grpc.errors import FederationError
from federation_grpc.hub import heads_cli, quality_cli
from federation_grpc.hub.cli_common import (
    DEFAULT_CONFIG,
    ConfigOption,
    config_at,
    fail,
    open_service,
    out,
)
from federation_grpc.hub.config import EXAMPLE_CONFIG
from federation_grpc.hub.domain import SITE_CHECK_RECORD

LOGGER = logging.getLogger(__name__)

hub_app = typer.Typer(
    help="The federation hub: serve, enrol nodes, manage generations.", no_args_is_help=True
)


@hub_app.command()
def serve(
    config: ConfigOption = DEFAULT_CONFIG,
    insecure_loopback: Annotated[
        bool, typer.Option(help="Serve without TLS; refused unless bound to loopback.")
    ] = False,
    port: Annotated[int | None, typer.Option(help="Override the configured port (0: any).")] = None,
    json_logs: Annotated[bool, typer.Option("--json-logs", help="One JSON object per line.")]
    = False,
) -> None:
    """Run the hub until SIGTERM/SIGINT."""
    from dataclasses import replace

    from federation_grpc.hub.heap import bound_heap
    from federation_grpc.hub.process import HubServer
    from federation_grpc.hub.prometheus import MetricsServer
    from federation_grpc.jsonlog import configure_logging

    bound_heap()  # memory bounded by the chunk, not the number of streams
    configure_logging(os.environ.get("TESSERA_LOG_LEVEL", "INFO"), json_logs)
    settings = config_at(config)
    if port is not None:
        settings = replace(settings, port=port)
    try:
        server = HubServer(settings, insecure_loopback=insecure_loopback).start()
    except FederationError as error:
        fail(error)
    metrics = None
    if settings.metrics.enabled:
        metrics = MetricsServer(server.service.store, settings.metrics.host,
                                settings.metrics.port).start()
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    # Tests and scripts read the bound port from this line (and the metrics port next).
    print(f"hub listening on {settings.host}:{server.port}", flush=True)
    if metrics is not None:
        print(f"hub metrics on {metrics.host}:{metrics.port}", flush=True)
    done.wait()
    if metrics is not None:
        metrics.stop()
    server.stop(grace=5)


@hub_app.command()
def migrate(
    config: ConfigOption = DEFAULT_CONFIG,
    revision: Annotated[str, typer.Option(help="Alembic revision to reach.")] = "head",
) -> None:
    """Bring the hub database schema to ``revision`` with the Alembic scripts."""
    import json

    from sqlalchemy import create_engine

    from federation_grpc.hub.private import prepare_sqlite_file, private_dir
    from federation_grpc.hub.store import MIGRATIONS
    from federation_grpc.schema import migrate as run_migrations

    settings = config_at(config)
    private_dir(settings.data_dir)
    prepare_sqlite_file(settings.resolved_database_url)
    engine = create_engine(settings.resolved_database_url)
    try:
        before, after = run_migrations(engine, MIGRATIONS, revision)
    finally:
        engine.dispose()
    print(json.dumps({"event": "migrated", "from": before, "to": after}))


@hub_app.command()
def init(
    path: Annotated[
        Path, typer.Argument(help="Where to write the example config.")
    ] = DEFAULT_CONFIG,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented example hub configuration."""
    if path.exists() and not force:
        out().print(f"[red]{path} exists[/red]; use --force to overwrite")
        raise typer.Exit(1)
    path.write_text(EXAMPLE_CONFIG)
    out().print(f"wrote {path}")


@hub_app.command("init-model")
def init_model(
    weights: Annotated[Path, typer.Option(help="Generation 0 weights (.safetensors).")],
    model_config: Annotated[
        Path, typer.Option("--config", help="Model JSON config (architecture, heads, labels).")
    ],
    hub_config: Annotated[
        Path, typer.Option("--hub-config", envvar="TESSERA_HUB_CONFIG", help="Hub TOML file.")
    ] = DEFAULT_CONFIG,
) -> None:
    """Store the starter model as generation 0."""
    service = open_service(hub_config)
    try:
        view = service.init_model(weights, model_config.read_text())
    except FederationError as error:
        fail(error)
    finally:
        service.close()
    out().print(f"generation {view.number} stored, sha256 {view.sha256}")


@hub_app.command()
def enrol(
    config: ConfigOption = DEFAULT_CONFIG,
    ttl: Annotated[int, typer.Option(help="Seconds until the token expires (0: config).")] = 0,
    note: Annotated[str, typer.Option(help="Who the token is for (shown to operators).")] = "",
) -> None:
    """Print a one-time enrolment token for a new node."""
    service = open_service(config)
    try:
        token, expires = service.create_enrolment_token(ttl, note)
    finally:
        service.close()
    print(token)
    Console(stderr=True).print(f"valid until {expires.isoformat()}", style="dim")


@hub_app.command("admin-token")
def admin_token() -> None:
    """Print a new admin token and the sha256 to put in [hub] admin_token_sha256."""
    from federation_grpc.hub.nodes import hash_token

    token = secrets.token_urlsafe(32)
    print(token)
    print(f'admin_token_sha256 = "{hash_token(token)}"')


@hub_app.command()
def nodes(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """List enrolled nodes."""
    service = open_service(config)
    try:
        from federation_grpc.hub.partial_labels import describe_heads, head_labels

        current = service.current_generation()
        labels = head_labels(current.config_json) if current is not None else {}
        table = Table("node", "name", "enrolled", "last seen", "updates", "heads (labels)",
                      "certificate", "evaluates", "revoked")
        for n in service.list_nodes():
            table.add_row(
                n.node_id,
                n.display_name,
                n.enrolled_at.isoformat(timespec="seconds"),
                n.last_seen.isoformat(timespec="seconds") if n.last_seen else "-",
                str(n.updates),
                describe_heads(n.trained_heads, labels) or "-",
                n.cert_sha256[:16] or "-",
                n.evaluator_seen.isoformat(timespec="seconds") if n.evaluator_seen else "-",
                "yes" if n.revoked else "",
            )
        out().print(table)
    finally:
        service.close()


@hub_app.command()
def revoke(node_id: str, config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Revoke a node: its token stops working at once."""
    service = open_service(config)
    try:
        service.revoke_node(node_id)
    except FederationError as error:
        fail(error)
    finally:
        service.close()
    out().print(f"node {node_id} revoked")


@hub_app.command()
def rebind(
    node_id: str,
    cert: Annotated[
        Path, typer.Option(help="The node's new client certificate (PEM), e.g. a renewed one.")
    ],
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Bind a node's token to a new client certificate; the old one stops working."""
    from federation_grpc.hub.admission import certificate_sha256

    try:
        fingerprint = certificate_sha256(cert.read_bytes())
    except (OSError, ValueError) as error:
        out().print(f"[red]cannot read a certificate from {cert}:[/red] {error}")
        raise typer.Exit(2) from error
    service = open_service(config)
    try:
        service.rebind_node(node_id, fingerprint)
    except FederationError as error:
        fail(error)
    finally:
        service.close()
    out().print(f"node {node_id} bound to certificate sha256 {fingerprint}")


@hub_app.command()
def models(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """List generations with their lineage (parent, updates, nodes)."""
    service = open_service(config)
    try:
        table = Table("gen", "parent", "status", "strategy", "score", "updates", "nodes", "sha256",
                      "notes")
        for g in service.list_generations():
            table.add_row(
                f"{g.number}{' *' if g.current else ''}",
                "-" if g.parent < 0 else str(g.parent),
                g.status,
                g.strategy,
                "-" if g.validation_score is None else f"{g.validation_score:.4f}",
                str(len(g.update_ids)),
                ", ".join(g.node_ids),
                g.sha256[:12],
                g.notes,
            )
        out().print(table)
    finally:
        service.close()


@hub_app.command()
def promote(generation: int, config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Make a generation the current one."""
    service = open_service(config)
    try:
        view = service.promote(generation)
    except FederationError as error:
        fail(error)
    finally:
        service.close()
    out().print(f"generation {view.number} is current")


@hub_app.command()
def rollback(
    config: ConfigOption = DEFAULT_CONFIG,
    to: Annotated[int, typer.Option(help="Generation to return to (default: parent).")] = -1,
) -> None:
    """Return to an earlier generation; nodes watching switch to it."""
    service = open_service(config)
    try:
        view = service.rollback(to)
    except FederationError as error:
        fail(error)
    finally:
        service.close()
    out().print(f"rolled back; generation {view.number} is current")


@hub_app.command()
def rejections(
    config: ConfigOption = DEFAULT_CONFIG,
    limit: Annotated[int, typer.Option(help="Most recent N.")] = 50,
) -> None:
    """List refused updates and candidates with the reasons."""
    service = open_service(config)
    try:
        table = Table("when", "update", "node", "stage", "candidate", "reasons")
        for r in service.list_rejections(limit):
            table.add_row(
                r.created_at.isoformat(timespec="seconds"),
                r.update_id,
                r.node_id,
                r.stage,
                "-" if r.candidate_generation < 0 else str(r.candidate_generation),
                "; ".join(r.reasons),
            )
        out().print(table)
    finally:
        service.close()


@hub_app.command("site-checks")
def site_checks(
    config: ConfigOption = DEFAULT_CONFIG,
    rolled_back: Annotated[
        bool, typer.Option("--rolled-back", help="Only generations a site rolled back.")
    ] = False,
) -> None:
    """What each node made of each generation: held-out Dice before, as received and
    after its own fine-tune, and whether it rolled the generation back."""
    service = open_service(config)
    try:
        table = Table("gen", "node", "cases", "before", "received", "fine-tuned", "serves")
        for node_id, record in service.metric_records(SITE_CHECK_RECORD):
            v = record.values
            back = v.get("rolled_back", 0.0) >= 0.5
            if rolled_back and not back:
                continue
            serves = ("ROLLED BACK" if back else
                      "fine-tuned" if v.get("adapted", 0.0) >= 0.5 else "as received")
            table.add_row(str(record.generation), node_id,
                          str(int(v.get("cases", 0))), _figure(v.get("held_out.previous")),
                          _figure(v.get("held_out.generation")),
                          _figure(v.get("held_out.adapted")), serves)
        out().print(table)
    finally:
        service.close()


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@hub_app.command()
def certs(
    out_dir: Annotated[Path, typer.Argument(help="Directory for the PEM files.")],
    node: Annotated[list[str] | None, typer.Option(help="Node certificate name (repeat).")] = None,
    host: Annotated[
        list[str] | None, typer.Option(help="Hub DNS name or IP for its certificate (repeat).")
    ] = None,
    dicom_server: Annotated[
        str | None,
        typer.Option(help="Also issue a server certificate NAME for a node's DICOM TLS."),
    ] = None,
    dicom_host: Annotated[
        list[str] | None,
        typer.Option(help="DNS name or IP for the DICOM TLS certificate (repeat)."),
    ] = None,
) -> None:
    """Make a CA, a hub server certificate and node client certificates."""
    from federation_grpc.hub.certs import issue, make_certs

    made = make_certs(
        out_dir,
        nodes=tuple(node or ["node1"]),
        hosts=tuple(host or ["localhost", "127.0.0.1"]),
    )
    if dicom_server:
        made[dicom_server] = issue(made["ca"], out_dir, dicom_server, server=True,
                                   hosts=tuple(dicom_host or ["localhost", "127.0.0.1"]))
    for name, issued in made.items():
        out().print(f"{name}: {issued.cert} {issued.key}")
    out().print("keep ca.key offline; give each node ca.pem, its .pem and .key")


# Commands kept in their own modules.
heads_cli.register(hub_app)
quality_cli.register(hub_app)


def main() -> None:  # pragma: no cover - `python -m federation_grpc.hub.cli`
    hub_app()


if __name__ == "__main__":
    main()
