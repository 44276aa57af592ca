"""The function host over real HTTP against real PostgreSQL: auth, start, status, health,
broken modules, the soft limit's replacement, and SIGTERM draining in a real process."""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.host_helpers import SECRET, HostProcess, ThreadedHost, auth, simple_worker, write_worker
from tests.pgcluster import PgCluster, free_port
from tests.waiting import wait_for
from worker_runtime import ConfigError, db
from worker_runtime.host import create_app, discover


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await db.connect(db_url)
    yield connection
    await connection.close()


@pytest.fixture
def workers_dir(tmp_path: Path) -> Path:
    path = tmp_path / "workers"
    path.mkdir()
    return path


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as c:
        yield c


def running_host(workers_dir: Path, db_url: str, **kwargs: Any) -> ThreadedHost:
    kwargs.setdefault("auth_secret", SECRET)
    return ThreadedHost(create_app(workers_dir, db_url=db_url, **kwargs))


async def worker_rows(conn: asyncpg.Connection, function: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "select * from edge_worker.workers where function_name = $1 order by started_at", function)


async def registered(conn: asyncpg.Connection, worker_id: str) -> bool:
    return bool(await conn.fetchval(
        "select exists (select 1 from edge_worker.workers where worker_id = $1 and stopped_at is null)",
        uuid.UUID(worker_id)))


@pytest.fixture
def host(workers_dir: Path, db_url: str) -> Iterator[ThreadedHost]:
    write_worker(workers_dir, "emails", simple_worker("emails"))
    with running_host(workers_dir, db_url) as h:
        yield h


