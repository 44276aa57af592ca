"""A worker as a real process: killed, restarted under, SIGTERMed; nothing is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.waiting import wait_for
from worker_runtime import Worker, db, send_batch

WORKER_SCRIPT = textwrap.dedent(
    """
    import asyncio, os
    from worker_runtime import EdgeWorker

    async def handler(payload, ctx):
        if payload.get("leak_url"):
            raise RuntimeError("cannot reach " + os.environ["EDGE_WORKER_DB_URL"])
        await asyncio.sleep(float(os.environ.get("HANDLER_SECONDS", "0.02")))

    EdgeWorker.start(
        handler, max_concurrent=5, visibility_timeout=2, heartbeat_interval=0.5,
        max_poll_seconds=1, poll_interval_ms=50, retry_limit=0,
    )
    """
)


@pytest.fixture
async def conn(db_url):
    connection = await db.connect(db_url)
    yield connection
    await connection.close()


def start_worker_process(tmp_path: Path, db_url: str, **env: str) -> subprocess.Popen[str]:
    folder = tmp_path / "workers" / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "worker.py"
    script.write_text(WORKER_SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script)],
        env={**os.environ, "EDGE_WORKER_DB_URL": db_url, **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


async def count(conn, sql: str) -> int:
    return await conn.fetchval(sql)


async def test_kill_9_mid_load_loses_nothing(tmp_path, db_url, conn):
    proc = start_worker_process(tmp_path, db_url, HANDLER_SECONDS="0.05")
    try:
        await wait_for(lambda: count(conn, "select count(*) from edge_worker.active_workers"), what="worker up")
        ids = await send_batch("tasks", [{"n": i} for i in range(200)], db_url=db_url)
        await wait_for(lambda: count(conn, "select count(*) >= 20 from pgmq.a_tasks"), what="some archived")
        proc.kill()  # SIGKILL: no clean-up of any kind
        proc.wait(10)
        assert await count(conn, "select count(*) from pgmq.a_tasks") < 200
        async with Worker(lambda p, c: None, db_url=db_url, visibility_timeout=2, heartbeat_interval=0.5,
                          max_poll_seconds=1, poll_interval_ms=50):
            await wait_for(lambda: count(conn, "select count(*) = 200 from pgmq.a_tasks"), timeout=30,
                           what="all 200 archived by the second worker")
    finally:
        proc.kill()
    archived = {r[0] for r in await conn.fetch("select msg_id from pgmq.a_tasks")}
    assert archived == set(ids)
    assert await count(conn, "select count(*) from pgmq.q_tasks") == 0


async def test_postgres_restart_mid_load_resumes_and_loses_nothing(pg, db_url):
    seen: set[int] = set()

    async def handler(payload, ctx):
        await asyncio.sleep(0.01)
        seen.add(payload["n"])

    async with Worker(handler, db_url=db_url, max_concurrent=5, heartbeat_interval=0.5,
                      max_poll_seconds=1, poll_interval_ms=50) as worker:
        await send_batch("tasks", [{"n": i} for i in range(300)], db_url=db_url)
        await wait_for(lambda: worker.stats.processed >= 30, what="processing under way")
        await asyncio.to_thread(pg.restart)
        await wait_for(lambda: worker.stats.processed >= 300, timeout=60, what="all processed after restart")
        conn = await db.connect(db_url)
        try:
            # The worker's heartbeats resumed on new connections.
            await wait_for(lambda: count(conn, "select count(*) from edge_worker.active_workers"),
                           what="heartbeats after the restart")
            await wait_for(lambda: count(conn, "select count(*) = 300 from pgmq.a_tasks"), what="all archived")
        finally:
            await conn.close()
    assert seen == set(range(300))


async def test_sigterm_drains_running_handlers(tmp_path, db_url, conn):
    proc = start_worker_process(tmp_path, db_url, HANDLER_SECONDS="1.5")
    try:
        await wait_for(lambda: count(conn, "select count(*) from edge_worker.active_workers"), what="worker up")
        await send_batch("tasks", [{"n": i} for i in range(4)], db_url=db_url)
        await wait_for(lambda: count(conn, "select count(*) = 4 from pgmq.q_tasks where read_ct > 0"),
                       what="all four taken by handlers")
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "Stopping worker: received SIGTERM" in output
    assert await count(conn, "select count(*) from pgmq.a_tasks") == 4  # finished, not dropped
    assert await count(conn, "select count(*) from edge_worker.workers where stopped_at is not null") == 1


async def test_log_lines_never_contain_the_password(tmp_path, pg, db_url, conn):
    assert "%" in db_url  # the password has special characters, URL-encoded
    proc = start_worker_process(tmp_path, db_url, EDGE_WORKER_LOG_LEVEL="debug")
    try:
        await wait_for(lambda: count(conn, "select count(*) from edge_worker.active_workers"), what="worker up")
        await send_batch("tasks", [{"leak_url": True}], db_url=db_url)
        await wait_for(lambda: count(conn, "select count(*) from edge_worker.dead_letters"), what="dead letter")
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert "[Info] worker_id=" in output and "[WorkerLifecycle]" in output  # the seed's line shape
    assert "cannot reach postgresql://postgres:***@" in output
    error = await conn.fetchval("select error from edge_worker.dead_letters")
    for text in (output, error["message"], error["traceback"]):
        assert pg.password not in text and "test-pass" not in text

    # A wrong password: one sentence, no traceback, no password.
    wrong = start_worker_process(tmp_path, db_url.replace("test-pass", "not-the-pass"))
    output, _ = wrong.communicate(timeout=20)
    assert wrong.returncode == 1
    assert "The database refused the password" in output and "Traceback" not in output
    assert "not-the-pass" not in output
