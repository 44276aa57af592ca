"""Put messages on a queue: `send` and `send_batch` for producers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import asyncpg

from . import db
from .config import DB_URL_ENV, ConfigError
from .queue import Queue


def _url(db_url: str | None) -> str:
    url = db_url or os.environ.get(DB_URL_ENV)
    if not url:
        raise ConfigError(f"No database URL: set {DB_URL_ENV} or pass db_url=...")
    return url


async def send(
    queue_name: str, payload: Any, *, delay: int = 0, db_url: str | None = None, pool: asyncpg.Pool | None = None
) -> int:
    """Send one message; returns its msg_id. The queue must exist (a worker creates it)."""
    return (await send_batch(queue_name, [payload], delay=delay, db_url=db_url, pool=pool))[0]


async def send_batch(
    queue_name: str, payloads: Sequence[Any], *, delay: int = 0, db_url: str | None = None,
    pool: asyncpg.Pool | None = None,
) -> list[int]:
    """Send many messages in one round trip; returns their msg_ids in order."""
    if pool is not None:
        return await Queue(pool, queue_name).send_batch(payloads, delay=delay)
    conn = await db.connect(_url(db_url))
    try:
        return await Queue(conn, queue_name).send_batch(payloads, delay=delay)
    finally:
        await conn.close()
