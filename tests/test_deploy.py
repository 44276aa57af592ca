"""`python scripts/deploy.py WORKER_NAME` in a generated project, end to end.

Everything is real but the Management API: the pinned Supabase CLI (`db push --db-url` to
the test PostgreSQL; `secrets list/set` through a CLI profile to the local stand-in in
tests/fake_management_api.py), a `worker-runtime serve` host process serving the
project's workers/, and the deploy script run as a user runs it, in a subprocess.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest

from tests.fake_management_api import ACCESS_TOKEN, PROJECT_REF, FakeManagementApi
from tests.host_helpers import HostProcess
from tests.pgcluster import STAND_INS, PgCluster, free_port
from tests.supabase_cli import cli_env, find_supabase
from tests.template_kit import REPO_ROOT, git, make_kit_repo, read_env, render
from tests.waiting import wait_for
from worker_runtime import db
from worker_runtime.migrate import install_pgmq_sql
from worker_runtime.versioning import folder_version

NAME = "mailer"
QUEUE = "mail"


def worker_source(runs: Path, tag: str) -> str:
    """A handler that records each run as '<tag> <msg_id>' in `runs` (outside workers/)."""
    return textwrap.dedent(f'''\
        """Worker function '{NAME}' for the deploy tests ({tag})."""
        import asyncio

        from worker_runtime import EdgeWorker

        RUNS = {str(runs)!r}
        TAG = {tag!r}


        async def handler(payload, ctx):
            await asyncio.sleep(0.02)
            with open(RUNS, "a") as f:
                f.write(TAG + " " + str(ctx.msg_id) + "\\n")


        EdgeWorker.start(handler, queue_name={QUEUE!r}, heartbeat_interval=0.5, max_poll_seconds=1,
                         poll_interval_ms=50, visibility_timeout=5, shutdown_grace_seconds=10)
    ''')


async def bare_database(pg: PgCluster) -> str:
    """What a Supabase project has before the first deploy: PGMQ, Vault, pg_net (stand-ins)."""
    name = f"deploy_{uuid.uuid4().hex[:12]}"
    url = await pg.create_database(name, template="template0")
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(STAND_INS.read_text())
        await install_pgmq_sql(conn)
    finally:
        await conn.close()
    return url


class DeployEnv:
    """A generated project, its database, a running worker host and the Management API stand-in."""

    first: subprocess.CompletedProcess[str] | None = None  # the `deployed` fixture's deploy
    v1 = ""  # its version

    def __init__(self, root: Path, pg: PgCluster, kit: Path, api: FakeManagementApi) -> None:
        self.root = root
        self.pg = pg
        self.api = api
        self.db_name = ""
        self.db_url = asyncio.run(bare_database(pg))
        self.db_name = self.db_url.rsplit("/", 1)[1]
        self.push_url = f"{self.db_url}?sslmode=disable"
        self.project = root / "project"
        self.project.mkdir()
        git(self.project, "init", "-q")
        render(kit, self.project, worker_name=NAME, queue_name=QUEUE)
        self.runs = root / "runs.txt"
        self.runs.touch()
        self.write_worker("v1")
        self.home = root / "home"
        self.home.mkdir()
        self.profile = api.profile(root)
        self.secret = read_env(self.project)["EDGE_WORKER_AUTH_SECRET"]
        self.host = HostProcess(self.project, env=self.host_env(self.db_url))
        (self.project / "supabase" / "functions" / ".env").write_text(
            f"EDGE_WORKER_DB_URL={self.db_url}\nEDGE_WORKER_URL={self.host.url}\n"
            f"EDGE_WORKER_AUTH_SECRET={self.secret}\n")
        self.host.start()

    def host_env(self, db_url: str) -> dict[str, str]:
        return {"EDGE_WORKER_DB_URL": db_url, "EDGE_WORKER_AUTH_SECRET": self.secret}

    @property
    def folder(self) -> Path:
        return self.project / "workers" / NAME

    def write_worker(self, tag: str) -> str:
        (self.folder / "worker.py").write_text(worker_source(self.runs, tag))
        return folder_version(self.folder)

    def secrets(self) -> list[str]:
        password = self.pg.password
        return [password, quote(password, safe=""), self.secret, ACCESS_TOKEN]

    def deploy(self, *extra: str, name: str = NAME, env: dict[str, str] | None = None,
               unset: tuple[str, ...] = (), cli: bool = True) -> subprocess.CompletedProcess[str]:
        """`python scripts/deploy.py` as a user runs it; later flags override earlier ones."""
        args = [name, "--project-ref", PROJECT_REF, "--db-url", self.push_url, "--profile", str(self.profile),
                "--yes", "--timeout", "30"]
        if cli:
            args += ["--supabase-bin", find_supabase()]
        base = {k: v for k, v in cli_env(self.home).items()
                if not k.startswith(("EDGE_WORKER_", "SUPABASE_ACCESS", "SUPABASE_PROJECT", "SUPABASE_BIN"))}
        base.update({"PYTHONPATH": str(REPO_ROOT), "SUPABASE_ACCESS_TOKEN": ACCESS_TOKEN, **(env or {})})
        for key in unset:
            base.pop(key, None)
        result = subprocess.run([sys.executable, "scripts/deploy.py", *args, *extra], cwd=self.project, env=base,
                                capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
        output = result.stdout + result.stderr
        for secret in self.secrets():
            assert secret not in output, "a secret appeared in the deploy output"
        return result

    def runs_by_msg(self) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        for line in self.runs.read_text().splitlines():
            tag, msg_id = line.split()
            found.setdefault(int(msg_id), []).append(tag)
        return found

    def close(self) -> None:
        self.host.kill()
        if self.db_name:
            asyncio.run(self.pg.drop_database(self.db_name))


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_kit_repo(tmp_path_factory.mktemp("deploy-kit") / "supabase-worker-kit")


@pytest.fixture(scope="module")
def api() -> Iterator[FakeManagementApi]:
    with FakeManagementApi() as stand_in:
        yield stand_in


def make_env(tmp_path_factory: pytest.TempPathFactory, pg: PgCluster, kit: Path,
             api: FakeManagementApi) -> DeployEnv:
    return DeployEnv(tmp_path_factory.mktemp("deploy"), pg, kit, api)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, pg: PgCluster, kit: Path,
             api: FakeManagementApi) -> Iterator[DeployEnv]:
    """One project deployed once (version v1): the failure tests deploy over it and check
    that the v1 worker keeps running. Each test restores what it changes."""
    env = make_env(tmp_path_factory, pg, kit, api)
    try:
        env.first = env.deploy()
        env.v1 = folder_version(env.folder)
        yield env
    finally:
        env.close()


@pytest.fixture
def fresh(tmp_path_factory: pytest.TempPathFactory, pg: PgCluster, kit: Path,
          api: FakeManagementApi) -> Iterator[DeployEnv]:
    env = make_env(tmp_path_factory, pg, kit, api)
    try:
        yield env
    finally:
        env.close()


@pytest.fixture
async def conn_of(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """conn_of(env): a connection to that env's database, closed after the test."""
    opened: list[asyncpg.Connection] = []

    async def open_(env: DeployEnv) -> asyncpg.Connection:
        opened.append(await db.connect(env.db_url))
        return opened[-1]

    yield open_
    for conn in opened:
        await conn.close()


