"""The worker against real PostgreSQL + PGMQ: what a user of the queue would check."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import asyncpg
import pytest
from pydantic import BaseModel

from tests.waiting import wait_for
from worker_runtime import EdgeWorker, State, Worker, send, send_batch
from worker_runtime import db
from worker_runtime.edge_worker import collect

@pytest.fixture
async def conn(db_url):
    """Like the shared fixture, with jsonb decoded as the runtime decodes it."""
    connection = await db.connect(db_url)
    yield connection
    await connection.close()


FAST = {"heartbeat_interval": 0.5, "max_poll_seconds": 1, "poll_interval_ms": 50}


async def archived_ids(conn: asyncpg.Connection, queue: str = "tasks") -> list[int]:
    return [r[0] for r in await conn.fetch(f"select msg_id from pgmq.a_{queue} order by msg_id")]


async def queue_len(conn: asyncpg.Connection, queue: str = "tasks") -> int:
    return await conn.fetchval(f"select count(*) from pgmq.q_{queue}")


async def test_zero_config_start_creates_queue_and_registers(db_url, conn, monkeypatch):
    monkeypatch.setenv("EDGE_WORKER_DB_URL", db_url)
    done = asyncio.Event()

    async def handler(payload, ctx):
        done.set()

    with collect() as specs:
        EdgeWorker.start(handler)
    worker = Worker(specs[0].handler, specs[0].config)
    async with worker:
        assert worker.state is State.RUNNING
        assert await conn.fetchval("select count(*) from pgmq.meta where queue_name = 'tasks'") == 1
        row = await conn.fetchrow("select * from edge_worker.workers where worker_id = $1", uuid.UUID(worker.worker_id))
        assert row["queue_name"] == "tasks" and row["stopped_at"] is None
        await send("tasks", {"hello": "world"})
        await asyncio.wait_for(done.wait(), 10)
        await wait_for(lambda: archived_ids(conn), what="the message archived")
    assert worker.state is State.STOPPED
    assert await conn.fetchval(
        "select stopped_at is not null from edge_worker.workers where worker_id = $1", uuid.UUID(worker.worker_id)
    )


async def test_concurrency_never_exceeds_max_concurrent(db_url, conn):
    running = peak = 0

    async def handler(payload, ctx):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1

    async with Worker(handler, db_url=db_url, max_concurrent=4, **FAST) as worker:
        await send_batch("tasks", [{"n": i} for i in range(60)], db_url=db_url)
        await wait_for(lambda: worker.stats.processed == 60, what="60 processed")
    assert peak == 4  # it reached the limit (slots are refilled) and never went past it
    assert len(await archived_ids(conn)) == 60


async def test_retries_honour_delay_and_limit_then_dead_letter(db_url, conn):
    attempts: list[float] = []

    async def handler(payload, ctx):
        attempts.append(time.monotonic())
        raise RuntimeError(f"cannot handle {payload['n']}")

    async with Worker(handler, db_url=db_url, retry_limit=2, retry_delay=1, **FAST):
        msg_id = await send("tasks", {"n": 7}, db_url=db_url)
        dead = await wait_for(
            lambda: conn.fetchrow("select * from edge_worker.dead_letters where msg_id = $1", msg_id),
            what="the dead letter",
        )
    assert len(attempts) == 3  # the first run and retry_limit=2 retries
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert all(gap >= 0.95 for gap in gaps), gaps  # never retried before retry_delay
    assert dead["message"] == {"n": 7} and dead["read_ct"] == 3
    assert dead["error"]["type"] == "RuntimeError"
    assert dead["error"]["message"] == "cannot handle 7"
    assert "Traceback" in dead["error"]["traceback"] and "cannot handle 7" in dead["error"]["traceback"]
    assert await queue_len(conn) == 0 and await archived_ids(conn) == []


async def test_sync_handler_runs_off_the_event_loop(db_url, conn):
    threads: set[str] = set()

    def handler(payload, ctx):  # blocking code is fine in a sync handler
        time.sleep(0.05)
        threads.add(threading.current_thread().name)

    async with Worker(handler, db_url=db_url, max_concurrent=5, **FAST) as worker:
        await send_batch("tasks", [{"n": i} for i in range(10)], db_url=db_url)
        await wait_for(lambda: worker.stats.processed == 10, what="10 processed")
    assert threading.main_thread().name not in threads
    assert len(await archived_ids(conn)) == 10


class Order(BaseModel):
    order_id: int
    email: str


async def test_bad_payload_is_a_failure_not_a_crash(db_url, conn):
    seen: list[Order] = []

    async def handler(payload: Order, ctx) -> None:
        seen.append(payload)

    async with Worker(handler, db_url=db_url, retry_limit=0, **FAST) as worker:
        await send("tasks", {"order_id": "not a number"}, db_url=db_url)
        await send("tasks", "just a string", db_url=db_url)
        good = await send("tasks", {"order_id": 1, "email": "a@example.com"}, db_url=db_url)
        await wait_for(lambda: worker.stats.dead_lettered == 2 and worker.stats.processed == 1, what="outcomes")
        assert worker.state is State.RUNNING
    assert seen == [Order(order_id=1, email="a@example.com")]
    assert await archived_ids(conn) == [good]
    errors = [r["error"]["type"] for r in await conn.fetch("select error from edge_worker.dead_letters")]
    assert errors == ["pydantic_core._pydantic_core.ValidationError"] * 2


async def test_slow_handler_runs_exactly_once_across_workers(db_url, conn):
    runs: list[tuple[str, int]] = []

    async def handler(payload, ctx):
        runs.append((ctx.worker_id, ctx.msg_id))
        await asyncio.sleep(4)  # > visibility_timeout=1, but the worker keeps extending it

    options = dict(db_url=db_url, visibility_timeout=1, **FAST)
    async with Worker(handler, **options) as first, Worker(handler, **options) as second:
        msg_id = await send("tasks", {"slow": True}, db_url=db_url)
        await wait_for(lambda: archived_ids(conn), timeout=15, what="the slow message archived")
        # The other worker polled the whole time and never got it.
        assert first.stats.processed + second.stats.processed == 1
    assert [m for _, m in runs] == [msg_id]


async def test_deprecation_stops_the_worker_within_one_heartbeat(db_url, conn):
    async with Worker(lambda p, c: None, db_url=db_url, function_name="emails", **FAST) as worker:
        deprecated_at = time.monotonic()
        assert await conn.fetchval("select edge_worker.deprecate_workers('emails')") == 1
        await asyncio.wait_for(worker.wait_stopped(), 5)
        assert time.monotonic() - deprecated_at < 2 * FAST["heartbeat_interval"] + 1
    assert worker.stop_reason.startswith("deprecated")


async def test_heartbeats_keep_coming_while_handlers_block(db_url, conn):
    release = asyncio.Event()

    async def handler(payload, ctx):
        await release.wait()

    async with Worker(handler, db_url=db_url, max_concurrent=2, **FAST) as worker:
        await send_batch("tasks", [1, 2], db_url=db_url)
        await wait_for(lambda: worker.in_flight == 2, what="both handlers running")
        first = await conn.fetchval("select last_heartbeat_at from edge_worker.workers")
        await wait_for(
            lambda: conn.fetchval("select last_heartbeat_at > $1 from edge_worker.workers", first),
            what="a later heartbeat while handlers are busy",
        )
        assert await conn.fetchval("select count(*) from edge_worker.active_workers") == 1
        release.set()


async def test_stop_lets_handlers_finish_within_grace_then_aborts(db_url, conn):
    aborted: list[int] = []

    async def handler(payload, ctx):
        if payload == "quick":
            await asyncio.sleep(0.3)
            return
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            aborted.append(ctx.msg_id)
            assert ctx.aborted  # the abort signal is set before cancellation
            raise

    worker = Worker(handler, db_url=db_url, shutdown_grace_seconds=1, **FAST)
    await worker.start()
    quick, slow = await send_batch("tasks", ["quick", "slow"], db_url=db_url)
    await wait_for(lambda: worker.in_flight == 2, what="both running")
    await worker.stop()
    assert await archived_ids(conn) == [quick]  # finished within grace: archived
    assert aborted == [slow]
    # Aborted, not lost: still in the queue and back after its visibility timeout.
    assert await conn.fetchval("select msg_id from pgmq.q_tasks") == slow
    assert await conn.fetchval("select count(*) from edge_worker.dead_letters") == 0


async def test_listen_poller_wakes_on_insert(db_url, conn):
    got = asyncio.Event()

    async def handler(payload, ctx):
        got.set()

    # max_poll_seconds=30: only a NOTIFY can deliver the message within the wait below.
    async with Worker(handler, db_url=db_url, poller="listen", max_poll_seconds=30, heartbeat_interval=0.5) as worker:
        assert type(worker._poller).__name__ == "ListenPoller"
        await asyncio.sleep(0.2)  # let the poller go idle on an empty queue
        await send("tasks", {"ping": 1}, db_url=db_url)
        await asyncio.wait_for(got.wait(), 5)


async def test_connections_stay_within_limit_and_close_after_stop(db_url, conn):
    dbname = await conn.fetchval("select current_database()")
    count_sql = ("select count(*) from pg_stat_activity where datname = $1 "
                 "and application_name = 'worker_runtime' and pid <> pg_backend_pid()")
    peak = 0
    lock = asyncio.Lock()  # handlers share the test's one connection

    async def handler(payload, ctx):
        nonlocal peak
        async with lock:
            peak = max(peak, await conn.fetchval(count_sql, dbname))

    async with Worker(handler, db_url=db_url, max_pg_connections=3, max_concurrent=10, **FAST) as worker:
        await send_batch("tasks", list(range(100)), db_url=db_url)
        await wait_for(lambda: worker.stats.processed == 100, what="100 processed")
    assert 1 <= peak <= 3
    async def none_left() -> bool:
        return await conn.fetchval(count_sql, dbname) == 0

    for _ in range(200):
        async with Worker(lambda p, c: None, db_url=db_url, max_pg_connections=2, **FAST):
            pass
        # A backend leaves pg_stat_activity a moment after its client disconnected.
        await wait_for(none_left, timeout=5, what="no connections left")
