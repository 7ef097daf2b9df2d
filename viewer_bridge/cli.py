"""``tessera node token``: a new bearer token for the viewer bridge, and its hash."""

from __future__ import annotations

import typer

from viewer_bridge.auth import new_token


def token() -> None:
    """Print a new DICOMweb bearer token and the sha256 line for ``[http] tokens``.

    The node stores only the hash: give the token to OHIF's users (sign-in at /login)
    and put the hash in the configuration.
    """
    value, digest = new_token()
    typer.echo(f"token: {value}")
    typer.echo(f'config: [http] tokens = ["{digest}"]')
