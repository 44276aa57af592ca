"""`EdgeWorker.start(handler, **options)`: the seed's entry point.

Run as a script, the call runs one worker in the foreground until SIGTERM/SIGINT. When
the function host imports a worker module, it opens a `collect()` block first, and the
same call only records the handler and options for the host to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import load_dotenv

from . import logging as worker_logging
from .config import FUNCTIONS_ENV_FILE, ConfigError, WorkerConfig
from .db import DatabaseError
from .executor import Handler
from .worker import Worker


@dataclass
class WorkerSpec:
    """A handler and its validated options, as a worker module declared them."""

    handler: Handler
    config: WorkerConfig
    options: dict[str, Any] = field(default_factory=dict)


# The only module-level state: set while the host imports a worker module.
_collector: list[WorkerSpec] | None = None


@contextlib.contextmanager
def collect() -> Iterator[list[WorkerSpec]]:
    """Within this block EdgeWorker.start records specs instead of running workers."""
    global _collector
    previous, _collector = _collector, []
    try:
        yield _collector
    finally:
        _collector = previous


def _default_function_name(handler: Handler) -> str | None:
    """`workers/<name>/worker.py` -> `<name>`, as Supabase names functions after folders."""
    with contextlib.suppress(TypeError, OSError):
        path = Path(inspect.getfile(handler))
        if path.name == "worker.py":
            return path.parent.name
    return None


class EdgeWorker:
    @staticmethod
    def start(handler: Handler, **options: Any) -> WorkerSpec | None:
        options.setdefault("function_name", _default_function_name(handler))
        config = WorkerConfig.from_options(**options)
        spec = WorkerSpec(handler, config, options)
        if _collector is not None:
            _collector.append(spec)
            return spec
        _run_foreground(spec)
        return None


def _run_foreground(spec: WorkerSpec) -> None:
    # Like `worker-runtime serve`: secrets from the project's function env file, env wins.
    load_dotenv(FUNCTIONS_ENV_FILE, override=False)
    worker_logging.configure(spec.config.log_level)
    try:
        asyncio.run(Worker(spec.handler, spec.config).run())
    except (ConfigError, DatabaseError) as exc:
        print(f"worker-runtime: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
