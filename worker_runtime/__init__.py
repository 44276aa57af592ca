"""supabase-worker-kit runtime: Python background workers for Supabase Queues (PGMQ)."""

from __future__ import annotations

from .config import ConfigError, WorkerConfig
from .db import DatabaseError
from .edge_worker import EdgeWorker, WorkerSpec
from .executor import Context
from .producer import send, send_batch
from .worker import State, Worker

__all__ = [
    "ConfigError", "Context", "DatabaseError", "EdgeWorker", "State", "Worker", "WorkerConfig",
    "WorkerSpec", "send", "send_batch",
]
__version__ = "0.1.0"
