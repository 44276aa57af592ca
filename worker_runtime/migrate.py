"""Apply the packaged edge_worker migration: the SQL contract every part shares."""

from __future__ import annotations

from importlib.resources import files

import asyncpg

MIGRATION_FILE = "edge_worker.sql"


def migration_sql() -> str:
    """The migration's text, byte-identical to supabase/migrations/*_edge_worker.sql."""
    return files("worker_runtime").joinpath("sql", MIGRATION_FILE).read_text(encoding="utf-8")


async def apply_migration(conn: asyncpg.Connection) -> None:
    """Apply the migration in one transaction. It is idempotent, so re-running is safe."""
    async with conn.transaction():
        await conn.execute(migration_sql())


async def install_pgmq_sql(conn: asyncpg.Connection) -> bool:
    """Install PGMQ from the `pgmq` package's own pgmq.sql, unless PGMQ is already there.

    For servers without the PGMQ extension (the embedded default, tests). PGMQ's SQL is not
    re-runnable, hence the guard. Returns whether it installed anything.
    """
    if await conn.fetchval("select to_regnamespace('pgmq') is not null"):
        return False
    try:
        sql = files("pgmq").joinpath("sql", "pgmq.sql").read_text(encoding="utf-8")
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            "PGMQ's SQL comes from the `pgmq` package: pip install 'supabase-worker-kit[demo]'."
        ) from exc
    async with conn.transaction():
        await conn.execute(sql)
    return True
