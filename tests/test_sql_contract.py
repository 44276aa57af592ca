"""Behaviour of every function and view in the edge_worker SQL contract, on real PostgreSQL
with real PGMQ and pg_cron. Time-dependent checks wait on a condition with a deadline."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import pytest

from tests.pgcluster import PgCluster
from tests.waiting import wait_for

QUEUE = "tasks"
ERROR = {"type": "ValueError", "message": "bad payload", "traceback": "Traceback (most recent call last): ..."}


@pytest.fixture
async def queue(conn: asyncpg.Connection) -> str:
    await conn.execute("select pgmq.create($1)", QUEUE)
    return QUEUE


async def send(conn: asyncpg.Connection, queue: str, payload: Any) -> int:
    return await conn.fetchval("select * from pgmq.send($1, $2::jsonb)", queue, json.dumps(payload))


async def read(conn: asyncpg.Connection, queue: str, vt: int = 30, qty: int = 10) -> list[asyncpg.Record]:
    return await conn.fetch("select msg_id, read_ct, vt, message from pgmq.read($1, $2, $3)", queue, vt, qty)


async def fail(
    conn: asyncpg.Connection, queue: str, msg_id: int, *, retry_limit: int, retry_delay: int,
    worker_id: uuid.UUID | None = None, function_name: str | None = None,
) -> str:
    return await conn.fetchval(
        "select edge_worker.fail($1, $2, $3::jsonb, $4, $5, $6, $7)",
        queue, msg_id, json.dumps(ERROR), retry_limit, retry_delay, worker_id, function_name,
    )


async def queue_count(conn: asyncpg.Connection, queue: str) -> int:
    return await conn.fetchval(f"select count(*) from pgmq.q_{queue}")


# Workers ----------------------------------------------------------------------------------


async def register(conn: asyncpg.Connection, function_name: str = "fn", version: str | None = None) -> uuid.UUID:
    worker_id = uuid.uuid4()
    await conn.execute(
        "select edge_worker.register_worker($1, $2, $3, $4, 'host-1', 4242)",
        worker_id, QUEUE, function_name, version,
    )
    return worker_id


async def heartbeat(conn: asyncpg.Connection, worker_id: uuid.UUID) -> bool:
    return await conn.fetchval("select edge_worker.heartbeat($1)", worker_id)


async def test_register_worker_records_the_worker(conn: asyncpg.Connection) -> None:
    worker_id = await register(conn, version="v1")
    row = await conn.fetchrow("select * from edge_worker.workers where worker_id = $1", worker_id)
    assert (row["queue_name"], row["function_name"], row["version"], row["host"], row["pid"]) == (
        QUEUE, "fn", "v1", "host-1", 4242,
    )
    assert row["stopped_at"] is None and row["deprecated_at"] is None
    assert row["started_at"] is not None and row["last_heartbeat_at"] is not None


async def test_heartbeat_true_then_false_after_deprecation(conn: asyncpg.Connection) -> None:
    worker_id = await register(conn)
    await conn.execute(
        "update edge_worker.workers set last_heartbeat_at = now() - interval '1 minute' where worker_id = $1",
        worker_id,
    )
    assert await heartbeat(conn, worker_id) is True
    assert await conn.fetchval(
        "select last_heartbeat_at > now() - interval '5 seconds' from edge_worker.workers where worker_id = $1",
        worker_id,
    ), "heartbeat must refresh last_heartbeat_at"

    assert await conn.fetchval("select edge_worker.deprecate_workers('fn')") == 1
    assert await heartbeat(conn, worker_id) is False
    assert await conn.fetchval("select edge_worker.deprecate_workers('fn')") == 0, "already deprecated"


async def test_deprecate_workers_keep_version_spares_the_new_version(conn: asyncpg.Connection) -> None:
    old = await register(conn, version="v1")
    unversioned = await register(conn, version=None)
    new = await register(conn, version="v2")
    other_function = await register(conn, function_name="other", version="v1")

    assert await conn.fetchval("select edge_worker.deprecate_workers('fn', keep_version => 'v2')") == 2
    assert await heartbeat(conn, old) is False
    assert await heartbeat(conn, unversioned) is False
    assert await heartbeat(conn, new) is True
    assert await heartbeat(conn, other_function) is True


async def test_heartbeat_unknown_worker_is_false(conn: asyncpg.Connection) -> None:
    assert await heartbeat(conn, uuid.uuid4()) is False


async def test_mark_worker_stopped(conn: asyncpg.Connection) -> None:
    worker_id = await register(conn)
    await conn.execute("select edge_worker.mark_worker_stopped($1)", worker_id)
    stopped_at = await conn.fetchval("select stopped_at from edge_worker.workers where worker_id = $1", worker_id)
    assert stopped_at is not None
    assert await heartbeat(conn, worker_id) is False
    # Stopping twice keeps the first stop time.
    await conn.execute("select edge_worker.mark_worker_stopped($1)", worker_id)
    assert await conn.fetchval(
        "select stopped_at from edge_worker.workers where worker_id = $1", worker_id
    ) == stopped_at
    assert await conn.fetchval("select count(*) from edge_worker.active_workers") == 0
    assert await conn.fetchval("select count(*) from edge_worker.inactive_workers") == 0


async def test_active_and_inactive_views_use_a_six_second_window(conn: asyncpg.Connection) -> None:
    fresh = await register(conn)
    stale = await register(conn)
    borderline = await register(conn)
    stopped = await register(conn)
    await conn.execute(
        "update edge_worker.workers set last_heartbeat_at = now() - interval '7 seconds' where worker_id = $1", stale
    )
    await conn.execute(
        "update edge_worker.workers set last_heartbeat_at = now() - interval '5 seconds' where worker_id = $1",
        borderline,
    )
    await conn.execute("select edge_worker.mark_worker_stopped($1)", stopped)

    active = {r["worker_id"] for r in await conn.fetch("select worker_id from edge_worker.active_workers")}
    inactive = {r["worker_id"] for r in await conn.fetch("select worker_id from edge_worker.inactive_workers")}
    assert active == {fresh, borderline}
    assert inactive == {stale}

    seed_columns = ["worker_id", "queue_name", "function_name", "started_at", "stopped_at", "last_heartbeat_at"]
    for view in ("active_workers", "inactive_workers"):
        columns = await conn.fetch(
            "select column_name from information_schema.columns"
            " where table_schema = 'edge_worker' and table_name = $1 order by ordinal_position",
            view,
        )
        assert [c["column_name"] for c in columns] == seed_columns

    # A heartbeat brings the stale worker back.
    assert await heartbeat(conn, stale) is True
    assert await conn.fetchval("select count(*) from edge_worker.active_workers where worker_id = $1", stale) == 1


# fail, extend_vt, requeue ------------------------------------------------------------------


async def test_fail_retries_after_the_delay(conn: asyncpg.Connection, queue: str) -> None:
    msg_id = await send(conn, queue, {"job": 1})
    [msg] = await read(conn, queue, vt=30)
    assert msg["msg_id"] == msg_id and msg["read_ct"] == 1

    started = time.monotonic()
    assert await fail(conn, queue, msg_id, retry_limit=3, retry_delay=2) == "retry"
    vt_in = await conn.fetchval(f"select extract(epoch from vt - clock_timestamp()) from pgmq.q_{queue}")
    assert 1.0 < vt_in <= 2.0, f"visible again in about 2 s, not {vt_in}"
    assert await read(conn, queue) == [], "invisible during the retry delay"

    [again] = await wait_for(lambda: read(conn, queue), timeout=10, what="the retried message")
    assert time.monotonic() - started >= 1.5, "the message came back before its retry delay"
    assert again["msg_id"] == msg_id and again["read_ct"] == 2
    assert json.loads(again["message"]) == {"job": 1}
    assert await conn.fetchval("select count(*) from edge_worker.dead_letters") == 0


async def test_fail_moves_to_dead_letters_after_the_limit(conn: asyncpg.Connection, queue: str) -> None:
    payload = {"job": "poison", "n": [1, 2]}
    msg_id = await send(conn, queue, payload)
    worker_id = uuid.uuid4()

    [first] = await read(conn, queue)
    assert first["read_ct"] == 1
    assert await fail(conn, queue, msg_id, retry_limit=1, retry_delay=0) == "retry"
    [second] = await wait_for(lambda: read(conn, queue), what="the retried message")
    assert second["read_ct"] == 2

    outcome = await fail(conn, queue, msg_id, retry_limit=1, retry_delay=0, worker_id=worker_id, function_name="fn")
    assert outcome == "dead_letter"

    dead = await conn.fetchrow("select * from edge_worker.dead_letters where msg_id = $1", msg_id)
    assert dead["queue_name"] == queue
    assert json.loads(dead["message"]) == payload
    assert json.loads(dead["error"]) == ERROR
    assert dead["read_ct"] == 2
    assert dead["worker_id"] == worker_id and dead["function_name"] == "fn"
    assert dead["enqueued_at"] is not None and dead["failed_at"] is not None
    assert dead["requeued_at"] is None

    assert await queue_count(conn, queue) == 0, "a dead letter leaves the queue"
    assert await conn.fetchval(f"select count(*) from pgmq.a_{queue}") == 0, "and is not archived as done"
    assert await read(conn, queue) == []
    assert await fail(conn, queue, msg_id, retry_limit=1, retry_delay=0) == "missing"


async def test_fail_with_zero_retries_dead_letters_on_first_failure(conn: asyncpg.Connection, queue: str) -> None:
    msg_id = await send(conn, queue, {"once": True})
    await read(conn, queue)
    assert await fail(conn, queue, msg_id, retry_limit=0, retry_delay=5) == "dead_letter"


async def test_fail_unknown_message_is_missing(conn: asyncpg.Connection, queue: str) -> None:
    assert await fail(conn, queue, 987654, retry_limit=3, retry_delay=1) == "missing"


async def test_fail_rejects_negative_arguments(conn: asyncpg.Connection, queue: str) -> None:
    msg_id = await send(conn, queue, {})
    with pytest.raises(asyncpg.RaiseError, match="must be >= 0"):
        await fail(conn, queue, msg_id, retry_limit=-1, retry_delay=1)


async def test_contract_works_with_mixed_case_queue_names(conn: asyncpg.Connection) -> None:
    """PGMQ (1.4.4 and later) lowercases queue table names; edge_worker must find them too."""
    await conn.execute("select pgmq.create('MixedCase')")
    msg_id = await send(conn, "MixedCase", {"a": 1})
    await read(conn, "MixedCase")
    assert await conn.fetch("select * from edge_worker.extend_vt('MixedCase', array[$1::bigint], 30)", msg_id)
    assert await fail(conn, "MixedCase", msg_id, retry_limit=0, retry_delay=0) == "dead_letter"
    rows = await conn.fetch("select * from edge_worker.requeue_dead_letters('MixedCase')")
    assert len(rows) == 1
    await conn.execute("select edge_worker.enable_notify('MixedCase')")


async def test_extend_vt_keeps_messages_invisible(conn: asyncpg.Connection, queue: str) -> None:
    kept = await send(conn, queue, {"kept": True})
    control = await send(conn, queue, {"kept": False})
    msgs = await read(conn, queue, vt=1)
    assert {m["msg_id"] for m in msgs} == {kept, control}
    original_vt = max(m["vt"] for m in msgs)

    extended = await conn.fetch(
        "select * from edge_worker.extend_vt($1, $2::bigint[], 30)", queue, [kept, 424242]
    )
    assert [r[0] for r in extended] == [kept], "returns the ids still on the queue"

    await wait_for(
        lambda: conn.fetchval("select clock_timestamp() > $1::timestamptz + interval '200 ms'", original_vt),
        what="the original visibility timeout to pass",
    )
    [back] = await wait_for(lambda: read(conn, queue), what="the control message")
    assert back["msg_id"] == control, "only the message whose vt was not extended comes back"
    assert await read(conn, queue) == []
    vt_in = await conn.fetchval(
        f"select extract(epoch from vt - clock_timestamp()) from pgmq.q_{queue} where msg_id = $1", kept
    )
    assert 25 < vt_in <= 30


async def dead_letter(conn: asyncpg.Connection, queue: str, payload: Any) -> int:
    msg_id = await send(conn, queue, payload)
    await conn.fetch("select * from pgmq.read($1, 30, 1)", queue)
    assert await fail(conn, queue, msg_id, retry_limit=0, retry_delay=0) == "dead_letter"
    return await conn.fetchval("select id from edge_worker.dead_letters where msg_id = $1", msg_id)


async def test_requeue_dead_letters_puts_them_back(conn: asyncpg.Connection, queue: str) -> None:
    first = await dead_letter(conn, queue, {"n": 1})
    second = await dead_letter(conn, queue, {"n": 2})
    assert await queue_count(conn, queue) == 0

    rows = await conn.fetch("select * from edge_worker.requeue_dead_letters($1, array[$2::bigint])", queue, first)
    assert [r["dead_letter_id"] for r in rows] == [first]
    new_msg_id = rows[0]["msg_id"]

    [msg] = await read(conn, queue)
    assert msg["msg_id"] == new_msg_id and msg["read_ct"] == 1
    assert json.loads(msg["message"]) == {"n": 1}
    requeued = await conn.fetchrow("select requeued_at, requeued_msg_id from edge_worker.dead_letters where id = $1", first)
    assert requeued["requeued_at"] is not None and requeued["requeued_msg_id"] == new_msg_id
    assert await conn.fetchval("select requeued_at from edge_worker.dead_letters where id = $1", second) is None

    # Without ids: the rest of the queue's dead letters; already requeued ones are not sent twice.
    rest = await conn.fetch("select * from edge_worker.requeue_dead_letters($1)", queue)
    assert [r["dead_letter_id"] for r in rest] == [second]
    assert await conn.fetch("select * from edge_worker.requeue_dead_letters($1)", queue) == []
    assert [json.loads(m["message"]) for m in await read(conn, queue)] == [{"n": 2}]


# Functions registry -------------------------------------------------------------------------


async def test_register_function_and_stop_function(conn: asyncpg.Connection) -> None:
    await conn.execute("select edge_worker.register_function('mailer', 'emails', version => 'v1')")
    row = await conn.fetchrow("select * from edge_worker.functions where function_name = 'mailer'")
    assert (row["queue_name"], row["url"], row["enabled"], row["min_workers"], row["version"]) == (
        "emails", None, True, 1, "v1",
    )
    assert row["debounce"].total_seconds() == 10

    await conn.execute("update edge_worker.functions set last_invoked_at = now() where function_name = 'mailer'")
    await conn.execute(
        "select edge_worker.register_function('mailer', 'emails2', url => 'http://host:9000', min_workers => 2,"
        " debounce => '3 seconds')"
    )
    row = await conn.fetchrow("select * from edge_worker.functions where function_name = 'mailer'")
    assert (row["queue_name"], row["url"], row["min_workers"]) == ("emails2", "http://host:9000", 2)
    assert row["debounce"].total_seconds() == 3
    assert row["version"] == "v1", "re-registering without a version keeps the known one"
    assert row["last_invoked_at"] is not None, "re-registering leaves last_invoked_at alone"

    live = await register(conn, function_name="mailer")
    assert await conn.fetchval("select edge_worker.stop_function('mailer')") == 1
    assert await conn.fetchval("select enabled from edge_worker.functions where function_name = 'mailer'") is False
    assert await heartbeat(conn, live) is False

    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("select edge_worker.register_function('Bad Name!', 'q')")


async def test_enable_notify_sends_a_notification_per_send(
    conn: asyncpg.Connection, db_url: str, queue: str
) -> None:
    await conn.execute("select edge_worker.enable_notify($1)", queue)
    await conn.execute("select edge_worker.enable_notify($1)", queue)  # idempotent
    triggers = await conn.fetchval(
        "select count(*) from pg_trigger where tgrelid = $1::regclass and tgname = 'edge_worker_notify'",
        f"pgmq.q_{queue}",
    )
    assert triggers == 1

    listener = await asyncpg.connect(db_url)
    received: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener(f"edge_worker_{queue}", lambda *args: received.put_nowait(args[2]))
        await send(conn, queue, {"wake": "up"})
        channel = await asyncio.wait_for(received.get(), timeout=5)
        assert channel == f"edge_worker_{queue}"
    finally:
        await listener.close()


# ensure_workers -----------------------------------------------------------------------------


@dataclass
class Recorder:
    """A real HTTP server on 127.0.0.1 that records each request it gets."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def paths(self) -> list[str]:
        with self.lock:
            return [r["path"] for r in self.requests]