async def live_workers(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        "select worker_id::text, version from edge_worker.workers where function_name = $1 and stopped_at is null "
        "and deprecated_at is null and last_heartbeat_at > now() - interval '3 seconds' order by started_at", NAME)


async def next_heartbeat(conn: asyncpg.Connection) -> None:
    """Wait until every worker of the function heartbeat again: a deprecation, stop or stray
    start made before now shows by then."""
    since = await conn.fetchval("select now()")
    await wait_for(lambda: conn.fetchval(
        "select bool_and(last_heartbeat_at > $2) from edge_worker.workers"
        " where function_name = $1 and stopped_at is null", NAME, since), timeout=10, what="the next heartbeat")


async def assert_still_runs(conn: asyncpg.Connection, env: DeployEnv) -> None:
    """The v1 deploy is untouched: its worker heartbeats, undeprecated; the keep-alive still
    points at the first host and the function's version is still v1."""
    v1 = env.v1
    await next_heartbeat(conn)
    rows = await live_workers(conn)
    assert [r["version"] for r in rows] == [v1], rows
    assert await conn.fetchval("select version from edge_worker.functions where function_name = $1", NAME) == v1
    assert await conn.fetchval(
        "select decrypted_secret from vault.decrypted_secrets where name = 'edge_worker_url'") == env.host.url


def expect_failure(result: subprocess.CompletedProcess[str], step: str, *phrases: str) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    err = result.stderr
    assert f"({step}):" in err, err
    assert "deploy: fix: " in err and "The previous version keeps running" in err, err
    for phrase in phrases:
        assert phrase in err, f"{phrase!r} not in:\n{err}"
    return err


