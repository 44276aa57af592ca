"""`worker-runtime`: serve, migrate, send, status, stop, register, dead-letters, demo.

Every command that talks to the database takes the URL from `--db-url`, else from
EDGE_WORKER_DB_URL (the environment, then supabase/functions/.env). Errors a user can
cause print one sentence with the fix, `worker-runtime: <sentence>`, and exit 1; a
traceback only with `--debug`. A password in a URL is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import asyncpg

from . import db
from . import logging as worker_logging
from .config import (
    AUTH_SECRET_ENV, DB_URL_ENV, FUNCTION_NAME_PATTERN, FUNCTIONS_ENV_FILE, QUEUE_NAME_PATTERN, ConfigError,
)
from .db import DatabaseError, redact_url
from .queue import Queue

PROG = "worker-runtime"
DEFAULT_ENV_FILE = FUNCTIONS_ENV_FILE
SEND_CHUNK = 1000


class CliError(Exception):
    """A mistake the user can fix; the message is the one sentence we print."""


# -- argument types ---------------------------------------------------------------------------


def _queue_name(value: str) -> str:
    if not re.match(QUEUE_NAME_PATTERN, value):
        raise argparse.ArgumentTypeError(
            f"invalid queue name {value!r}: use lowercase letters, digits and _ (at most 47, "
            "not starting with a digit), e.g. 'tasks'"
        )
    return value


def _function_name(value: str) -> str:
    if not re.match(FUNCTION_NAME_PATTERN, value):
        raise argparse.ArgumentTypeError(
            f"invalid function name {value!r}: use lowercase letters, digits, - and _ as Supabase function names do"
        )
    return value


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {number}")
    return number


# -- the parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # The global options also work after the command (`worker-runtime status --db-url ...`):
    # each subparser repeats them with SUPPRESS defaults, so they never overwrite the top's.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db-url", default=argparse.SUPPRESS, metavar="URL",
                        help=f"database URL (default: ${DB_URL_ENV}, also read from {DEFAULT_ENV_FILE})")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks for errors")

    parser = argparse.ArgumentParser(
        prog=PROG, description="Python background workers for Supabase Queues (PGMQ).",
        epilog="Run 'worker-runtime demo' to see a worker process messages on an embedded PostgreSQL.",
    )
    parser.add_argument("--db-url", default=None, metavar="URL",
                        help=f"database URL (default: ${DB_URL_ENV}, also read from {DEFAULT_ENV_FILE})")
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(func=func)
        return sub

    p = command("serve", cmd_serve, "Host the worker functions in workers/<name>/worker.py over HTTP.")
    p.add_argument("--workers-dir", default="workers", help="folder of worker functions (default: workers)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=54380, help="port to listen on (default: 54380)")
    p.add_argument("--env-file", default=DEFAULT_ENV_FILE, help=f"secrets file (default: {DEFAULT_ENV_FILE})")
    p.add_argument("--max-instances", type=_positive, default=1,
                   help="workers per function at most (default: 1)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="accept starts without EDGE_WORKER_AUTH_SECRET (local development only)")

    p = command("migrate", cmd_migrate,
                "Apply the edge_worker migration to a database the Supabase CLI does not manage.")
    p.add_argument("--install-pgmq", action="store_true",
                   help="first install PGMQ's plain SQL (for servers without the pgmq extension)")

    p = command("send", cmd_send, "Send one JSON message, or one per JSON line on stdin, to a queue.")
    p.add_argument("queue", type=_queue_name, metavar="QUEUE")
    p.add_argument("json", nargs="?", metavar="JSON", help="the message; omit it to read JSON lines from stdin")
    p.add_argument("--delay", type=_non_negative, default=0, metavar="S",
                   help="seconds before the message becomes visible (default: 0)")

    p = command("status", cmd_status, "Show queues (depth, in flight, archived, dead letters) and workers.")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    p = command("stop", cmd_stop, "Disable a function for the keep-alive and stop its workers.")
    p.add_argument("function", type=_function_name, metavar="FUNCTION")

    p = command("register", cmd_register, "Register a function for the pg_cron keep-alive.")
    p.add_argument("name", type=_function_name, metavar="NAME")
    p.add_argument("--queue", type=_queue_name, required=True, help="the queue its workers poll")
    p.add_argument("--url", help="base URL of the host serving it, e.g. http://host.docker.internal:54380")
    p.add_argument("--min-workers", type=_non_negative, default=1, help="workers to keep alive (default: 1)")
    p.add_argument("--debounce", type=_non_negative, default=10, metavar="S",
                   help="seconds between two starts of the same function (default: 10)")
    p.add_argument("--version", help="the deployed version of the function")
    p.add_argument("--schedule", help="also schedule the keep-alive with pg_cron, e.g. '5 seconds'")
    p.add_argument("--auth-secret-from-env", action="store_true",
                   help=f"store ${AUTH_SECRET_ENV} (and --url) in Vault for the keep-alive")

    p = command("dead-letters", _dead_letters_help, "List or requeue messages that used up their retries.")
    dl = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = dl.add_parser("list", parents=[common], help="list a queue's dead letters (not yet requeued)",
                      description="List a queue's dead letters (not yet requeued), newest last.")
    q.add_argument("queue", type=_queue_name, metavar="QUEUE")
    q.add_argument("--json", action="store_true", help="print JSON (with tracebacks) instead of a table")
    q.set_defaults(func=cmd_dead_letters_list)
    q = dl.add_parser("requeue", parents=[common], help="put dead letters back on their queue",
                      description="Put dead letters back on their queue as new messages.")
    q.add_argument("queue", type=_queue_name, metavar="QUEUE")
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int, nargs="+", action="extend", dest="ids", metavar="ID",
                       help="dead-letter ids (the ID column of 'dead-letters list')")
    which.add_argument("--all", action="store_true", help="every dead letter of the queue")
    q.set_defaults(func=cmd_dead_letters_requeue)

    p = command("demo", cmd_demo,
                "Run a worker on an embedded PostgreSQL (no Docker, no Supabase) and process messages.")
    p.add_argument("--messages", type=_positive, default=100, metavar="N", help="messages to send (default: 100)")
    p.add_argument("--verbose", action="store_true", help="show the worker's log lines")
    return parser


def _dead_letters_help(args: argparse.Namespace) -> int:  # pragma: no cover - argparse requires ACTION
    raise CliError("say 'dead-letters list QUEUE' or 'dead-letters requeue QUEUE'")


# -- main -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and bad arguments (2), as argparse decides
        return exc.code if isinstance(exc.code, int) else 2
    _load_env_file()
    if args.db_url is None:
        args.db_url = os.environ.get(DB_URL_ENV) or None
    if args.db_url:
        db.register_url_secrets(args.db_url)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _print_error("interrupted.")
        return 130
    except Exception as exc:
        if args.debug:
            sys.stderr.write(worker_logging.redact(traceback.format_exc()))
        _print_error(describe_error(exc, args))
        return 1


def _load_env_file() -> None:
    """Read supabase/functions/.env where the Supabase user keeps secrets; env vars win."""
    path = Path(DEFAULT_ENV_FILE)
    if path.is_file():
        from dotenv import load_dotenv

        load_dotenv(path, override=False)


def _print_error(sentence: str, stream: TextIO | None = None) -> None:
    print(f"{PROG}: {worker_logging.redact(sentence)}", file=stream or sys.stderr)


def describe_error(exc: BaseException, args: argparse.Namespace) -> str:
    """One sentence with the fix for an error a user can cause; a short one otherwise."""
    if isinstance(exc, (CliError, ConfigError, DatabaseError)):
        return str(exc)
    if isinstance(exc, asyncpg.PostgresError):
        return describe_pg_error(exc, getattr(args, "queue", None))
    if isinstance(exc, db.CONNECTION_ERRORS):
        where = redact_url(args.db_url) if args.db_url else "the database"
        return f"Lost the connection to {where} ({type(exc).__name__}): check that the server is up and retry."
    hint = "" if args.debug else " (rerun with --debug for the traceback)"
    return f"unexpected error: {type(exc).__name__}: {exc}{hint}"


def describe_pg_error(exc: asyncpg.PostgresError, queue: str | None = None) -> str:
    text = str(exc)
    missing = (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError, asyncpg.InvalidSchemaNameError)
    if isinstance(exc, missing):
        if queue and re.search(rf'\bpgmq\.[qa]_{re.escape(queue)}\b', text):
            return _queue_missing(queue)
        if "edge_worker" in text:
            return ("The edge_worker schema is missing in this database: run 'worker-runtime migrate' "
                    "(or 'supabase migration up' in a Supabase project).")
        if "pgmq" in text:
            return ("PGMQ is not installed in this database: on Supabase enable Queues "
                    "(create extension pgmq), elsewhere run 'worker-runtime migrate --install-pgmq'.")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return (f"The database user may not do this ({exc.message}): connect as postgres or service_role "
                "in EDGE_WORKER_DB_URL.")
    hint = getattr(exc, "hint", None)
    return f"The database refused the command: {exc.message if hasattr(exc, 'message') else text}" + (
        f" ({hint})" if hint else ".")


def _queue_missing(queue: str) -> str:
    return (f"Queue '{queue}' does not exist: start a worker for it (it creates its queue) or run "
            f"\"select pgmq.create('{queue}')\"; 'worker-runtime status' lists the queues.")


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _require_url(args: argparse.Namespace) -> str:
    if not args.db_url:
        raise CliError(
            f"No database URL: pass --db-url or set {DB_URL_ENV} (for example in {DEFAULT_ENV_FILE}); "
            "with 'supabase start' it is postgresql://postgres:postgres@127.0.0.1:54322/postgres."
        )
    return args.db_url


@contextlib.asynccontextmanager
async def _connection(args: argparse.Namespace) -> AsyncIterator[asyncpg.Connection]:
    conn = await db.connect(_require_url(args))
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


# -- serve ------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from . import host  # imported only when serving: uvicorn and Starlette load on demand

    try:
        host.serve(
            workers_dir=args.workers_dir, host=args.host, port=args.port, env_file=args.env_file,
            db_url=args.db_url, max_instances=args.max_instances, insecure_no_auth=args.insecure_no_auth,
        )
    except host.HostError as exc:  # no workers folder, port taken: already one sentence
        raise CliError(str(exc)) from None
    return 0


# -- migrate ----------------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    from .migrate import apply_migration, install_pgmq_sql

    async def run() -> bool:
        async with _connection(args) as conn:
            installed = await install_pgmq_sql(conn) if args.install_pgmq else False
            try:
                await apply_migration(conn)
            except asyncpg.RaiseError as exc:
                if "PGMQ is not installed" in str(exc):
                    raise CliError(
                        "PGMQ is not installed in this database: on Supabase enable Queues (create extension "
                        "pgmq); elsewhere rerun with --install-pgmq to install PGMQ's plain SQL first."
                    ) from None
                raise
            return installed

    try:
        installed = _run(run())
    except RuntimeError as exc:
        if "pip install" in str(exc):  # install_pgmq_sql without the pgmq package
            raise CliError(str(exc)) from None
        raise
    where = redact_url(args.db_url)
    if installed:
        print(f"Installed PGMQ (plain SQL) in {where}.")
    print(f"Applied the edge_worker migration to {where}.")
    return 0


# -- send -----------------------------------------------------------------------------------------


def _parse_json(text: str, where: str, fix: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno}): {fix}.") from None


def read_payloads(args: argparse.Namespace, stdin: TextIO) -> list[Any]:
    if args.json is not None:
        return [_parse_json(args.json, "The message", "quote it for the shell, e.g. '{\"id\": 1}'")]
    if stdin.isatty():
        print("Reading one JSON message per line from stdin (Ctrl-D to finish)...", file=sys.stderr)
    payloads = []
    for number, line in enumerate(stdin, start=1):
        if line.strip():
            payloads.append(_parse_json(line, f"Line {number} of stdin", "send one JSON document per line"))
    if not payloads:
        raise CliError("No messages on stdin: give the JSON as an argument or pipe one JSON document per line.")
    return payloads


def cmd_send(args: argparse.Namespace) -> int:
    payloads = read_payloads(args, sys.stdin)

    async def run() -> list[int]:
        async with _connection(args) as conn:
            queue = Queue(conn, args.queue)
            if not await queue.exists():
                raise CliError(_queue_missing(args.queue))
            ids: list[int] = []
            async with conn.transaction():  # all lines or none
                for start in range(0, len(payloads), SEND_CHUNK):
                    ids += await queue.send_batch(payloads[start:start + SEND_CHUNK], delay=args.delay)
            return ids

    for msg_id in _run(run()):
        print(msg_id)
    return 0


# -- status ---------------------------------------------------------------------------------------


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def collect_status(conn: asyncpg.Connection) -> dict[str, list[dict[str, Any]]]:
    """Per queue: depth, in flight, archived, dead letters. Per function: workers and enabled."""
    queues: dict[str, dict[str, Any]] = {}
    for row in await conn.fetch("select queue_name, queue_length from pgmq.metrics_all() order by queue_name"):
        name = row["queue_name"]
        # In flight: read at least once and invisible now (a handler has it, or it waits for a retry).
        in_flight = await conn.fetchval(
            f"select count(*) from pgmq.{_ident('q_' + name)} where vt > clock_timestamp() and read_ct > 0"
        )
        archived = await conn.fetchval(f"select count(*) from pgmq.{_ident('a_' + name)}")
        queues[name] = {"queue": name, "depth": row["queue_length"], "in_flight": in_flight,
                        "archived": archived, "dead_letters": 0}
    for row in await conn.fetch(
        "select queue_name, count(*) as n from edge_worker.dead_letters where requeued_at is null group by 1"
    ):
        entry = queues.setdefault(row["queue_name"], {"queue": row["queue_name"], "depth": None,
                                                      "in_flight": None, "archived": None, "dead_letters": 0})
        entry["dead_letters"] = row["n"]

    functions = await conn.fetch(
        """with names as (
             select function_name, queue_name, 1 as rank, null::timestamptz as started_at
               from edge_worker.functions
             union all
             select function_name, queue_name, 2, started_at from edge_worker.workers where stopped_at is null
           ), picked as (  -- the registered queue, else the newest live worker's
             select distinct on (function_name) function_name, queue_name
               from names order by function_name, rank, started_at desc
           )
           select n.function_name as function, n.queue_name as queue, f.enabled,
                  (select count(*) from edge_worker.active_workers a where a.function_name = n.function_name)
                    as active_workers,
                  (select count(*) from edge_worker.inactive_workers i where i.function_name = n.function_name)
                    as inactive_workers
             from picked n
             left join edge_worker.functions f using (function_name)
            order by n.function_name"""
    )
    return {"queues": [queues[k] for k in sorted(queues)], "functions": [dict(r) for r in functions]}


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def cmd_status(args: argparse.Namespace) -> int:
    async def run() -> dict[str, list[dict[str, Any]]]:
        async with _connection(args) as conn:
            return await collect_status(conn)

    status = _run(run())
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print("Queues")
    if status["queues"]:
        print(format_table(["QUEUE", "DEPTH", "IN FLIGHT", "ARCHIVED", "DEAD LETTERS"],
                           [[q["queue"], q["depth"], q["in_flight"], q["archived"], q["dead_letters"]]
                            for q in status["queues"]]))
    else:
        print("  (none yet: a worker creates its queue when it starts)")
    print()
    print("Functions")
    if status["functions"]:
        enabled = {True: "yes", False: "no (stopped)", None: "not registered"}
        print(format_table(["FUNCTION", "QUEUE", "ENABLED", "ACTIVE WORKERS", "INACTIVE WORKERS"],
                           [[f["function"], f["queue"], enabled[f["enabled"]], f["active_workers"],
                             f["inactive_workers"]] for f in status["functions"]]))
    else:
        print("  (none yet: start a worker or run 'worker-runtime register')")
    return 0


# -- stop -----------------------------------------------------------------------------------------


def cmd_stop(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _connection(args) as conn:
            known = await conn.fetchval(
                "select exists (select 1 from edge_worker.functions where function_name = $1)"
                " or exists (select 1 from edge_worker.workers where function_name = $1)",
                args.function,
            )
            if not known:
                raise CliError(f"No function named '{args.function}' is registered or has workers: "
                               "check the name with 'worker-runtime status'.")
            return await conn.fetchval("select edge_worker.stop_function($1)", args.function)

    count = _run(run())
    print(f"Stopped '{args.function}': {count} worker(s) deprecated; they stop at their next heartbeat, "
          "and the keep-alive no longer starts it (register it again to re-enable).")
    return 0


# -- register -------------------------------------------------------------------------------------


def cmd_register(args: argparse.Namespace) -> int:
    from . import keepalive

    secret = os.environ.get(AUTH_SECRET_ENV) if args.auth_secret_from_env else None
    if args.auth_secret_from_env and not secret:
        raise CliError(f"--auth-secret-from-env needs {AUTH_SECRET_ENV}: set it in the environment or in "
                       f"{DEFAULT_ENV_FILE} (the host checks starts against it).")
    worker_logging.register_secret(secret)

    async def run() -> Any:
        async with _connection(args) as conn:
            await keepalive.register_function(
                conn, args.name, args.queue, url=args.url, min_workers=args.min_workers,
                debounce_seconds=args.debounce, version=args.version,
            )
            if secret:
                await keepalive.set_vault_secret(conn, keepalive.AUTH_SECRET, secret)
                if args.url:
                    await keepalive.set_vault_secret(conn, keepalive.URL_SECRET, args.url)
            if args.schedule:
                return await keepalive.setup_keepalive(conn, args.schedule)
            return None

    job = _run(run())
    where = f" at {args.url}" if args.url else " (URL from the Vault secret edge_worker_url)"
    print(f"Registered '{args.name}' on queue '{args.queue}'{where}, min_workers={args.min_workers}.")
    if secret:
        print("Stored the auth secret" + (" and the URL" if args.url else "") + " in Vault.")
    if args.schedule:
        print(f"Keep-alive scheduled with pg_cron every '{args.schedule}' (job {job}).")
    return 0


# -- dead letters ---------------------------------------------------------------------------------


async def _require_queue_known(conn: asyncpg.Connection, queue: str) -> None:
    known = await conn.fetchval(
        "select exists (select 1 from pgmq.meta where queue_name = $1)"
        " or exists (select 1 from edge_worker.dead_letters where queue_name = $1)", queue,
    )
    if not known:
        raise CliError(_queue_missing(queue))


def cmd_dead_letters_list(args: argparse.Namespace) -> int:
    async def run() -> list[asyncpg.Record]:
        async with _connection(args) as conn:
            await _require_queue_known(conn, args.queue)
            return await conn.fetch(
                "select id, msg_id, read_ct, failed_at, function_name, error, message"
                " from edge_worker.dead_letters where queue_name = $1 and requeued_at is null order by id",
                args.queue,
            )

    rows = _run(run())
    if args.json:
        print(json.dumps([{**dict(r), "failed_at": r["failed_at"].isoformat()} for r in rows], indent=2))
        return 0
    if not rows:
        print(f"No dead letters in queue '{args.queue}'.")
        return 0

    def error_text(error: Any) -> str:
        error = error or {}
        text = f"{error.get('type')}: {error.get('message')}"
        return text if len(text) <= 80 else text[:77] + "..."

    print(format_table(
        ["ID", "MSG ID", "ATTEMPTS", "FAILED AT", "FUNCTION", "ERROR"],
        [[r["id"], r["msg_id"], r["read_ct"], r["failed_at"].strftime("%Y-%m-%d %H:%M:%S"), r["function_name"],
          error_text(r["error"])] for r in rows],
    ))
    print(f"\n{len(rows)} dead letter(s). Requeue with: worker-runtime dead-letters requeue {args.queue} "
          "--id ID ... (or --all)")
    return 0


def cmd_dead_letters_requeue(args: argparse.Namespace) -> int:
    async def run() -> list[asyncpg.Record]:
        async with _connection(args) as conn:
            await _require_queue_known(conn, args.queue)
            if not await Queue(conn, args.queue).exists():
                raise CliError(_queue_missing(args.queue))
            async with conn.transaction():  # all the given ids or none
                rows = await conn.fetch("select * from edge_worker.requeue_dead_letters($1, $2::bigint[])",
                                        args.queue, None if args.all else args.ids)
                if not args.all:
                    unknown = sorted(set(args.ids) - {r["dead_letter_id"] for r in rows})
                    if unknown:
                        raise CliError(
                            f"No dead letter(s) {', '.join(map(str, unknown))} waiting in queue '{args.queue}' "
                            f"(unknown or already requeued): see 'worker-runtime dead-letters list {args.queue}'."
                        )
            return rows

    rows = _run(run())
    if not rows:
        print(f"No dead letters to requeue in queue '{args.queue}'.")
        return 0
    pairs = ", ".join(f"{r['dead_letter_id']} -> msg {r['msg_id']}" for r in rows)
    print(f"Requeued {len(rows)} dead letter(s) to '{args.queue}': {pairs}")
    return 0


# -- demo -----------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .embedded import EmbeddedError, EmbeddedUnavailable, check_available

    try:
        check_available()  # before anything is printed or started
        from . import demo

        return demo.main(args.messages, verbose=args.verbose)
    except (EmbeddedUnavailable, EmbeddedError) as exc:
        raise CliError(str(exc)) from None
