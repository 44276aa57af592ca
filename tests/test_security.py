"""Nothing in edge_worker is readable or callable by Supabase's API roles `anon` and
`authenticated`. Objects are listed from pg_catalog, so new ones are covered automatically."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from worker_runtime.migrate import apply_migration

API_ROLES = ("anon", "authenticated")


async def relations(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """(name, kind) of every table, view, materialized view, foreign table and sequence."""
    rows = await conn.fetch(
        "select c.relname, c.relkind::text as kind from pg_class c"
        " where c.relnamespace = 'edge_worker'::regnamespace and c.relkind in ('r', 'p', 'v', 'm', 'f', 'S')"
        " order by c.relname"
    )
    return [(r["relname"], r["kind"]) for r in rows]


async def function_calls(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """(signature, a call with null arguments) for every function and procedure in edge_worker."""
    rows = await conn.fetch(
        "select p.oid::regprocedure::text as signature, p.proname, p.prokind::text as kind,"
        " array(select format_type(t, null) from unnest(p.proargtypes) t) as arg_types"
        " from pg_proc p where p.pronamespace = 'edge_worker'::regnamespace order by 1"
    )
    calls = []
    for r in rows:
        args = ", ".join(f"null::{t}" for t in r["arg_types"])
        verb = "call" if r["kind"] == "p" else "select"
        calls.append((r["signature"], f'{verb} edge_worker."{r["proname"]}"({args})'))
    return calls


@asynccontextmanager
async def as_role(conn: asyncpg.Connection, role: str, *, schema_usage: bool = False) -> AsyncIterator[None]:
    """Run as `role` inside a transaction that is always rolled back.

    With schema_usage, USAGE on the schema is granted first (only inside the transaction),
    as a project that exposes edge_worker to the API would: then each object's own
    privileges are what must refuse access.
    """
    tx = conn.transaction()
    await tx.start()
    try:
        if schema_usage:
            await conn.execute(f"grant usage on schema edge_worker to {role}")
        await conn.execute(f"set local role {role}")
        yield
    finally:
        await tx.rollback()


def relation_query(name: str, kind: str) -> str:
    if kind == "S":
        return f"select nextval('edge_worker.\"{name}\"')"
    return f'select * from edge_worker."{name}" limit 1'


async def assert_denied(conn: asyncpg.Connection, role: str, sql: str, schema_usage: bool) -> None:
    async with as_role(conn, role, schema_usage=schema_usage):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            # Simple query protocol: no statement to prepare, so trigger functions (which
            # return the pseudo-type `trigger`) are checked like any other function.
            await conn.execute(sql)


@pytest.mark.parametrize("role", API_ROLES)
@pytest.mark.parametrize("schema_usage", [False, True], ids=["as-shipped", "schema-exposed"])
async def test_api_roles_cannot_read_any_relation(conn: asyncpg.Connection, role: str, schema_usage: bool) -> None:
    found = await relations(conn)
    assert {"workers", "functions", "dead_letters", "active_workers", "inactive_workers"} <= {n for n, _ in found}
    for name, kind in found:
        await assert_denied(conn, role, relation_query(name, kind), schema_usage)
        if kind in ("r", "p"):
            for write in (
                f'delete from edge_worker."{name}"',
                f'update edge_worker."{name}" set {await first_column(conn, name)} = null',
            ):
                await assert_denied(conn, role, write, schema_usage)


async def first_column(conn: asyncpg.Connection, table: str) -> str:
    """An ordinary (not identity, not generated) column, so UPDATE fails only on privileges."""
    return await conn.fetchval(
        "select quote_ident(attname) from pg_attribute where attrelid = $1::regclass and attnum > 0"
        " and not attisdropped and attidentity = '' and attgenerated = '' order by attnum limit 1",
        f'edge_worker."{table}"',
    )


@pytest.mark.parametrize("role", API_ROLES)
@pytest.mark.parametrize("schema_usage", [False, True], ids=["as-shipped", "schema-exposed"])
async def test_api_roles_cannot_execute_any_function(conn: asyncpg.Connection, role: str, schema_usage: bool) -> None:
    calls = await function_calls(conn)
    names = {signature.split("(")[0] for signature, _ in calls}
    assert {"edge_worker.heartbeat", "edge_worker.fail", "edge_worker.ensure_workers"} <= names
    for signature, sql in calls:
        try:
            await assert_denied(conn, role, sql, schema_usage)
        except BaseException as exc:
            raise AssertionError(f"{role} could call {signature}: {exc!r}") from exc


async def test_functions_created_later_are_not_callable(conn: asyncpg.Connection) -> None:
    """A function added to edge_worker after the migration is still shut off from the API
    roles: they have no USAGE on the schema. (PostgreSQL grants EXECUTE to PUBLIC by a
    global default that a per-schema ALTER DEFAULT PRIVILEGES cannot revoke, so the schema
    is the barrier; re-running the migration revokes EXECUTE on the function itself.)"""
    await conn.execute("create function edge_worker.added_later() returns int language sql as 'select 1'")
    for role in API_ROLES:
        await assert_denied(conn, role, "select edge_worker.added_later()", schema_usage=False)
    await apply_migration(conn)
    for role in API_ROLES:
        await assert_denied(conn, role, "select edge_worker.added_later()", schema_usage=True)


async def test_api_roles_have_no_privileges_in_catalog(conn: asyncpg.Connection) -> None:
    for role in API_ROLES:
        assert not await conn.fetchval("select has_schema_privilege($1, 'edge_worker', 'usage')", role)
        granted = await conn.fetch(
            "select c.relname from pg_class c where c.relnamespace = 'edge_worker'::regnamespace"
            " and c.relkind in ('r', 'p', 'v', 'm', 'f', 'S')"
            " and (has_table_privilege($1, c.oid, 'select, insert, update, delete, truncate, references, trigger')"
            "      or (c.relkind = 'S' and has_sequence_privilege($1, c.oid, 'usage, select, update')))",
            role,
        )
        assert granted == []
        callable_ = await conn.fetch(
            "select p.oid::regprocedure::text from pg_proc p where p.pronamespace = 'edge_worker'::regnamespace"
            " and has_function_privilege($1, p.oid, 'execute')",
            role,
        )
        assert callable_ == []


async def test_service_role_can_operate(conn: asyncpg.Connection) -> None:
    """The control: the server-side role is not locked out the way the API roles are."""
    async with as_role(conn, "service_role"):
        await conn.fetch("select * from edge_worker.workers")
        await conn.fetch("select * from edge_worker.active_workers")
        assert await conn.fetchval("select edge_worker.heartbeat(gen_random_uuid())") is False


async def test_rls_is_enabled_on_every_table(conn: asyncpg.Connection) -> None:
    tables = await conn.fetch(
        "select relname, relrowsecurity from pg_class"
        " where relnamespace = 'edge_worker'::regnamespace and relkind in ('r', 'p')"
    )
    assert {t["relname"] for t in tables} >= {"workers", "functions", "dead_letters"}
    assert [t["relname"] for t in tables if not t["relrowsecurity"]] == []


async def test_security_definer_functions_pin_search_path(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch(
        "select p.oid::regprocedure::text as signature, p.proconfig from pg_proc p"
        " where p.pronamespace = 'edge_worker'::regnamespace and p.prosecdef"
    )
    assert "edge_worker.ensure_workers()" in {r["signature"] for r in rows}
    unpinned = [
        r["signature"] for r in rows
        if not any(setting.startswith("search_path=") for setting in (r["proconfig"] or []))
    ]
    assert unpinned == [], f"security definer functions without search_path: {unpinned}"