# -- the first deploy -----------------------------------------------------------------------------


async def test_first_deploy_end_to_end(deployed: DeployEnv, conn_of: Any, api: FakeManagementApi) -> None:
    first = deployed.first
    assert first is not None
    v1 = deployed.v1
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    for number, step in enumerate(("preflight", "migrations", "start", "verify", "secrets", "hand-over"), 1):
        assert f"[{number}/6] {step}: " in out, out
    assert out.count("      ok (") == 6, out
    assert f"Deployed '{NAME}' version {v1}" in out and "worker-runtime status" in out
    assert "db push --db-url 'postgresql://postgres:***@127.0.0.1" in out

    conn = await conn_of(deployed)
    migrations = sorted(p.name.split("_", 1)[0] for p in (deployed.project / "supabase" / "migrations").glob("*.sql"))
    assert [r["version"] for r in await conn.fetch(
        "select version from supabase_migrations.schema_migrations order by 1")] == migrations
    row = await conn.fetchrow("select queue_name, version, enabled from edge_worker.functions where function_name = $1",
                              NAME)
    assert tuple(row) == (QUEUE, v1, True)
    rows = await live_workers(conn)
    assert [r["version"] for r in rows] == [v1]
    assert rows[0]["worker_id"] in out
    vault = dict(await conn.fetch("select name, decrypted_secret from vault.decrypted_secrets"))
    assert vault == {"edge_worker_url": deployed.host.url, "edge_worker_auth_secret": deployed.secret}

    posted = api.posted_secrets()
    assert posted, "supabase secrets set reached the Management API stand-in"
    assert {s["name"]: s["value"] for s in posted[0]} == {
        "EDGE_WORKER_DB_URL": deployed.db_url, "EDGE_WORKER_URL": deployed.host.url,
        "EDGE_WORKER_AUTH_SECRET": deployed.secret}
    assert all(r.headers.get("Authorization") == f"Bearer {ACCESS_TOKEN}" for r in api.requests
               if r.path.startswith(f"/v1/projects/{PROJECT_REF}"))

    # The deployed worker runs messages.
    msg_id = await conn.fetchval("select pgmq.send($1, $2::jsonb)", QUEUE, {"hello": "world"})
    await wait_for(lambda: msg_id in deployed.runs_by_msg(), timeout=20, what="the message to run")
    assert deployed.runs_by_msg()[msg_id] == ["v1"]


# -- the hand-over ----------------------------------------------------------------------------------


async def test_second_deploy_hands_over_without_losing_or_repeating_a_message(
        fresh: DeployEnv, conn_of: Any) -> None:
    first = await asyncio.to_thread(fresh.deploy)
    assert first.returncode == 0, first.stdout + first.stderr
    conn = await conn_of(fresh)
    producer_conn = await conn_of(fresh)
    (old,) = await live_workers(conn)

    sent: list[int] = []
    stop = asyncio.Event()

    async def produce() -> None:
        while not stop.is_set():
            sent.append(await producer_conn.fetchval("select pgmq.send($1, $2::jsonb)", QUEUE, {"n": len(sent)}))
            await asyncio.sleep(0.02)

    producer = asyncio.create_task(produce())
    try:
        await wait_for(lambda: len(fresh.runs_by_msg()) >= 5, timeout=20, what="v1 to run messages")
        v2 = fresh.write_worker("v2")
        second = await asyncio.to_thread(fresh.deploy)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "deprecated 1 worker(s) of other versions" in second.stdout, second.stdout
        assert "the old workers finished their messages and stopped" in second.stdout, second.stdout
        await wait_for(lambda: sum(tags == ["v2"] for tags in fresh.runs_by_msg().values()) >= 5,
                       timeout=20, what="v2 to run messages")
    finally:
        stop.set()
        await producer

    await wait_for(lambda: set(sent) <= set(fresh.runs_by_msg()), timeout=30, what="every message to run")
    runs = fresh.runs_by_msg()
    assert set(runs) == set(sent), "only the sent messages ran"
    assert {m: t for m, t in runs.items() if len(t) != 1} == {}, "no message ran twice"
    assert await conn.fetchval(f"select count(*) from pgmq.a_{QUEUE}") == len(sent), "every message archived"
    assert await conn.fetchval(f"select count(*) from pgmq.q_{QUEUE}") == 0
    # the running host served the new code without a restart
    assert {t for tags in runs.values() for t in tags} == {"v1", "v2"}

    old_row = await conn.fetchrow("select deprecated_at, stopped_at from edge_worker.workers where worker_id = $1",
                                  uuid.UUID(old["worker_id"]))
    assert old_row["deprecated_at"] is not None and old_row["stopped_at"] is not None
    assert [r["version"] for r in await live_workers(conn)] == [v2]
    assert await conn.fetchval("select version from edge_worker.functions where function_name = $1", NAME) == v2