@pytest.fixture
def http_recorder() -> Iterator[Callable[[], Recorder]]:
    servers: list[ThreadingHTTPServer] = []

    def start() -> Recorder:
        recorder = Recorder()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with recorder.lock:
                    recorder.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": json.loads(body or b"null")}
                    )
                self.send_response(202)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"ok": true}')

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        recorder.url = f"http://127.0.0.1:{server.server_address[1]}"
        return recorder

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


SECRET = "s3cret-token"


async def put_secret(conn: asyncpg.Connection, name: str, value: str) -> None:
    await conn.execute("select vault.create_secret($1, $2)", value, name)


async def ensure_workers(conn: asyncpg.Connection) -> dict[str, asyncpg.Record]:
    rows = await conn.fetch("select * from edge_worker.ensure_workers()")
    return {r["function_name"]: r for r in rows}


async def test_ensure_workers_starts_only_functions_that_need_a_worker(
    conn: asyncpg.Connection, http_recorder: Callable[[], Recorder]
) -> None:
    vault_host = http_recorder()
    own_host = http_recorder()
    await put_secret(conn, "edge_worker_url", vault_host.url + "/")
    await put_secret(conn, "edge_worker_auth_secret", SECRET)

    await conn.execute("select edge_worker.register_function('needs-one', 'q1')")
    await conn.execute("select edge_worker.register_function('alive', 'q2')")
    await conn.execute("select edge_worker.register_function('off', 'q3', enabled => false)")
    await conn.execute("select edge_worker.register_function('own-url', 'q4', url => $1)", own_host.url)
    await conn.execute("select edge_worker.register_function('stale', 'q5')")
    await conn.execute("select edge_worker.register_function('deprecated', 'q6')")
    await conn.execute("select edge_worker.register_function('wants-two', 'q7', min_workers => 2)")
    await conn.execute("select edge_worker.register_function('none-wanted', 'q8', min_workers => 0)")

    await heartbeat(conn, await register(conn, function_name="alive"))
    stale = await register(conn, function_name="stale")
    await conn.execute(
        "update edge_worker.workers set last_heartbeat_at = now() - interval '7 seconds' where worker_id = $1", stale
    )
    await register(conn, function_name="deprecated")
    await conn.execute("select edge_worker.deprecate_workers('deprecated')")
    await register(conn, function_name="wants-two")

    result = await ensure_workers(conn)
    assert set(result) == {"needs-one", "alive", "own-url", "stale", "deprecated", "wants-two", "none-wanted"}, (
        "one row per enabled function; disabled ones are left alone"
    )
    started = {name for name, row in result.items() if row["invoked"]}
    assert started == {"needs-one", "own-url", "stale", "deprecated", "wants-two"}
    assert result["alive"]["reason"] == "alive" and result["alive"]["request_id"] is None
    assert result["none-wanted"]["reason"] == "alive"
    assert all(result[name]["reason"] == "started" and result[name]["request_id"] for name in started)

    expected_vault_paths = {f"/functions/v1/{n}" for n in ("needs-one", "stale", "deprecated", "wants-two")}
    await wait_for(
        lambda: len(vault_host.requests) >= 4 and len(own_host.requests) >= 1,
        what="the worker hosts to receive the start requests",
    )
    assert sorted(vault_host.paths()) == sorted(expected_vault_paths)
    assert own_host.paths() == ["/functions/v1/own-url"], "functions.url overrides the Vault URL"
    for request in vault_host.requests + own_host.requests:
        assert request["headers"]["Authorization"] == f"Bearer {SECRET}"
        assert request["headers"]["Content-Type"] == "application/json"
        assert request["body"]["function_name"] == request["path"].rsplit("/", 1)[1]

    # pg_net's response table has the requests under the returned ids.
    logged = await conn.fetch(
        "select id, url, status_code from net._http_response where id = any($1::bigint[])",
        [result[name]["request_id"] for name in started],
    )
    assert len(logged) == len(started) and all(r["status_code"] == 202 for r in logged)
    assert await conn.fetchval(
        "select count(*) from edge_worker.functions where last_invoked_at is not null"
    ) == len(started)


