"""``tessera node serve`` that dies as a crash would (``os._exit``, no clean-up) once N bytes
of a hub generation are on disk.

Run: ``python -m tests.federation_node.killed_mid_download N node serve --config FILE``
(from the repository root). The fault goes in through the agent's ``download_hooks``;
production code reads no fault switch.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from dicom_node.federation import FederationAgent
from viewer_bridge.main import main

LOGGER = logging.getLogger(__name__)


def crash_at(limit: int) -> None:
    build = FederationAgent.__init__

    def init(self: FederationAgent, *args: Any, **kwargs: Any) -> None:
        build(self, *args, **kwargs)

        def hook(received: int) -> None:
            if received >= limit:
                LOGGER.error("fault injection: exiting at %d downloaded bytes", received)
                os._exit(137)

        self.download_hooks.append(hook)

    FederationAgent.__init__ = init  # type: ignore[method-assign]


if __name__ == "__main__":
    crash_at(int(sys.argv[1]))
    sys.argv = ["tessera", *sys.argv[2:]]
    main()
