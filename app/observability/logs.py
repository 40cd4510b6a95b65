"""The service's logs: one JSON object per line on stderr, for the `captioner.*` loggers, uvicorn's own
(`uvicorn`, `uvicorn.error`, `uvicorn.access`: start-up, shutdown, a port in use), Python's warnings and,
in a process where nothing else configured the root logger, every other library's.

`captioner.service` says what the service does (start-up, faults), `captioner.access` has one line per
request (written by `app.api.middleware.RequestContextMiddleware`). `extra={"fields": {...}}` adds keys.
With several worker processes (`captioner serve --workers N`) every line also has `pid`, the process that
wrote it (the supervisor's or a worker's), as their lines share one stream.
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
    """One JSON object per line; `extra={"fields": {...}}` adds keys; `with_pid` adds the process id."""

    with_pid = False  # set by configure_logging(pid=True): one of several processes writing to one stream

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if JsonFormatter.with_pid:
            entry["pid"] = record.process
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


# uvicorn's loggers: their plain-text handlers are replaced by the JSON one (`captioner serve` passes
# log_config=None; plain `uvicorn --factory` configured them before calling create_app).
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def _json_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._captioner_json = True  # type: ignore[attr-defined]
    return handler


def _is_ours(handler: logging.Handler) -> bool:
    return getattr(handler, "_captioner_json", False)


def configure_logging(level: str = "info", pid: bool = False) -> None:
    """JSON lines on stderr for the `captioner.*` and uvicorn loggers and warnings (idempotent); `pid`: each
    line names its process (several workers share the stream)."""
    JsonFormatter.with_pid = pid
    root = logging.getLogger("captioner")
    root.setLevel(level.upper())
    if not any(_is_ours(h) for h in root.handlers):
        root.addHandler(_json_handler())
        root.propagate = False
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        if name == "uvicorn.error":  # propagates to "uvicorn", as in uvicorn's own configuration
            logger.handlers = []
            logger.propagate = True
            continue
        if name == "uvicorn.access" and not logger.handlers and not logger.propagate:
            # uvicorn turned its access log off (access_log=False, --no-access-log) before the app was built
            # (a worker process, plain `uvicorn --factory`): it decides by whether the logger has a handler
            continue
        if not (len(logger.handlers) == 1 and _is_ours(logger.handlers[0])):
            logger.handlers = [_json_handler()]
        logger.propagate = False
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the root logger
    top = logging.getLogger()
    if not top.handlers:  # a process of its own (not under a test runner): other libraries' lines as JSON too
        top.addHandler(_json_handler())