async def test_ensure_workers_debounces(conn: asyncpg.Connection, http_recorder: Callable[[], Recorder]) -> None:
    host = http_recorder()
    await put_secret(conn, "edge_worker_url", host.url)
    await put_secret(conn, "edge_worker_auth_secret", SECRET)
    await conn.execute("select edge_worker.register_function('fn', 'q', debounce => '1 minute')")

    first = await ensure_workers(conn)
    second = await ensure_workers(conn)
    assert first["fn"]["invoked"] is True
    assert second["fn"]["invoked"] is False and second["fn"]["reason"] == "debounced"
    await wait_for(lambda: len(host.requests) >= 1, what="the start request")
    assert host.paths() == ["/functions/v1/fn"], "two calls within the debounce start one worker"

    # Once the debounce has passed, a function still without a worker is started again.
    await conn.execute("update edge_worker.functions set last_invoked_at = now() - interval '2 minutes'")
    assert (await ensure_workers(conn))["fn"]["invoked"] is True
    await wait_for(lambda: len(host.requests) >= 2, what="the second start request")


async def test_ensure_workers_reports_missing_url_and_secret(conn: asyncpg.Connection) -> None:
    await conn.execute("select edge_worker.register_function('fn', 'q')")
    assert (await ensure_workers(conn))["fn"]["reason"].startswith("no url")
    await put_secret(conn, "edge_worker_url", "http://127.0.0.1:9")
    row = (await ensure_workers(conn))["fn"]
    assert row["invoked"] is False and row["reason"].startswith("no auth secret")
    assert await conn.fetchval("select count(*) from net._http_response") == 0


