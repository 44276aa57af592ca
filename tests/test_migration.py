"""The edge_worker migration: idempotent, one source of truth, clear without PGMQ, and
applied by the real Supabase CLI (`supabase db push --db-url`)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.pgcluster import PgCluster
from tests.supabase_cli import PINNED_VERSION, cli_version, run_supabase
from worker_runtime.migrate import apply_migration, install_pgmq_sql, migration_sql

REPO_ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = REPO_ROOT / "supabase" / "migrations"
PACKAGED = REPO_ROOT / "worker_runtime" / "sql" / "edge_worker.sql"
TABLES = {"workers", "functions", "dead_letters"}
VIEWS = {"active_workers", "inactive_workers"}


def migration_file() -> Path:
    found = sorted(MIGRATIONS.glob("*_edge_worker.sql"))
    assert len(found) == 1, f"expected one *_edge_worker.sql in supabase/migrations, found {found}"
    return found[0]


async def edge_worker_relations(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch(
        "select c.relname, c.relkind::text as relkind from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = 'edge_worker' and c.relkind in ('r', 'v')"
    )
    return {r["relname"]: r["relkind"] for r in rows}


@pytest.fixture
async def empty_db(pg: PgCluster) -> AsyncIterator[str]:
    """A plain database from template0: no PGMQ, no stand-ins, no migration."""
    name = f"plain_{uuid.uuid4().hex[:12]}"
    await pg.create_database(name, template="template0")
    yield name
    await pg.drop_database(name)


def test_packaged_copy_is_byte_identical() -> None:
    assert PACKAGED.read_bytes() == migration_file().read_bytes(), (
        "worker_runtime/sql/edge_worker.sql differs from supabase/migrations: copy one over the other"
    )
    assert migration_sql().encode("utf-8") == migration_file().read_bytes()


async def test_migration_applies_twice_and_keeps_data(conn: asyncpg.Connection) -> None:
    # The clone already has the migration once; apply it twice more on top of live data.
    worker_id = uuid.uuid4()
    await conn.execute("select edge_worker.register_worker($1, 'tasks', 'fn')", worker_id)
    await conn.execute("select edge_worker.register_function('fn', 'tasks', min_workers => 3)")

    await apply_migration(conn)
    await apply_migration(conn)

    relations = await edge_worker_relations(conn)
    assert {name for name, kind in relations.items() if kind == "r"} == TABLES
    assert {name for name, kind in relations.items() if kind == "v"} == VIEWS
    assert await conn.fetchval("select count(*) from edge_worker.workers where worker_id = $1", worker_id) == 1
    assert await conn.fetchval("select min_workers from edge_worker.functions where function_name = 'fn'") == 3
    assert await conn.fetchval("select edge_worker.heartbeat($1)", worker_id) is True
    # Still exactly one overload per function (create or replace, not a second copy).
    dupes = await conn.fetch(
        "select proname, count(*) from pg_proc where pronamespace = 'edge_worker'::regnamespace"
        " group by proname having count(*) > 1"
    )
    assert dupes == []


async def test_migration_without_pgmq_fails_clearly(pg: PgCluster, empty_db: str) -> None:
    conn = await asyncpg.connect(pg.url(empty_db))
    try:
        with pytest.raises(asyncpg.RaiseError) as caught:
            await apply_migration(conn)
        assert "PGMQ is not installed" in str(caught.value)
        hint = caught.value.hint or ""
        assert "enable Queues" in hint and "create extension pgmq" in hint
        # Nothing half-applied: the migration runs in one transaction.
        assert await conn.fetchval("select to_regnamespace('edge_worker')") is None
    finally:
        await conn.close()


async def test_migration_applies_on_plain_sql_pgmq(pg: PgCluster, empty_db: str) -> None:
    """PGMQ installed from its pgmq.sql (no extension) is accepted, as in tests and the demo."""
    conn = await asyncpg.connect(pg.url(empty_db))
    try:
        assert await install_pgmq_sql(conn) is True
        await apply_migration(conn)
        assert set(await edge_worker_relations(conn)) == TABLES | VIEWS
        await conn.execute("select pgmq.create('jobs')")
        msg_id = await conn.fetchval("select * from pgmq.send('jobs', '{\"x\": 1}')")
        await conn.fetch("select * from pgmq.read('jobs', 30, 1)")
        assert await conn.fetchval("select edge_worker.fail('jobs', $1, '{}', 0, 0)", msg_id) == "dead_letter"
    finally:
        await conn.close()


def supabase_project(tmp_path: Path) -> tuple[Path, Path]:
    """`supabase init` in a temp folder, with our migration copied into it."""
    home = tmp_path / "home"
    project = tmp_path / "project"
    home.mkdir()
    project.mkdir()
    assert PINNED_VERSION in cli_version(home), "the tests expect the pinned Supabase CLI"
    init = run_supabase(["init"], cwd=project, home=home)
    assert init.returncode == 0, f"supabase init failed:\n{init.stdout}\n{init.stderr}"
    migrations = project / "supabase" / "migrations"
    migrations.mkdir(parents=True, exist_ok=True)
    shutil.copy(migration_file(), migrations / migration_file().name)
    return project, home


def db_push(project: Path, home: Path, url: str) -> str:
    push = run_supabase(
        ["db", "push", "--db-url", f"{url}?sslmode=disable", "--yes"], cwd=project, home=home
    )
    output = f"{push.stdout}\n{push.stderr}"
    assert push.returncode == 0, f"supabase db push failed:\n{output}"
    return output


async def test_supabase_db_push_applies_migration(pg: PgCluster, empty_db: str, tmp_path: Path) -> None:
    url = pg.url(empty_db)
    assert "%40" in url and "%3A" in url, "the cluster password should need URL encoding"
    conn = await asyncpg.connect(url)
    try:
        await install_pgmq_sql(conn)  # a database with PGMQ but without edge_worker
        assert await conn.fetchval("select to_regnamespace('edge_worker')") is None
    finally:
        await conn.close()

    project, home = supabase_project(tmp_path)
    db_push(project, home, url)

    conn = await asyncpg.connect(url)
    try:
        assert set(await edge_worker_relations(conn)) == TABLES | VIEWS
        versions = await conn.fetch("select version from supabase_migrations.schema_migrations")
        assert [r["version"] for r in versions] == [migration_file().name.split("_", 1)[0]]
        # The pushed contract works: a worker registers and heartbeats.
        worker_id = uuid.uuid4()
        await conn.execute("select edge_worker.register_worker($1, 'tasks', 'fn')", worker_id)
        assert await conn.fetchval("select edge_worker.heartbeat($1)", worker_id) is True
    finally:
        await conn.close()

    # A second push finds nothing new to apply and still succeeds.
    output = db_push(project, home, url)
    assert "up to date" in output.lower(), output


async def test_supabase_db_push_on_migrated_clone(db_url: str, tmp_path: Path) -> None:
    """Pushing onto a database that already has the contract (a fresh test clone) is clean."""
    project, home = supabase_project(tmp_path)
    db_push(project, home, db_url)
    conn = await asyncpg.connect(db_url)
    try:
        assert set(await edge_worker_relations(conn)) == TABLES | VIEWS
        assert await conn.fetchval("select count(*) from supabase_migrations.schema_migrations") == 1
    finally:
        await conn.close()


def test_cli_lookup_reports_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.supabase_cli import SupabaseCliMissing, find_supabase

    monkeypatch.setenv("SUPABASE_BIN", str(tmp_path / "no-such-supabase"))
    with pytest.raises(SupabaseCliMissing, match=r"scripts/test\.sh or npm i -E supabase@2\.117\.0"):
        find_supabase()
    monkeypatch.delenv("SUPABASE_BIN")
    assert os.path.exists(find_supabase()), "the pinned CLI should be installed by scripts/test.sh"
