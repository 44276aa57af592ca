"""Keep-alive: registration helpers, edge_worker.ensure_workers() reaching the real host
through the net.http_post stand-in, and end to end through real pg_cron ticks."""

from __future__ import annotations

import datetime as dt
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.host_helpers import SECRET, HostProcess, ThreadedHost, simple_worker, write_worker
from tests.pgcluster import PgCluster, free_port
from tests.waiting import wait_for
from worker_runtime import ConfigError, db
from worker_runtime.host import create_app
from worker_runtime.keepalive import (
    AUTH_SECRET,
    URL_SECRET,
    register,
    register_function,
    set_vault_secret,
    setup_keepalive,
)


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await db.connect(db_url)
    yield connection
    await connection.close()


async def live_workers(conn: asyncpg.Connection, function: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "select * from edge_worker.active_workers where function_name = $1 order by started_at", function)


async def test_register_function_and_vault_secrets(conn: asyncpg.Connection) -> None:
    await register_function(conn, "emails", "email_q", url="http://127.0.0.1:54380", min_workers=2,
                            debounce_seconds=3, version="v1")
    row = await conn.fetchrow("select * from edge_worker.functions where function_name = 'emails'")
    assert (row["queue_name"], row["url"], row["min_workers"], row["version"], row["enabled"]) == (
        "email_q", "http://127.0.0.1:54380", 2, "v1", True)
    assert row["debounce"] == dt.timedelta(seconds=3)

    first = await set_vault_secret(conn, AUTH_SECRET, "one")
    second = await set_vault_secret(conn, AUTH_SECRET, "two")
    assert first == second
    assert await conn.fetch("select decrypted_secret from vault.decrypted_secrets where name = $1", AUTH_SECRET) == [
        ("two",)]

    for bad in (dict(name="Emails"), dict(queue_name="bad-queue"), dict(url="host:1"), dict(min_workers=-1)):
        kwargs = {"name": "emails", "queue_name": "email_q", **bad}
        with pytest.raises(ConfigError):
            await register_function(conn, **kwargs)


async def test_set_vault_secret_without_vault_says_what_to_enable(conn: asyncpg.Connection) -> None:
    await conn.execute("drop schema vault cascade")
    with pytest.raises(ConfigError, match="enable the supabase_vault extension"):
        await set_vault_secret(conn, AUTH_SECRET, "value")


async def test_ensure_workers_starts_a_worker_in_the_host(tmp_path: Path, db_url: str,
                                                          conn: asyncpg.Connection) -> None:
    write_worker(tmp_path / "workers", "emails", simple_worker("email_q"))
    with ThreadedHost(create_app(tmp_path / "workers", db_url=db_url, auth_secret=SECRET)) as host:
        # The Vault has the wrong secret first: the host says 401 and starts nothing.
        await register(conn, "emails", "email_q", url=host.url + "/", auth_secret="not-the-secret",
                       debounce_seconds=0)
        rows = await conn.fetch("select * from edge_worker.ensure_workers()")
        assert [(r["function_name"], r["invoked"], r["reason"]) for r in rows] == [("emails", True, "started")]
        response = await conn.fetchrow("select * from net._http_response where id = $1", rows[0]["request_id"])
        assert response["status_code"] == 401 and response["url"] == f"{host.url}/functions/v1/emails"
        assert host.host.live_workers("emails") == []

        await register(conn, "emails", "email_q", auth_secret=SECRET, debounce_seconds=0)
        rows = await conn.fetch("select * from edge_worker.ensure_workers()")
        response = await conn.fetchrow("select * from net._http_response where id = $1", rows[0]["request_id"])
        assert response["status_code"] == 200 and '"status":"started"' in response["content"].replace(" ", "")
        started = await wait_for(lambda: live_workers(conn, "emails"), what="the worker registered")
        assert len(started) == 1

        # A live worker: the keep-alive leaves it alone.
        rows = await conn.fetch("select * from edge_worker.ensure_workers()")
        assert [(r["invoked"], r["reason"]) for r in rows] == [(False, "alive")]


@dataclass
class CronDatabase:
    conn: asyncpg.Connection
    names: list[str]  # function names this test may register


