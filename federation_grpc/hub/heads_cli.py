"""``tessera hub ...`` commands for issue 8 (heads); registered by :mod:`federation_grpc.hub.cli`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``tessera hub``."""
