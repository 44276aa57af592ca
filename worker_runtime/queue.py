"""PGMQ operations and the edge_worker calls that go with them.

Only calls that exist in PGMQ 1.4.4 (what many Supabase projects run) are used; anything
newer is avoided or detected.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

Executor = asyncpg.Pool | asyncpg.Connection


@dataclass(frozen=True)
class Message:
    msg_id: int
    read_ct: int
    enqueued_at: datetime
    vt: datetime
    message: Any
    headers: dict[str, Any] | None = None

    @classmethod
    def from_record(cls, row: asyncpg.Record) -> Message:
        # `headers` is PGMQ 1.5+; older servers have no such column.
        return cls(row["msg_id"], row["read_ct"], row["enqueued_at"], row["vt"], row["message"], row.get("headers"))


@dataclass
class Queue:
    """A PGMQ queue reached through a pool (or one connection)."""

    db: Executor
    name: str
    _ensured: bool = field(default=False, repr=False)

    async def ensure(self) -> None:
        """Create the queue if it does not exist (pgmq.create is idempotent)."""
        exists = await self.db.fetchval(
            "select exists (select 1 from pgmq.meta where queue_name = $1)", self.name
        )
        if not exists:
            await self.db.execute("select pgmq.create($1::text)", self.name)
        self._ensured = True

    async def exists(self) -> bool:
        return bool(await self.db.fetchval(
            "select exists (select 1 from pgmq.meta where queue_name = $1)", self.name
        ))

    async def read_with_poll(self, qty: int, vt: int, max_poll_seconds: int, poll_interval_ms: int) -> list[Message]:
        rows = await self.db.fetch(
            "select * from pgmq.read_with_poll($1::text, $2::integer, $3::integer, $4::integer, $5::integer)",
            self.name, vt, qty, max_poll_seconds, poll_interval_ms,
        )
        return [Message.from_record(r) for r in rows]

    async def read(self, qty: int, vt: int) -> list[Message]:
        rows = await self.db.fetch("select * from pgmq.read($1::text, $2::integer, $3::integer)", self.name, vt, qty)
        return [Message.from_record(r) for r in rows]

    async def archive(self, msg_ids: Sequence[int]) -> list[int]:
        """Archive many messages in one round trip; returns the ids archived."""
        rows = await self.db.fetch("select * from pgmq.archive($1::text, $2::bigint[])", self.name, list(msg_ids))
        return [r[0] for r in rows]

    async def fail(
        self, msg_id: int, error: dict[str, Any], *, retry_limit: int, retry_delay: int,
        worker_id: uuid.UUID | None = None, function_name: str | None = None,
    ) -> str:
        """Retry later or dead-letter, in one round trip. Returns 'retry', 'dead_letter' or 'missing'."""
        return await self.db.fetchval(
            "select edge_worker.fail($1, $2, $3::jsonb, $4, $5, $6, $7)",
            self.name, msg_id, error, retry_limit, retry_delay, worker_id, function_name,
        )

    async def extend_vt(self, msg_ids: Iterable[int], seconds: int) -> list[int]:
        rows = await self.db.fetch(
            "select * from edge_worker.extend_vt($1, $2::bigint[], $3)", self.name, list(msg_ids), seconds
        )
        return [r[0] for r in rows]

    async def send(self, payload: Any, *, delay: int = 0) -> int:
        return await self.db.fetchval("select * from pgmq.send($1::text, $2::jsonb, $3::integer)", self.name, payload, delay)

    async def send_batch(self, payloads: Sequence[Any], *, delay: int = 0) -> list[int]:
        rows = await self.db.fetch(
            "select * from pgmq.send_batch($1::text, $2::jsonb[], $3::integer)", self.name, list(payloads), delay
        )
        return [r[0] for r in rows]

    async def metrics(self) -> dict[str, Any]:
        row = await self.db.fetchrow("select * from pgmq.metrics($1)", self.name)
        return dict(row) if row else {}
