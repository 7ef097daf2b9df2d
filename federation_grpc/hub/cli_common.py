"""What every ``tessera hub`` command module shares: the console, the config option,
opening the hub from its config file, and failing with a clear message.

Admin commands open the hub's database directly (same config file as ``serve``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console

from federation_grpc.errors import FederationError
from federation_grpc.hub.config import HubConfig, load_config

if TYPE_CHECKING:
    from federation_grpc.hub.service import HubService

ConfigOption = Annotated[
    Path,
    typer.Option(
        "--config", "-c", envvar="TESSERA_HUB_CONFIG", help="Hub TOML file (tessera hub init)."
    ),
]
DEFAULT_CONFIG = Path("hub.toml")


def out() -> Console:
    """A console made per call, so the width follows the terminal (and COLUMNS) of now."""
    return Console()


def config_at(path: Path) -> HubConfig:
    """The hub config at ``path``; exit 2 with a hint if there is none."""
    if not path.exists():
        out().print(f"[red]no hub config at {path}[/red]; write one with `tessera hub init`")
        raise typer.Exit(2)
    return load_config(path)


def open_service(path: Path) -> HubService:
    """The hub's service over the database of the config at ``path``; close it after."""
    from federation_grpc.hub.service import HubService

    return HubService(config_at(path))


def fail(error: FederationError) -> NoReturn:
    """Print a domain error and exit 1."""
    out().print(f"[red]{type(error).__name__}:[/red] {error}")
    raise typer.Exit(1)
