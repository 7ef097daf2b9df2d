"""Error root of the viewer bridge: a request the bridge answers with a 4xx and a reason."""

from __future__ import annotations

from federation_grpc.errors import TesseraError


class BridgeError(TesseraError):
    """Root of every error :mod:`viewer_bridge` raises on purpose."""
