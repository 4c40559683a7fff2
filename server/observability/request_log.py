"""Structured JSON logs: one line per request, machine-readable, never the key or (by default) the prompt."""

from __future__ import annotations

import json
import logging
import time

LOGGER_NAME = "minerva.requests"


class JsonFormatter(logging.Formatter):
    """Renders a record as one JSON object; `extra={"fields": {...}}` adds keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_json_logging(level: str = "info") -> None:
    """Send Minerva's loggers (server and engine) to stderr as JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    for name in ("minerva", "engine", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


def log_request(fields: dict[str, object]) -> None:
    """One line for a finished HTTP request (fields: request_id, method, route, status, latency_ms, ...)."""
    logging.getLogger(LOGGER_NAME).info("request", extra={"fields": fields})