@pytest.fixture
async def postgres_db(pg: PgCluster) -> AsyncIterator[CronDatabase]:
    """The cluster's `postgres` database, where pg_cron runs; cleaned up afterwards."""
    connection = await db.connect(pg.url())
    names = [f"keepalive-{uuid.uuid4().hex[:8]}", f"disabled-{uuid.uuid4().hex[:8]}"]
    try:
        yield CronDatabase(connection, names)
    finally:
        await connection.execute(
            "select cron.unschedule(jobid) from cron.job where jobname = 'edge_worker_keepalive'")
        await connection.execute("delete from vault.secrets where name = any($1::text[])", [URL_SECRET, AUTH_SECRET])
        await connection.execute("delete from edge_worker.functions where function_name = any($1::text[])", names)
        await connection.execute("delete from edge_worker.workers where function_name = any($1::text[])", names)
        for name in names:
            queue = name.replace("-", "_")
            if await connection.fetchval("select exists (select 1 from pgmq.meta where queue_name = $1)", queue):
                await connection.execute("select pgmq.drop_queue($1)", queue)
        await connection.close()


async def cron_ticks_since(conn: asyncpg.Connection, since: dt.datetime) -> list[asyncpg.Record]:
    return await conn.fetch(
        "select d.status, d.return_message from cron.job_run_details d join cron.job j using (jobid)"
        " where j.jobname = 'edge_worker_keepalive' and d.end_time > $1 order by d.end_time", since)


@pytest.mark.slow
async def test_keepalive_through_pg_cron(tmp_path: Path, pg: PgCluster,
                                         postgres_db: CronDatabase) -> None:
    conn = postgres_db.conn
    alive, disabled = postgres_db.names
    workers = tmp_path / "workers"
    for name in (alive, disabled):
        write_worker(workers, name, simple_worker(name.replace("-", "_")))
    env = {"EDGE_WORKER_DB_URL": pg.url(), "EDGE_WORKER_AUTH_SECRET": SECRET}
    port = free_port()
    first = HostProcess(tmp_path, port=port, env=env).start()
    second = HostProcess(tmp_path, port=port, env=env)
    try:
        await register(conn, alive, alive.replace("-", "_"), url=first.url, auth_secret=SECRET,
                       debounce_seconds=1)
        await register(conn, disabled, disabled.replace("-", "_"), debounce_seconds=1)
        await conn.execute("select edge_worker.stop_function($1)", disabled)
        since = await conn.fetchval("select now()")
        await setup_keepalive(conn, "* * * * *")  # pg_cron 1.4: once a minute

        # 1. A tick starts a worker through the host.
        (w1,) = await wait_for(lambda: live_workers(conn, alive), timeout=150, what="a worker started by a tick")
        assert w1["function_name"] == alive

        # 2. The host dies with its worker (SIGKILL: no stop, no mark_worker_stopped); a new
        #    host comes up on the same URL and a later tick starts a new worker there.
        first.kill()
        second.start()
        await wait_for(lambda: conn.fetchval(
            "select not exists (select 1 from edge_worker.active_workers where worker_id = $1)", w1["worker_id"]),
            timeout=15, what="the killed worker's heartbeat going stale")
        (w2,) = await wait_for(lambda: live_workers(conn, alive), timeout=150,
                               what="a new worker started by a later tick")
        assert w2["worker_id"] != w1["worker_id"]
        assert await conn.fetchval("select stopped_at is null from edge_worker.workers where worker_id = $1",
                                   w1["worker_id"]), "the killed worker never said it stopped"

        # 3. Every tick so far succeeded, none started the disabled function.
        ticks = await cron_ticks_since(conn, since)
        assert len(ticks) >= 2 and all(t["status"] == "succeeded" for t in ticks), ticks
        assert await conn.fetchval("select count(*) from edge_worker.workers where function_name = $1", disabled) == 0
        assert await conn.fetchval(
            "select count(*) from net._http_response where url like '%/functions/v1/' || $1", disabled) == 0
        statuses = await conn.fetch(
            "select status_code from net._http_response where url = $1 and created > $2",
            f"{first.url}/functions/v1/{alive}", since)
        assert statuses and all(r["status_code"] == 200 for r in statuses)

        second.signal(signal.SIGTERM)
        assert second.wait(30) == 0, second.log()
    finally:
        first.kill()
        second.kill()
