"""The ``tessera`` command line: node, hub, model, phantom and demo."""

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
from viewer_bridge.cli import token  # noqa: E402, I001
node_app.command("token")(token)
from dicom_node.learning.cli import model_app  # noqa: E402, I001
app.add_typer(model_app, name="model")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