async def test_ensure_workers_needs_pg_net(conn: asyncpg.Connection) -> None:
    await conn.execute("drop schema net cascade")
    with pytest.raises(asyncpg.RaiseError, match="needs pg_net.*create extension pg_net"):
        await conn.fetch("select * from edge_worker.ensure_workers()")


async def test_ensure_workers_needs_vault(conn: asyncpg.Connection) -> None:
    await conn.execute("drop schema vault cascade")
    with pytest.raises(asyncpg.RaiseError, match="needs Supabase Vault"):
        await conn.fetch("select * from edge_worker.ensure_workers()")


# setup_keepalive (pg_cron lives in the `postgres` database only) ---------------------------


@pytest.fixture
async def cron_conn(pg: PgCluster) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg.url())
    unschedule = (
        "select cron.unschedule(jobid) from cron.job where jobname = 'edge_worker_keepalive'"
    )
    await connection.execute(unschedule)
    try:
        yield connection
    finally:
        await connection.execute(unschedule)
        await connection.close()


async def keepalive_jobs(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        "select jobid, jobname, schedule, command, database from cron.job where jobname = 'edge_worker_keepalive'"
    )


async def test_setup_keepalive_is_idempotent(cron_conn: asyncpg.Connection) -> None:
    ids = [await cron_conn.fetchval("select edge_worker.setup_keepalive('* * * * *')") for _ in range(3)]
    jobs = await keepalive_jobs(cron_conn)
    assert len(jobs) == 1, "exactly one keep-alive job however often it is set up"
    job = jobs[0]
    assert job["command"] == "select edge_worker.ensure_workers()"
    assert job["schedule"] == "* * * * *" and job["database"] == "postgres"
    assert set(ids) == {job["jobid"]}

    # A new schedule replaces the job's schedule rather than adding a job.
    await cron_conn.fetchval("select edge_worker.setup_keepalive('*/2 * * * *')")
    jobs = await keepalive_jobs(cron_conn)
    assert [(j["jobid"], j["schedule"]) for j in jobs] == [(job["jobid"], "*/2 * * * *")]


