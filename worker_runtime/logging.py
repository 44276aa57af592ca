"""Log lines in the seed's shape: `[Info] worker_id=<uuid> [Component] message`.

Every handler gets a filter that blanks registered secrets (the DB password, the auth
secret), so a secret that slips into an exception text still never reaches a log.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from .config import LOG_LEVEL_ENV

ROOT = "worker_runtime"
_LEVEL_NAMES = {"DEBUG": "Debug", "INFO": "Info", "WARNING": "Warning", "ERROR": "Error", "CRITICAL": "Error"}
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Never print `value`: every line that contains it gets *** instead."""
    if value and len(value) >= 3:
        _secrets.add(value)


def redact(text: str) -> str:
    for secret in _secrets:
        text = text.replace(secret, "***")
    return text


class _SeedFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = _LEVEL_NAMES.get(record.levelname, record.levelname.title())
        worker_id = getattr(record, "worker_id", None)
        component = getattr(record, "component", None) or record.name.rsplit(".", 1)[-1]
        parts = [f"[{level}]"]
        if worker_id:
            parts.append(f"worker_id={worker_id}")
        parts.append(f"[{component}]")
        parts.append(record.getMessage())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def configure(level: str | None = None, stream: Any = None) -> None:
    """Set up `worker_runtime` logging once; EDGE_WORKER_LOG_LEVEL wins over the default."""
    logger = logging.getLogger(ROOT)
    chosen = (level or os.environ.get(LOG_LEVEL_ENV) or "info").upper()
    logger.setLevel(getattr(logging, chosen, logging.INFO))
    if not any(getattr(h, "_edge_worker", False) for h in logger.handlers):
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(_SeedFormatter())
        handler._edge_worker = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def get_logger(component: str, worker_id: str | None = None) -> logging.LoggerAdapter[logging.Logger]:
    """A logger whose lines carry the worker id and the component, as the seed's do."""
    return logging.LoggerAdapter(
        logging.getLogger(f"{ROOT}.{component}"), {"component": component, "worker_id": worker_id}
    )
