"""How a worker waits for messages: PGMQ's read_with_poll, or LISTEN/NOTIFY.

Both return at most `qty` messages, and an empty list when nothing came within
max_poll_seconds, so the worker loop can check whether it should stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import asyncpg

from .config import WorkerConfig
from .logging import get_logger
from .queue import Message, Queue

PROBE_SECONDS = 2.0


class Poller(Protocol):
    async def next_batch(self, qty: int) -> list[Message]: ...
    async def close(self) -> None: ...


class ReadWithPollPoller:
    """PGMQ's read_with_poll: the server waits up to max_poll_seconds for a message."""

    def __init__(self, queue: Queue, config: WorkerConfig) -> None:
        self.queue, self.config = queue, config

    async def next_batch(self, qty: int) -> list[Message]:
        c = self.config
        return await self.queue.read_with_poll(qty, c.visibility_timeout, c.max_poll_seconds, c.poll_interval_ms)

    async def close(self) -> None:
        return None


class ListenPoller:
    """Wake on a NOTIFY from the queue's insert trigger, then read without waiting.

    Holds one pooled connection for LISTEN. A transaction-mode pooler accepts LISTEN but
    never delivers notifications, so `open()` probes with a real NOTIFY and reports
    whether delivery works; the worker falls back to polling when it does not.
    """

    def __init__(self, queue: Queue, pool: asyncpg.Pool, config: WorkerConfig, worker_id: str | None = None) -> None:
        self.queue, self.pool, self.config = queue, pool, config
        self.channel = f"edge_worker_{queue.name}"
        self._wakeup = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._log = get_logger("ListenPoller", worker_id)

    def _on_notify(self, *_: object) -> None:
        self._wakeup.set()

    async def open(self) -> bool:
        """LISTEN, and prove a notification arrives. False means: use polling instead."""
        await self.pool.execute("select edge_worker.enable_notify($1)", self.queue.name)
        self._conn = await self.pool.acquire()
        await self._conn.add_listener(self.channel, self._on_notify)
        await self.pool.execute("select pg_notify($1, 'probe')", self.channel)
        try:
            await asyncio.wait_for(self._wakeup.wait(), PROBE_SECONDS)
        except TimeoutError:
            self._log.warning(
                "No NOTIFY arrived on %s (a transaction-mode pooler drops them): falling back to polling",
                self.channel,
            )
            await self.close()
            return False
        return True

    async def next_batch(self, qty: int) -> list[Message]:
        if not self.healthy:  # the LISTEN connection died (e.g. PostgreSQL restarted)
            await self.close()
            self._conn = await self.pool.acquire()
            await self._conn.add_listener(self.channel, self._on_notify)
        # Clear before reading: a notification that lands during the read is not lost.
        self._wakeup.clear()
        messages = await self.queue.read(qty, self.config.visibility_timeout)
        if messages:
            return messages
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), self.config.max_poll_seconds)
        return await self.queue.read(qty, self.config.visibility_timeout)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(Exception):
            await conn.remove_listener(self.channel, self._on_notify)
        with contextlib.suppress(Exception):
            await self.pool.release(conn)

    @property
    def healthy(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()
