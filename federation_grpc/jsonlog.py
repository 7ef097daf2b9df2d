"""One JSON object per log line, built with :func:`json.dumps` (never string templates).

Shared by the node and the hub (the node may import federation_grpc, not the reverse).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

LOGGER = logging.getLogger(__name__)


class JsonFormatter(logging.Formatter):
    """``{"t", "level", "logger", "msg"[, "exc"]}``; quotes, newlines and control
    characters in the message are escaped by the JSON encoder."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "t": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(
    level: str = "INFO", json_logs: bool = False, quiet: tuple[str, ...] = ()
) -> None:
    """Log to stderr at ``level``, as text or one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for noisy in quiet:
        logging.getLogger(noisy).setLevel(logging.WARNING)