# -- dry run ----------------------------------------------------------------------------------------


async def test_dry_run_prints_the_plan_and_changes_nothing(
        deployed: DeployEnv, conn_of: Any, api: FakeManagementApi) -> None:
    conn = await conn_of(deployed)

    async def state() -> tuple[Any, ...]:
        return (
            [tuple(r) for r in await conn.fetch("select worker_id, version, deprecated_at, stopped_at "
                                                "from edge_worker.workers order by started_at")],
            [tuple(r) for r in await conn.fetch("select * from edge_worker.functions")],
            [tuple(r) for r in await conn.fetch("select name, decrypted_secret from vault.decrypted_secrets "
                                                "order by name")],
            [r[0] for r in await conn.fetch("select version from supabase_migrations.schema_migrations order by 1")],
        )

    before, posts_before = await state(), len(api.posted_secrets())
    try:
        v2 = deployed.write_worker("v2")
        result = await asyncio.to_thread(deployed.deploy, "--dry-run")
        await next_heartbeat(conn)
        assert await state() == before
    finally:
        deployed.write_worker("v1")
    assert len(api.posted_secrets()) == posts_before, "no secrets were set"
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    (old,) = await live_workers(conn)
    assert f"Dry run: nothing was changed. Deploying '{NAME}' version {v2} would run:" in out
    assert f"db push --db-url 'postgresql://postgres:***@127.0.0.1:{deployed.pg.port}/" in out
    assert f"secrets set --env-file supabase/functions/.env --project-ref {PROJECT_REF}" in out
    assert f"POST {deployed.host.url}/functions/v1/{NAME} (Authorization: Bearer ***)" in out
    assert old["worker_id"] in out, "the plan names the worker it would deprecate"
    await assert_still_runs(conn, deployed)


# -- failures: each names the step, the cause and the fix, and leaves v1 running ----------------------


def old_cli(folder: Path) -> str:
    """TEST-ONLY STAND-IN for an old Supabase CLI: prints a 1.x version and nothing else."""
    path = folder / "old-supabase"
    path.write_text("#!/bin/sh\necho 1.226.4\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("case", [
    "cli-missing", "cli-too-old", "not-logged-in", "token-rejected", "unknown-worker", "invalid-options",
    "wrong-password",
    "db-unreachable", "worker-url-unreachable", "auth-rejected-401",
])
async def test_preflight_failures_change_nothing(deployed: DeployEnv, conn_of: Any, case: str,
                                                 api: FakeManagementApi, tmp_path: Path) -> None:
    posts_before = len(api.posted_secrets())
    if case == "cli-missing":
        empty = tmp_path / "bin"
        empty.mkdir()
        result = deployed.deploy(cli=False, env={"PATH": str(empty)})
        expect_failure(result, "preflight", "the Supabase CLI (supabase) is not on PATH", "npm i -g supabase",
                       "--supabase-bin")
    elif case == "cli-too-old":
        result = deployed.deploy("--supabase-bin", old_cli(tmp_path))
        expect_failure(result, "preflight", "is 1.226.4, too old: deploy needs 2.0.2 or later", "upgrade it")
    elif case == "not-logged-in":
        result = deployed.deploy(unset=("SUPABASE_ACCESS_TOKEN",))
        expect_failure(result, "preflight", "not logged in to Supabase", "supabase login", "SUPABASE_ACCESS_TOKEN")
    elif case == "token-rejected":
        result = deployed.deploy(env={"SUPABASE_ACCESS_TOKEN": "sbp_" + "f" * 40})
        expect_failure(result, "preflight", "the Supabase Management API rejected the access token (401)")
    elif case == "unknown-worker":
        result = deployed.deploy(name="nosuch")
        expect_failure(result, "preflight", "no worker function 'nosuch': workers/nosuch/worker.py does not exist",
                       f"the worker functions here: {NAME}")
    elif case == "invalid-options":
        source = worker_source(deployed.runs, "v2").replace("visibility_timeout=5", "visibility_timeout=0")
        (deployed.folder / "worker.py").write_text(source)
        try:
            result = deployed.deploy()
        finally:
            deployed.write_worker("v1")
        expect_failure(result, "preflight", f"workers/{NAME}/worker.py does not load: ConfigError: "
                       "Invalid visibility_timeout=0", f"pytest workers/{NAME}")
    elif case == "wrong-password":
        bad = deployed.pg.url(deployed.db_name, password="not-the-password") + "?sslmode=disable"
        result = deployed.deploy("--db-url", bad)
        err = expect_failure(result, "preflight", "The database refused the password", "postgres:***@")
        assert "not-the-password" not in err
    elif case == "db-unreachable":
        result = deployed.deploy("--db-url", f"postgresql://postgres:x@127.0.0.1:{free_port()}/postgres")
        expect_failure(result, "preflight", "Cannot reach the database", "is it running")
    elif case == "worker-url-unreachable":
        url = f"http://127.0.0.1:{free_port()}"
        result = deployed.deploy("--worker-url", url)
        expect_failure(result, "preflight", f"the worker host at {url} is unreachable", "worker-runtime serve",
                       "--worker-url")
    elif case == "auth-rejected-401":
        result = deployed.deploy(env={"EDGE_WORKER_AUTH_SECRET": "a-wrong-secret-for-the-host"})
        expect_failure(result, "preflight", "the worker host rejected the auth secret", "answered 401",
                       "EDGE_WORKER_AUTH_SECRET")
    assert "[2/6]" not in result.stdout, "nothing ran after the failed preflight"
    assert len(api.posted_secrets()) == posts_before
    await assert_still_runs(await conn_of(deployed), deployed)


