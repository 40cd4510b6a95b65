"""The service's logs: one JSON object per line on stderr, for the `captioner.*` loggers.

`captioner.service` says what the service does (start-up, faults), `captioner.access` has one line per
request (written by `app.api.middleware.RequestContextMiddleware`). `extra={"fields": {...}}` adds keys.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

service_log = logging.getLogger("captioner.service")
access_log = logging.getLogger("captioner.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra={"fields": {...}}` adds keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for the `captioner.*` loggers (idempotent)."""
    root = logging.getLogger("captioner")
    root.setLevel(level.upper())
    if not any(getattr(h, "_captioner_json", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._captioner_json = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
