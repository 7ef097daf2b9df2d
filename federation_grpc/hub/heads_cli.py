"""``tessera hub add-head``: continual classes; registered by :mod:`federation_grpc.hub.cli`.

    tessera hub add-head kidneys --hub-config hub.toml --labels '[
      {"name": "kidney_left",  "value": 4, "code": "18639004", "meaning": "Left kidney"},
      {"name": "kidney_right", "value": 5, "code": "9846003",  "meaning": "Right kidney"}]'

``--labels @FILE`` reads the JSON from a file. The command opens the hub database
directly, like the other admin commands; a running hub announces the new generation to
watching nodes within its poll interval. See :mod:`federation_grpc.hub.heads`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from federation_grpc.errors import FederationError
from federation_grpc.hub.cli_common import fail, open_service, out


def _labels_text(value: str) -> str:
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise typer.BadParameter(f"cannot read {value[1:]}: {exc}") from exc
    return value


def add_head(
    name: Annotated[str, typer.Argument(help="Name of the new head (a-z, 0-9, _).")],
    labels: Annotated[
        str,
        typer.Option(help='JSON list of {"name","value","code","meaning"[,"scheme"]}, '
                          "or @FILE. Codes are SNOMED CT unless scheme says otherwise."),
    ],
    hub_config: Annotated[
        Path, typer.Option("--hub-config", "--config", "-c", envvar="TESSERA_HUB_CONFIG",
                           help="Hub TOML file.")
    ] = Path("hub.toml"),
    seed: Annotated[
        int | None, typer.Option(help="Seed nodes initialise the head from (default: derived "
                                      "from model, head and generation).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Validate and print the config; write "
                                                "nothing.")] = False,
) -> None:
    """Add a decoder head for new labels (continual classes) as a new generation.

    Nodes that annotate the new labels train only this head, on the frozen encoder;
    it is used for segmentation once a merged update has trained it.
    """
    from federation_grpc.hub import heads

    try:
        head = heads.NewHead(name, heads.parse_labels(_labels_text(labels)))
    except FederationError as error:
        fail(error)
    service = open_service(hub_config)
    try:
        view, config_json = heads.add_head(service.ledger, head, init_seed=seed, dry_run=dry_run)
    except FederationError as error:
        fail(error)
    finally:
        service.close()
    if view is None:
        print(config_json)
        return
    out().print(f"generation {view.number} adds head {name} "
                f"({', '.join(lab.name for lab in head.labels)}); pending until a merged "
                "update trains it")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``tessera hub``."""
    app.command("add-head")(add_head)