async def test_setup_keepalive_explains_a_refused_schedule(cron_conn: asyncpg.Connection) -> None:
    version = await cron_conn.fetchval("select extversion from pg_extension where extname = 'pg_cron'")
    assert version.startswith("1.4"), f"this test expects Debian 12's pg_cron 1.4, found {version}"
    await cron_conn.fetchval("select edge_worker.setup_keepalive('* * * * *')")
    with pytest.raises(asyncpg.RaiseError) as caught:
        await cron_conn.fetchval("select edge_worker.setup_keepalive('5 seconds')")
    assert 'refused the keep-alive schedule "5 seconds"' in str(caught.value)
    hint = caught.value.hint or ""
    assert "cron syntax" in hint and "'* * * * *'" in hint and "pg_cron 1.5" in hint
    jobs = await keepalive_jobs(cron_conn)
    assert [j["schedule"] for j in jobs] == ["* * * * *"], "a refused schedule leaves the job as it was"


async def test_setup_keepalive_needs_pg_cron(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval("select to_regnamespace('cron')") is None, "clones have no pg_cron"
    with pytest.raises(asyncpg.RaiseError, match='needs pg_cron: run "create extension pg_cron;"'):
        await conn.fetchval("select edge_worker.setup_keepalive('* * * * *')")


async def test_requeue_keeps_headers_where_pgmq_has_them(conn: asyncpg.Connection, queue: str) -> None:
    # PGMQ 1.5+ (1.13 here) stores headers; a requeued dead letter carries them again.
    msg_id = await conn.fetchval(
        "select pgmq.send($1, $2::jsonb, $3::jsonb, 0)", queue, json.dumps({"n": 1}), json.dumps({"trace": "abc"}))
    await conn.fetch("select * from pgmq.read($1, 30, 1)", queue)
    assert await fail(conn, queue, msg_id, retry_limit=0, retry_delay=0) == "dead_letter"
    assert json.loads(await conn.fetchval("select headers from edge_worker.dead_letters")) == {"trace": "abc"}
    await conn.fetch("select * from edge_worker.requeue_dead_letters($1)", queue)
    [msg] = await conn.fetch("select * from pgmq.read($1, 30, 1)", queue)
    assert json.loads(msg["headers"]) == {"trace": "abc"} and json.loads(msg["message"]) == {"n": 1}