def test_bad_arguments_exit_2(deployed: DeployEnv) -> None:
    for args in (["--timeout", "-1"], ["--no-such-flag"]):
        assert deployed.deploy(*args).returncode == 2
    result = deployed.deploy(name="Bad Name")
    assert result.returncode == 2 and "invalid worker name 'Bad Name'" in result.stderr


async def test_a_migration_the_database_refuses(deployed: DeployEnv, conn_of: Any) -> None:
    broken = deployed.project / "supabase" / "migrations" / "29991231000000_broken.sql"
    broken.write_text("create tabel broken_table (id int);\n")
    try:
        result = await asyncio.to_thread(deployed.deploy)
    finally:
        broken.unlink()
    err = expect_failure(result, "migrations", "the database refused a migration", "supabase migration repair")
    assert 'syntax error at or near "tabel"' in err, "the CLI's own message is shown"
    assert "[3/6]" not in result.stdout
    conn = await conn_of(deployed)
    assert await conn.fetchval("select to_regclass('public.broken_table')") is None
    await assert_still_runs(conn, deployed)


async def test_no_heartbeat_in_time(deployed: DeployEnv, conn_of: Any, pg: PgCluster) -> None:
    """A host that starts the new version against another database: its worker never
    heartbeats where the deploy looks, so the deploy times out and deprecates nothing."""
    other_name = f"other_{uuid.uuid4().hex[:8]}"
    other_url = await pg.create_database(other_name)
    stray = HostProcess(deployed.project, env=deployed.host_env(other_url))
    try:
        v2 = deployed.write_worker("v2")
        await asyncio.to_thread(stray.start)
        result = await asyncio.to_thread(deployed.deploy, "--worker-url", stray.url, "--timeout", "3")
        err = expect_failure(result, "verify", f"no worker of version {v2} heartbeated within 3 s",
                             "never registered in postgresql://postgres:***@", "same database")
        assert "[5/6]" not in result.stdout
        async with httpx.AsyncClient() as client:
            status = (await client.get(f"{stray.url}/functions/v1/{NAME}/status",
                                       headers={"Authorization": f"Bearer {deployed.secret}"})).json()
        assert [w["version"] for w in status["workers"]] == [v2], "the stray host did start v2"
    finally:
        stray.kill()
        deployed.write_worker("v1")
        await pg.drop_database(other_name)
    assert err
    await assert_still_runs(await conn_of(deployed), deployed)


def test_module_entry_point_matches_the_script() -> None:
    """`python -m worker_runtime.deploy --help` and scripts/deploy.py are the same command."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    module = subprocess.run([sys.executable, "-m", "worker_runtime.deploy", "--help"], capture_output=True,
                            text=True, env=env, timeout=60, check=False)
    script = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "deploy.py"), "--help"],
                            capture_output=True, text=True, env=env, timeout=60, check=False)
    assert module.returncode == script.returncode == 0
    assert module.stdout == script.stdout and "--dry-run" in module.stdout and "--profile" in module.stdout