async def test_start_needs_the_bearer_secret(host: ThreadedHost, client: httpx.AsyncClient,
                                             conn: asyncpg.Connection) -> None:
    url = f"{host.url}/functions/v1/emails"
    for headers in ({}, auth("wrong-secret"), {"Authorization": SECRET}, {"Authorization": f"Basic {SECRET}"}):
        response = await client.post(url, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert SECRET not in response.text
    assert host.host.live_workers("emails") == []
    assert await worker_rows(conn, "emails") == []

    response = await client.post(url, headers=auth(), json={"source": "test"})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "started" and body["function_name"] == "emails"
    await wait_for(lambda: registered(conn, body["worker_id"]), what="the worker registered")
    row = (await worker_rows(conn, "emails"))[0]
    assert row["queue_name"] == "emails"


async def test_second_call_answers_running_up_to_max_instances(
        workers_dir: Path, db_url: str, client: httpx.AsyncClient, conn: asyncpg.Connection) -> None:
    write_worker(workers_dir, "emails", simple_worker("emails"))
    with running_host(workers_dir, db_url) as host:
        url = f"{host.url}/functions/v1/emails"
        first = (await client.post(url, headers=auth())).json()
        second = (await client.post(url, headers=auth())).json()
        assert first["status"] == "started"
        assert second == {"status": "running", "worker_id": first["worker_id"], "function_name": "emails"}
        await wait_for(lambda: registered(conn, first["worker_id"]), what="the worker registered")
        assert (await client.post(url, headers=auth())).json()["status"] == "running"
        assert len(await worker_rows(conn, "emails")) == 1

    with running_host(workers_dir, db_url, max_instances=2) as host:
        url = f"{host.url}/functions/v1/emails"
        answers = [(await client.post(url, headers=auth())).json() for _ in range(3)]
        assert [a["status"] for a in answers] == ["started", "started", "running"]
        assert answers[0]["worker_id"] != answers[1]["worker_id"]
        assert answers[2]["worker_id"] in {answers[0]["worker_id"], answers[1]["worker_id"]}
        for answer in answers[:2]:
            await wait_for(lambda a=answer: registered(conn, a["worker_id"]), what="both workers registered")


async def test_unknown_function_is_404_after_auth(host: ThreadedHost, client: httpx.AsyncClient) -> None:
    assert (await client.post(f"{host.url}/functions/v1/nope")).status_code == 401  # no probing without the secret
    response = await client.post(f"{host.url}/functions/v1/nope", headers=auth())
    assert response.status_code == 404
    assert "nope" in response.json()["error"]
    assert (await client.get(f"{host.url}/functions/v1/nope/status", headers=auth())).status_code == 404


async def test_health_and_status(host: ThreadedHost, client: httpx.AsyncClient, conn: asyncpg.Connection,
                                 db_url: str) -> None:
    health = await client.get(f"{host.url}/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["functions"] == ["emails"]

    status_url = f"{host.url}/functions/v1/emails/status"
    assert (await client.get(status_url)).status_code == 401
    empty = (await client.get(status_url, headers=auth())).json()
    assert empty["workers"] == [] and empty["loaded"] and empty["queue_name"] == "emails"

    started = (await client.post(f"{host.url}/functions/v1/emails", headers=auth())).json()
    await wait_for(lambda: registered(conn, started["worker_id"]), what="the worker registered")
    await conn.execute("select pgmq.send_batch('emails', $1::jsonb[])",
                       [{"n": 1}, {"n": 2}, {"n": 3}, {"fail": True}])

    async def settled() -> dict[str, Any] | None:
        body = (await client.get(status_url, headers=auth())).json()
        stats = body["workers"][0]["stats"]
        return body if stats["processed"] == 3 and stats["failed"] == 1 else None

    body = await wait_for(settled, what="3 processed and 1 failed in the status")
    worker = body["workers"][0]
    assert worker["worker_id"] == started["worker_id"] and worker["state"] == "running"
    assert worker["stats"]["retried"] == 1 and worker["stats"]["dead_lettered"] == 0
    assert body["live"] == 1 and body["max_instances"] == 1
    text = str(body)
    assert SECRET not in text and "test-pass" not in text and db_url not in text


async def test_health_is_503_when_the_database_is_unreachable(
        workers_dir: Path, client: httpx.AsyncClient, pg: PgCluster) -> None:
    write_worker(workers_dir, "emails", simple_worker("emails"))
    closed = pg.url().replace(f":{pg.port}/", f":{free_port()}/")
    with running_host(workers_dir, closed) as host:
        health = await client.get(f"{host.url}/health")
        assert health.status_code == 503
        assert health.json()["status"] == "unavailable"
        assert "test-pass" not in health.text and str(pg.port) not in health.text
        # A start is accepted (the keep-alive's call must not hang); the failure shows in the status.
        started = await client.post(f"{host.url}/functions/v1/emails", headers=auth())
        assert started.json()["status"] == "started"

        async def start_error() -> str | None:
            return (await client.get(f"{host.url}/functions/v1/emails/status", headers=auth())).json()[
                "last_start_error"]

        error = await wait_for(start_error, what="the failed start in the status")
        assert "Cannot reach the database" in error and "test-pass" not in error


async def test_host_refuses_to_start_without_a_secret(
        workers_dir: Path, db_url: str, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
        conn: asyncpg.Connection) -> None:
    write_worker(workers_dir, "emails", simple_worker("emails"))
    monkeypatch.delenv("EDGE_WORKER_AUTH_SECRET", raising=False)
    with pytest.raises(ConfigError, match="EDGE_WORKER_AUTH_SECRET is not set: .*--insecure-no-auth"):
        create_app(workers_dir, db_url=db_url)
    monkeypatch.delenv("EDGE_WORKER_DB_URL", raising=False)
    with pytest.raises(ConfigError, match="No database URL: set EDGE_WORKER_DB_URL"):
        create_app(workers_dir, auth_secret=SECRET)

    with ThreadedHost(create_app(workers_dir, db_url=db_url, insecure_no_auth=True)) as host:
        response = await client.post(f"{host.url}/functions/v1/emails")
        assert response.status_code == 200 and response.json()["status"] == "started"
        await wait_for(lambda: registered(conn, response.json()["worker_id"]), what="the worker registered")


async def test_a_broken_worker_module_does_not_take_the_others_down(
        workers_dir: Path, db_url: str, client: httpx.AsyncClient, conn: asyncpg.Connection) -> None:
    # Two healthy functions whose modules are both called worker.py, with module-level state.
    write_worker(workers_dir, "alpha", simple_worker("alpha_q"))
    write_worker(workers_dir, "beta", simple_worker("beta_q"))
    write_worker(workers_dir, "broken", "import not_a_module_anywhere\n")
    write_worker(workers_dir, "syntax", "def handler(:\n")
    write_worker(workers_dir, "bad-options", """
        from worker_runtime import EdgeWorker
        EdgeWorker.start(lambda payload, ctx: None, queue_nmae="x")
    """)
    write_worker(workers_dir, "idle", "x = 1\n")  # never calls EdgeWorker.start
    (workers_dir / "_shared").mkdir()  # helper folders are not functions
    (workers_dir / "_shared" / "worker.py").write_text("raise SystemExit('not a function')\n")

    functions = discover(workers_dir)
    assert sorted(functions) == ["alpha", "bad-options", "beta", "broken", "idle", "syntax"]

    with running_host(workers_dir, db_url) as host:
        health = await client.get(f"{host.url}/health")
        assert health.status_code == 200
        assert health.json()["functions"] == ["alpha", "beta"]
        failed = health.json()["failed_imports"]
        assert "ModuleNotFoundError" in failed["broken"] and "not_a_module_anywhere" in failed["broken"]
        assert "SyntaxError" in failed["syntax"]
        assert "Unknown option 'queue_nmae'" in failed["bad-options"] and "queue_name" in failed["bad-options"]
        assert "does not call EdgeWorker.start" in failed["idle"]

        broken = await client.post(f"{host.url}/functions/v1/broken", headers=auth())
        assert broken.status_code == 500
        assert "'broken' failed to import: ModuleNotFoundError" in broken.json()["error"]
        assert "Traceback" not in broken.text
        status = (await client.get(f"{host.url}/functions/v1/broken/status", headers=auth())).json()
        assert status["loaded"] is False and "ModuleNotFoundError" in status["error"]

        ids = {}
        for name in ("alpha", "beta"):
            answer = await client.post(f"{host.url}/functions/v1/{name}", headers=auth())
            assert answer.json()["status"] == "started"
            ids[name] = answer.json()["worker_id"]
        for name, worker_id in ids.items():
            await wait_for(lambda w=worker_id: registered(conn, w), what=f"{name}'s worker registered")
        await conn.execute("select pgmq.send('alpha_q', '{\"to\": \"a\"}')")
        await conn.execute("select pgmq.send('beta_q', '{\"to\": \"b\"}')")
        for queue in ("alpha_q", "beta_q"):
            await wait_for(lambda q=queue: conn.fetchval(f"select count(*) = 1 from pgmq.a_{q}"),
                           what=f"the message on {queue} archived")
        alpha = host.host.functions["alpha"].spec
        beta = host.host.functions["beta"].spec
        assert alpha is not None and beta is not None
        assert alpha.handler.__globals__["handled"] == [{"to": "a"}]
        assert beta.handler.__globals__["handled"] == [{"to": "b"}]


async def test_soft_limit_starts_a_replacement_while_enabled(
        workers_dir: Path, db_url: str, client: httpx.AsyncClient, conn: asyncpg.Connection) -> None:
    write_worker(workers_dir, "short", simple_worker("short_q", max_lifetime_seconds=1))
    with running_host(workers_dir, db_url) as host:
        first = (await client.post(f"{host.url}/functions/v1/short", headers=auth())).json()

        async def replaced() -> list[asyncpg.Record] | None:
            rows = await worker_rows(conn, "short")
            live = [r for r in rows if r["stopped_at"] is None]
            return rows if len(rows) >= 2 and live else None

        rows = await wait_for(replaced, what="a replacement worker registered")
        assert str(rows[0]["worker_id"]) == first["worker_id"] and rows[0]["stopped_at"] is not None
        assert str(rows[1]["worker_id"]) != first["worker_id"]
        status = (await client.get(f"{host.url}/functions/v1/short/status", headers=auth())).json()
        old = next(w for w in status["workers"] if w["worker_id"] == first["worker_id"])
        assert old["stop_reason"].startswith("reached max_lifetime_seconds")
        assert old["after_stop"].startswith("replaced by ")

        # The replacement keeps processing.
        await conn.execute("select pgmq.send('short_q', '{\"n\": 1}')")
        await wait_for(lambda: conn.fetchval("select count(*) = 1 from pgmq.a_short_q"), what="message archived")

        # Disabled in edge_worker.functions (as `worker-runtime stop` leaves it): no more replacements.
        await conn.execute("select edge_worker.register_function('short', 'short_q', enabled => false)")

        async def declined() -> dict[str, Any] | None:
            body = (await client.get(f"{host.url}/functions/v1/short/status", headers=auth())).json()
            return next((w for w in body["workers"]
                         if (w["after_stop"] or "").startswith("not replaced: the function is disabled")), None)

        await wait_for(declined, what="a stopped worker that was not replaced")
        assert host.host.live_workers("short") == []
        assert await conn.fetchval(
            "select count(*) from edge_worker.workers where function_name = 'short' and stopped_at is null") == 0


async def test_no_starts_while_shutting_down(host: ThreadedHost, client: httpx.AsyncClient) -> None:
    host.host.accepting = False  # what the lifespan's shutdown does first
    try:
        response = await client.post(f"{host.url}/functions/v1/emails", headers=auth())
        assert response.status_code == 503 and "shutting down" in response.json()["error"]
        assert (await client.get(f"{host.url}/health")).status_code == 503
    finally:
        host.host.accepting = True


SLOW_WORKER = """
    import asyncio
    from worker_runtime import EdgeWorker

    async def handler(payload, ctx):
        await asyncio.sleep(payload["sleep"])

    EdgeWorker.start(handler, queue_name="slow_q", max_concurrent=4, shutdown_grace_seconds=3,
                     visibility_timeout=3, heartbeat_interval=0.5, max_poll_seconds=1, poll_interval_ms=50)
"""


async def test_sigterm_drains_and_exits_0(tmp_path: Path, db_url: str, client: httpx.AsyncClient,
                                          conn: asyncpg.Connection) -> None:
    write_worker(tmp_path / "workers", "slow", SLOW_WORKER)
    env_file = tmp_path / "functions.env"
    env_file.write_text(f"EDGE_WORKER_DB_URL={db_url}\nEDGE_WORKER_AUTH_SECRET={SECRET}\n")
    host = HostProcess(tmp_path, env_file=str(env_file)).start()
    try:
        started = (await client.post(f"{host.url}/functions/v1/slow", headers=auth())).json()
        assert started["status"] == "started"
        await wait_for(lambda: registered(conn, started["worker_id"]), what="the worker registered")
        # Three finish within the 3 s grace period, one would take a minute.
        await conn.execute("select pgmq.send_batch('slow_q', $1::jsonb[])",
                           [{"sleep": 1}, {"sleep": 1.5}, {"sleep": 1}, {"sleep": 60}])

        async def all_in_flight() -> bool:
            body = (await client.get(f"{host.url}/functions/v1/slow/status", headers=auth())).json()
            return body["workers"][0]["in_flight"] == 4

        await wait_for(all_in_flight, what="all four messages in flight")
        host.signal(signal.SIGTERM)
        assert host.wait(60) == 0, host.log()
    finally:
        host.kill()

    log = host.log()
    assert "Stopping worker: the function host is shutting down" in log
    assert "Aborting 1 handler(s) still running after the grace period" in log
    archived = await conn.fetch("select message from pgmq.a_slow_q")
    queued = await conn.fetch("select message from pgmq.q_slow_q")
    assert sorted(r["message"]["sleep"] for r in archived) == [1, 1, 1.5]
    assert [r["message"]["sleep"] for r in queued] == [60]  # left to reappear: nothing lost
    assert await conn.fetchval("select count(*) from edge_worker.dead_letters") == 0
    assert await conn.fetchval("select stopped_at is not null from edge_worker.workers where worker_id = $1",
                               uuid.UUID(started["worker_id"]))
    assert SECRET not in log and "test-pass" not in log
