"""asyncpg connections that work through Supavisor/PgBouncer and never show a password."""

from __future__ import annotations

import json
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg

from .logging import register_secret

# Errors that mean "the database went away or is not there yet": retry with backoff.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    ConnectionError,
)


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, safe to print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}:***@{netloc[1]}"))


def register_url_secrets(url: str) -> None:
    """Keep the URL's password out of every log line, in its encoded and decoded forms."""
    password = urlsplit(url).password
    if password:
        register_secret(password)
        register_secret(unquote(password))


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb and json arrive as Python objects and go out from them.
    for typename in ("jsonb", "json"):
        await conn.set_type_codec(typename, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


def _connect_kwargs() -> dict[str, object]:
    # statement_cache_size=0: a transaction-mode pooler hands each statement to any
    # backend, where a named prepared statement from another backend does not exist.
    return {"statement_cache_size": 0, "server_settings": {"application_name": "worker_runtime"}}


async def create_pool(url: str, max_size: int, *, check: bool = True) -> asyncpg.Pool:
    """A pool of at most `max_size` connections (opened on demand, closed when idle).

    With `check`, one query proves the URL and password now, so a mistake is reported at
    start as one sentence rather than later from inside the worker.
    """
    register_url_secrets(url)
    pool = asyncpg.create_pool(
        url, min_size=0, max_size=max_size, max_inactive_connection_lifetime=60,
        init=_init_connection, **_connect_kwargs(),
    )
    try:
        await pool
        if check:
            await pool.execute("select 1")
    except Exception as exc:
        pool.terminate()
        raise DatabaseError(describe_connect_error(exc, url)) from None
    return pool


async def connect(url: str) -> asyncpg.Connection:
    """One connection with the same settings as the pool's."""
    register_url_secrets(url)
    try:
        conn = await asyncpg.connect(url, **_connect_kwargs())
    except Exception as exc:
        raise DatabaseError(describe_connect_error(exc, url)) from None
    await _init_connection(conn)
    return conn


class DatabaseError(RuntimeError):
    """The database could not be reached; the message says why and what to do."""


def describe_connect_error(exc: BaseException, url: str) -> str:
    """One sentence for a failed connection, naming the fix and never the password."""
    where = redact_url(url)
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return (f"The database refused the password for {where}: check EDGE_WORKER_DB_URL "
                "(special characters in the password must be URL-encoded).")
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"The database in {where} does not exist: check the name at the end of the URL."
    if isinstance(exc, (OSError, asyncpg.CannotConnectNowError, TimeoutError)):
        return (f"Cannot reach the database at {where} ({type(exc).__name__}): is it running "
                "(supabase start) and are host and port right?")
    if isinstance(exc, ValueError):
        return f"The database URL {where} is not valid ({exc}): use postgresql://user:password@host:port/db."
    return f"Cannot connect to {where}: {type(exc).__name__}: {exc}"
