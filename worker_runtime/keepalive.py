"""Register worker functions for the pg_cron keep-alive.

`edge_worker.ensure_workers()` (run by pg_cron) POSTs to `<url>/functions/v1/<name>` for
every enabled function in `edge_worker.functions` that has no live worker. It takes the
URL from the function's row or the Vault secret `edge_worker_url`, and the bearer token
from the Vault secret `edge_worker_auth_secret`. These helpers write exactly that.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid

import asyncpg

from .config import FUNCTION_NAME_PATTERN, QUEUE_NAME_PATTERN, ConfigError
from .logging import get_logger, register_secret

URL_SECRET = "edge_worker_url"
AUTH_SECRET = "edge_worker_auth_secret"
DEFAULT_SCHEDULE = "5 seconds"

log = get_logger("KeepAlive")


async def register_function(
    conn: asyncpg.Connection,
    name: str,
    queue_name: str,
    url: str | None = None,
    min_workers: int = 1,
    debounce_seconds: float = 10,
    version: str | None = None,
    enabled: bool = True,
) -> None:
    """Add or update the function in edge_worker.functions (enabled unless told otherwise).

    `url` is the base URL of the host serving it (the keep-alive appends
    /functions/v1/<name>); None means the Vault secret edge_worker_url.
    """
    if not re.fullmatch(FUNCTION_NAME_PATTERN, name):
        raise ConfigError(f"Invalid function name {name!r}: use lowercase letters, digits, - and _ "
                          "(the folder name under workers/).")
    if not re.fullmatch(QUEUE_NAME_PATTERN, queue_name):
        raise ConfigError(f"Invalid queue name {queue_name!r}: use lowercase letters, digits and _ "
                          "(at most 47, not starting with a digit).")
    if min_workers < 0:
        raise ConfigError(f"Invalid min_workers={min_workers}: set it to 0 or more (default 1).")
    if debounce_seconds < 0:
        raise ConfigError(f"Invalid debounce_seconds={debounce_seconds}: set it to 0 or more (default 10).")
    if url is not None and not re.match(r"^https?://", url):
        raise ConfigError(f"Invalid url {url!r}: give the host's base URL, e.g. http://host.docker.internal:54380.")
    await conn.execute(
        "select edge_worker.register_function($1, $2, $3, $4, $5::interval, $6, $7)",
        name, queue_name, url, min_workers, dt.timedelta(seconds=debounce_seconds), version, enabled,
    )
    log.info("Registered function '%s' (queue '%s', url %s) for the keep-alive",
             name, queue_name, url or f"from Vault secret {URL_SECRET}")


async def set_vault_secret(conn: asyncpg.Connection, name: str, value: str, description: str = "") -> uuid.UUID:
    """Create or update the Vault secret `name`; returns its id. The value is never logged."""
    register_secret(value)
    if await conn.fetchval("select to_regnamespace('vault')") is None:
        raise ConfigError("Supabase Vault is not enabled in this database: enable the supabase_vault extension "
                          "(Dashboard > Database > Extensions) and try again.")
    async with conn.transaction():
        secret_id = await conn.fetchval("select id from vault.secrets where name = $1 for update", name)
        if secret_id is None:
            secret_id = await conn.fetchval("select vault.create_secret($1, $2, $3)", value, name, description)
            log.info("Created Vault secret %s", name)
        else:
            await conn.execute("select vault.update_secret($1, $2)", secret_id, value)
            log.info("Updated Vault secret %s", name)
    return secret_id


async def setup_keepalive(conn: asyncpg.Connection, schedule: str = DEFAULT_SCHEDULE) -> int:
    """(Re)create the pg_cron job that runs edge_worker.ensure_workers(); returns its job id.

    Run it in the database pg_cron runs in (`postgres` on Supabase). '5 seconds' needs
    pg_cron 1.5+ (Supabase has it); older pg_cron takes cron syntax such as '* * * * *'.
    """
    job_id = await conn.fetchval("select edge_worker.setup_keepalive($1)", schedule)
    log.info("Keep-alive scheduled with pg_cron (%s), job %s", schedule, job_id)
    return int(job_id)


async def register(
    conn: asyncpg.Connection,
    name: str,
    queue_name: str,
    *,
    url: str | None = None,
    auth_secret: str | None = None,
    min_workers: int = 1,
    debounce_seconds: float = 10,
    version: str | None = None,
    schedule: str | None = None,
) -> None:
    """Everything the keep-alive needs for one function, in one transaction.

    `url` goes to the Vault secret edge_worker_url (shared by all functions of the
    project; the row's url stays null), `auth_secret` to edge_worker_auth_secret, and
    `schedule`, when given, (re)creates the pg_cron job.
    """
    async with conn.transaction():
        if url is not None:
            if not re.match(r"^https?://", url):
                raise ConfigError(f"Invalid url {url!r}: give the host's base URL, "
                                  "e.g. http://host.docker.internal:54380.")
            await set_vault_secret(conn, URL_SECRET, url.rstrip("/"), "Base URL of the worker function host")
        if auth_secret is not None:
            await set_vault_secret(conn, AUTH_SECRET, auth_secret, "Bearer secret for the worker function host")
        await register_function(conn, name, queue_name, None, min_workers, debounce_seconds, version)
        if schedule is not None:
            await setup_keepalive(conn, schedule)
