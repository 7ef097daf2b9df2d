"""The ``tessera`` command line of the node's packages: node, hub, model, phantom, demo.

The command users run is ``viewer_bridge.main`` (the composition root), which mounts
this app with the HTTP front end plugged in.
"""

from __future__ import annotations

import typer

from dicom_node.demo.cli import demo
from dicom_node.node_cli import node_app
from federation_grpc.hub.cli import hub_app

app = typer.Typer(
    name="tessera",
    help="Tessera: a DICOM node that segments, learns from corrections and federates.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(node_app, name="node")
app.command("demo")(demo)

# Sub-apps owned by other packages are mounted here (one line each).
app.add_typer(hub_app, name="hub")
from dicom_node.phantom.cli import phantom  # noqa: E402, I001
app.command("phantom")(phantom)
from dicom_node.learning.cli import model_app  # noqa: E402, I001
app.add_typer(model_app, name="model")
