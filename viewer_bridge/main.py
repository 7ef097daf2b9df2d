"""The composition root: the ``tessera`` command, and the one module that imports both
the node (``dicom_node``) and its HTTP front end (this package).

``dicom_node`` builds a node and its command line without knowing about HTTP. Here the
viewer bridge (DICOMweb for OHIF, ``/healthz``, ``/metrics``) is plugged in as the
node's :class:`~dicom_node.node.HttpFrontEnd`, and ``tessera node token`` is mounted.
Run it as ``tessera`` or ``python -m viewer_bridge.main``; code that builds a node in
process and wants its HTTP port calls :func:`build_node`.
"""

from __future__ import annotations

from typing import Any

from dicom_node.cli import app
from dicom_node.config import NodeConfig
from dicom_node.node import FrontEnds, Node
from dicom_node.node_cli import node_app
from viewer_bridge.cli import token
from viewer_bridge.server import start_bridge

__all__ = ["FRONT_ENDS", "app", "build_node", "main"]

FRONT_ENDS = FrontEnds(http=start_bridge)

node_app.command("token")(token)


def build_node(config: NodeConfig, **kwargs: Any) -> Node:
    """A node with this package's HTTP front end on ``[http]`` (not started)."""
    return Node(config, http=FRONT_ENDS.http, **kwargs)


def main() -> None:
    app(obj=FRONT_ENDS)


if __name__ == "__main__":
    main()
