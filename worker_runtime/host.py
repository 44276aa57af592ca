"""The function host: an HTTP server that starts worker functions on request.

Supabase starts an Edge Worker with an HTTP request to its function, and pg_cron's
keep-alive (`edge_worker.ensure_workers()`) sends that request whenever a function has
no live worker. Python worker functions cannot run on Supabase's Deno runtime, so this
host plays that part: it imports every `workers/<name>/worker.py`, and
`POST /functions/v1/<name>` (with the bearer secret) starts a worker for it in the
background. A worker that reaches its soft limit (`max_lifetime_seconds`) is replaced
in-process while its function is still enabled; SIGTERM stops every worker gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.util
import os
import re
import signal
import socket
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import uvicorn
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from . import db
from . import logging as worker_logging
from .config import (
    AUTH_SECRET_ENV, DB_URL_ENV, FUNCTION_NAME_PATTERN, FUNCTIONS_ENV_FILE, ConfigError, WorkerConfig,
)
from .edge_worker import WorkerSpec, collect
from .logging import get_logger, redact, register_secret
from .versioning import folder_version, worker_version
from .worker import State, Worker

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 54380
DEFAULT_ENV_FILE = FUNCTIONS_ENV_FILE
LIFETIME_REASON = "reached max_lifetime_seconds"
SHUTDOWN_REASON = SHUTTING_DOWN = "the function host is shutting down"

_FUNCTION_NAME = re.compile(FUNCTION_NAME_PATTERN)
_LIVE_STATES = (State.CREATED, State.STARTING, State.RUNNING)
_HISTORY = 10  # stopped workers kept per function for the status endpoint
_HOST_POOL_SIZE = 2

log = get_logger("FunctionHost")


class HostError(RuntimeError):
    """The host cannot start (no workers folder, port taken); the message says what to do."""


class ShuttingDown(RuntimeError):
    """A start was asked for after the host began to shut down."""


# -- worker functions on disk ---------------------------------------------------------------


@dataclass
class WorkerFunction:
    """One `workers/<name>/worker.py`: its spec, or why it could not be loaded."""

    name: str
    path: Path
    spec: WorkerSpec | None = None
    error: str | None = None  # one line, safe to show over HTTP
    content_hash: str | None = None  # folder_version() of the folder when it was loaded
    version: str | None = None  # what its workers run with (versioning.worker_version)

    @property
    def loaded(self) -> bool:
        return self.spec is not None


def load_function(name: str, path: Path) -> WorkerFunction:
    """Import one worker module inside `collect()`, so `EdgeWorker.start` records its spec.

    Each module gets its own name, so two functions' `worker.py` never replace each other
    in sys.modules. Any error (syntax, import, bad options) is kept, not raised.
    """
    module_name = f"edge_worker_functions.{name}"
    content_hash = _content_hash(path)
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        with collect() as specs:
            module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(module_name, None)
        summary = _one_line(f"{type(exc).__name__}: {exc}")
        log.error("Worker function '%s' failed to import (%s): %s", name, path, summary, exc_info=exc)
        return WorkerFunction(name, path, error=summary, content_hash=content_hash)
    if len(specs) != 1:
        found = "does not call" if not specs else f"calls {len(specs)} times"
        error = f"{path} {found} EdgeWorker.start(handler, ...): a worker function starts exactly one worker"
        log.error("Worker function '%s': %s", name, error)
        return WorkerFunction(name, path, error=error, content_hash=content_hash)
    version = worker_version(content_hash, specs[0].config.version) if content_hash else specs[0].config.version
    return WorkerFunction(name, path, spec=specs[0], content_hash=content_hash, version=version)


def _content_hash(path: Path) -> str | None:
    try:
        return folder_version(path.parent)
    except OSError:
        return None


def discover(workers_dir: str | os.PathLike[str]) -> dict[str, WorkerFunction]:
    """Every `<workers_dir>/<name>/worker.py`, by name. Folders starting with _ or . are skipped."""
    root = Path(workers_dir)
    if not root.is_dir():
        raise HostError(
            f"No worker functions folder at {root}: create {root}/<name>/worker.py "
            "(or scaffold one with copier) or pass --workers-dir."
        )
    functions: dict[str, WorkerFunction] = {}
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.name.startswith(("_", ".")) or not (folder / "worker.py").is_file():
            continue
        if not _FUNCTION_NAME.fullmatch(folder.name):
            log.warning("Skipping %s: a function name uses lowercase letters, digits, - and _ only", folder)
            continue
        functions[folder.name] = load_function(folder.name, folder / "worker.py")
    if not functions:
        log.warning("No worker functions in %s: add %s/<name>/worker.py calling EdgeWorker.start", root, root)
    return functions


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(redact(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# -- the host ---------------------------------------------------------------------------------


class FunctionHost:
    """Runs workers for the loaded functions; the HTTP layer below only translates."""

    def __init__(
        self,
        functions: dict[str, WorkerFunction],
        *,
        db_url: str,
        auth_secret: str | None,
        max_instances: int = 1,
    ) -> None:
        if max_instances < 1:
            raise ConfigError(f"Invalid max_instances={max_instances}: set it to 1 or more (default 1).")
        self.functions = functions
        self.db_url = db_url
        self.auth_secret = auth_secret
        self.max_instances = max_instances
        self.accepting = True
        self._workers: dict[str, list[Worker]] = {name: [] for name in functions}
        self._start_errors: dict[str, str] = {}
        self._after_stop: dict[str, str] = {}  # worker_id -> what the host did when it stopped
        self._starting: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._pool: asyncpg.Pool | None = None

    # lifecycle (the app's lifespan) ---------------------------------------------------------

    async def open(self) -> None:
        """Create the host's own small pool; it connects lazily, so a DB that is down
        shows in /health instead of keeping the host from starting."""
        self._pool = await db.create_pool(self.db_url, _HOST_POOL_SIZE, check=False)
        loaded = [name for name, fn in self.functions.items() if fn.loaded]
        failed = [name for name, fn in self.functions.items() if not fn.loaded]
        log.info("Function host ready: %d function(s) %s%s", len(loaded), ", ".join(loaded) or "-",
                 f"; failed to import: {', '.join(failed)}" if failed else "")

    async def close(self) -> None:
        """Refuse new starts, stop every worker gracefully (grace period each), close the pool."""
        self.accepting = False
        while running := await self._settle_starts():
            log.info("Stopping %d worker(s) gracefully", len(running))
            results = await asyncio.gather(*(w.stop(SHUTDOWN_REASON) for w in running), return_exceptions=True)
            for worker, result in zip(running, results):
                if isinstance(result, BaseException):
                    get_logger("FunctionHost", worker.worker_id).error(
                        "Worker did not stop cleanly: %s", _one_line(repr(result)))
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 10)
            self._pool.terminate()
        log.info("Function host stopped")

    async def _settle_starts(self) -> list[Worker]:
        """Let starts in progress finish (cancel them after 15 s); the workers not yet stopped."""
        if self._starting:
            _, pending = await asyncio.wait(set(self._starting), timeout=15)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return [w for workers in self._workers.values() for w in workers if w.state is not State.STOPPED]

    # starting workers ---------------------------------------------------------------------

    def live_workers(self, name: str) -> list[Worker]:
        return [w for w in self._workers.get(name, []) if w.state in _LIVE_STATES]

    def reload_if_changed(self, name: str) -> WorkerFunction:
        """Re-import a function whose folder changed since it was loaded (a deploy copied new
        code): new workers run the new code and version; running ones keep theirs until the
        deploy deprecates them."""
        function = self.functions[name]
        current = _content_hash(function.path)
        if current is None or current == function.content_hash:
            return function
        log.info("Worker function '%s' changed on disk (version %s -> %s): reloading it",
                 name, function.version or "-", current)
        self.functions[name] = function = load_function(name, function.path)
        return function

    async def start_worker(self, name: str, *, why: str = "request") -> tuple[str, Worker]:
        """('started', new worker) or ('running', a live one) when the instance limit is reached.

        The worker starts in the background: this returns before it has connected.
        """
        function = self.functions[name]
        assert function.spec is not None, f"function {name} is not loaded"
        async with self._lock:
            if not self.accepting:
                raise ShuttingDown(SHUTTING_DOWN)
            # Only workers of the loaded version count: during a deploy's hand-over the new
            # version starts while the old one finishes its messages.
            live = [w for w in self.live_workers(name) if w.config.version == function.version]
            if len(live) >= self.max_instances:
                return "running", live[0]
            worker = Worker(function.spec.handler, self._config_for(function), on_stopped=self._on_stopped)
            self._workers[name].append(worker)
        get_logger("FunctionHost", worker.worker_id).info("Starting a worker for function '%s' (%s)", name, why)
        task = asyncio.get_running_loop().create_task(self._start_in_background(name, worker))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)
        return "started", worker

    def _config_for(self, function: WorkerFunction) -> WorkerConfig:
        assert function.spec is not None
        config = function.spec.config
        update: dict[str, Any] = {"function_name": function.name, "version": function.version}
        if config.db_url is None:
            update["db_url"] = SecretStr(self.db_url)
        return config.model_copy(update=update)

    async def _start_in_background(self, name: str, worker: Worker) -> None:
        if worker.state is not State.CREATED:  # stopped by shutdown before it got going
            return
        try:
            await worker.start()
        except Exception as exc:
            if isinstance(exc, db.CONNECTION_ERRORS):
                message = db.describe_connect_error(exc, self.db_url)
            elif isinstance(exc, (db.DatabaseError, ConfigError)):
                message = str(exc)
            else:
                message = f"{type(exc).__name__}: {exc}"
            message = _one_line(message)
            self._start_errors[name] = message
            get_logger("FunctionHost", worker.worker_id).error("Worker for function '%s' failed to start: %s",
                                                               name, message)
            self._forget_old(name)
        else:
            self._start_errors.pop(name, None)

    async def _on_stopped(self, worker: Worker, reason: str) -> None:
        """A worker stopped. At its soft limit, start a replacement if the function is still wanted."""
        name = worker.function_name
        self._forget_old(name)
        self._after_stop[worker.worker_id] = await self._replace_if_wanted(worker, reason)

    async def _replace_if_wanted(self, worker: Worker, reason: str) -> str:
        name = worker.function_name
        if not reason.startswith(LIFETIME_REASON):
            return "not replaced: it did not stop at its lifetime limit"
        if not self.accepting or name not in self.functions:
            return "not replaced: the host is shutting down"
        wlog = get_logger("FunctionHost", worker.worker_id)
        if not await self._wanted(worker):
            wlog.info("Worker reached its lifetime limit; function '%s' is disabled or the worker deprecated, "
                      "so it is not replaced", name)
            return "not replaced: the function is disabled or the worker was deprecated"
        try:
            status, replacement = await self.start_worker(name, why="replacing a worker at its lifetime limit")
        except ShuttingDown:
            return "not replaced: the host is shutting down"
        if status == "running":
            return f"not replaced: {replacement.worker_id} already runs"
        wlog.info("Worker reached its lifetime limit; replacement %s started", replacement.worker_id)
        return f"replaced by {replacement.worker_id}"

    async def _wanted(self, worker: Worker) -> bool:
        """Still enabled in edge_worker.functions (or not registered there) and not deprecated."""
        try:
            row = await self.pool.fetchrow(
                "select (select w.deprecated_at is null from edge_worker.workers w where w.worker_id = $1) as current,"
                " (select f.enabled from edge_worker.functions f where f.function_name = $2) as enabled",
                uuid.UUID(worker.worker_id), worker.function_name,
            )
        except (*db.CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            get_logger("FunctionHost", worker.worker_id).warning(
                "Cannot check whether function '%s' is enabled (%s); the keep-alive will restart it",
                worker.function_name, type(exc).__name__)
            return False
        return row["current"] is not False and row["enabled"] is not False

    def _forget_old(self, name: str) -> None:
        workers = self._workers.get(name, [])
        stopped = [w for w in workers if w.state is State.STOPPED]
        for worker in stopped[:-_HISTORY]:
            workers.remove(worker)
            self._after_stop.pop(worker.worker_id, None)

    # checks and status ----------------------------------------------------------------------

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "the host is not open"
        return self._pool

    def authorized(self, header: str | None) -> bool:
        """`Authorization: Bearer <secret>`, compared in constant time."""
        if self.auth_secret is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode(), self.auth_secret.encode())

    async def database_error(self) -> str | None:
        """None when a query works, else a short reason (no URL, no password)."""
        try:
            await asyncio.wait_for(self.pool.fetchval("select 1"), 5)
        except (*db.CONNECTION_ERRORS, asyncpg.PostgresError, TimeoutError) as exc:
            log.warning("Health check: %s", db.describe_connect_error(exc, self.db_url))
            return f"database unreachable ({type(exc).__name__})"
        return None

    def status(self, name: str) -> dict[str, Any]:
        function = self.functions[name]
        return {
            "function_name": name,
            "loaded": function.loaded,
            "error": function.error,
            "queue_name": function.spec.config.queue_name if function.spec else None,
            "version": function.version,
            "accepting": self.accepting,
            "max_instances": self.max_instances,
            "live": len(self.live_workers(name)),
            "last_start_error": self._start_errors.get(name),
            "workers": [self._worker_status(w) for w in self._workers.get(name, [])],
        }

    def _worker_status(self, worker: Worker) -> dict[str, Any]:
        s = worker.stats
        return {
            "worker_id": worker.worker_id,
            "version": worker.config.version,
            "state": worker.state.value,
            "in_flight": worker.in_flight,
            "stats": {"processed": s.processed, "failed": s.failed, "retried": s.retried,
                      "dead_lettered": s.dead_lettered},
            "stop_reason": worker.stop_reason,
            "after_stop": self._after_stop.get(worker.worker_id),
        }


# -- HTTP ---------------------------------------------------------------------------------------


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _unauthorized(request: Request, host: FunctionHost) -> JSONResponse | None:
    if host.authorized(request.headers.get("authorization")):
        return None
    client = request.client.host if request.client else "?"
    log.warning("Rejected %s %s from %s: missing or wrong bearer secret", request.method, request.url.path, client)
    return _error(401, f"missing or wrong secret: send Authorization: Bearer <{AUTH_SECRET_ENV}>",
                  **{"WWW-Authenticate": "Bearer"})


def _lookup(host: FunctionHost, name: str) -> WorkerFunction | JSONResponse:
    function = host.functions.get(name)
    if function is None:
        return _error(404, f"no worker function '{name}' in this host")
    return function


async def _start(request: Request) -> JSONResponse:
    host: FunctionHost = request.app.state.host
    if not host.accepting:
        return _error(503, SHUTTING_DOWN)
    if (denied := _unauthorized(request, host)) is not None:
        return denied
    function = _lookup(host, request.path_params["name"])
    if isinstance(function, JSONResponse):
        return function
    function = host.reload_if_changed(function.name)
    if not function.loaded:
        return _error(500, f"worker function '{function.name}' failed to import: {function.error}")
    try:
        status, worker = await host.start_worker(function.name)
    except ShuttingDown as exc:
        return _error(503, str(exc))
    return JSONResponse({"status": status, "worker_id": worker.worker_id, "function_name": function.name})


async def _status(request: Request) -> JSONResponse:
    host: FunctionHost = request.app.state.host
    if (denied := _unauthorized(request, host)) is not None:
        return denied
    function = _lookup(host, request.path_params["name"])
    if isinstance(function, JSONResponse):
        return function
    return JSONResponse(host.status(function.name))


async def _health(request: Request) -> JSONResponse:
    host: FunctionHost = request.app.state.host
    failed = {name: fn.error for name, fn in host.functions.items() if not fn.loaded}
    body: dict[str, Any] = {"functions": sorted(n for n, fn in host.functions.items() if fn.loaded)}
    if failed:
        body["failed_imports"] = failed
    if not host.accepting:
        return JSONResponse({"status": "shutting_down", **body}, status_code=503)
    if (problem := await host.database_error()) is not None:
        return JSONResponse({"status": "unavailable", "error": problem, **body}, status_code=503)
    return JSONResponse({"status": "ok", **body})


def create_app(
    workers_dir: str | os.PathLike[str] = "workers",
    *,
    db_url: str | None = None,
    auth_secret: str | None = None,
    max_instances: int = 1,
    insecure_no_auth: bool = False,
) -> Starlette:
    """The ASGI app. `db_url` defaults to EDGE_WORKER_DB_URL and `auth_secret` to
    EDGE_WORKER_AUTH_SECRET; without a secret it refuses (ConfigError) unless
    `insecure_no_auth`. The FunctionHost is at `app.state.host`."""
    url = db_url or os.environ.get(DB_URL_ENV)
    if not url:
        raise ConfigError(f"No database URL: set {DB_URL_ENV} (for example in {DEFAULT_ENV_FILE}) or pass --db-url.")
    secret = auth_secret if auth_secret is not None else os.environ.get(AUTH_SECRET_ENV)
    if insecure_no_auth:
        log.warning("Authentication is OFF (--insecure-no-auth): anyone who can reach this host can start "
                    "workers; use it only on a private machine")
        secret = None
    elif not secret:
        raise ConfigError(
            f"{AUTH_SECRET_ENV} is not set: put a long random value in {DEFAULT_ENV_FILE} (the same value as "
            "the Vault secret edge_worker_auth_secret), or pass --insecure-no-auth on a private machine."
        )
    register_secret(secret)
    host = FunctionHost(discover(workers_dir), db_url=url, auth_secret=secret, max_instances=max_instances)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await host.open()
        try:
            yield
        finally:
            await host.close()

    app = Starlette(
        routes=[
            Route("/health", _health, methods=["GET"]),
            Route("/functions/v1/{name}", _start, methods=["POST"]),
            Route("/functions/v1/{name}/status", _status, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.host = host
    return app


# -- serve --------------------------------------------------------------------------------------


def load_env_file(env_file: str | os.PathLike[str] | None) -> bool:
    """Load KEY=value lines into the environment without overriding what is already set."""
    if not env_file:
        return False
    path = Path(env_file)
    if not path.is_file():
        log.info("No env file at %s; using the environment as it is", path)
        return False
    from dotenv import load_dotenv

    load_dotenv(path, override=False)
    log.info("Loaded settings from %s", path)
    return True


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise HostError(
            f"Cannot listen on {host}:{port} ({exc.strerror or exc}): stop whatever uses the port or pass --port."
        ) from None
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def _clean_exit_on_signals(server: uvicorn.Server) -> Iterator[None]:
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown so outer handlers run;
    these handlers make that a normal return (exit code 0). A signal that arrives before
    uvicorn installed its own still asks the server to exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, frame: object) -> None:
        server.should_exit = True

    previous = {sig: signal.signal(sig, _exit) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(
    workers_dir: str | os.PathLike[str] = "workers",
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    env_file: str | os.PathLike[str] | None = DEFAULT_ENV_FILE,
    db_url: str | None = None,
    max_instances: int = 1,
    insecure_no_auth: bool = False,
) -> None:
    """`worker-runtime serve`: load the env file, import the worker functions, serve until
    SIGTERM/SIGINT, then stop every worker gracefully and return.

    Raises ConfigError (no DB URL, no auth secret) or HostError (no workers folder, port
    taken) with one sentence that says what to change.
    """
    worker_logging.configure()
    load_env_file(env_file)
    app = create_app(workers_dir, db_url=db_url, max_instances=max_instances, insecure_no_auth=insecure_no_auth)
    sock = _bind(host, port)
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False, server_header=False)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    log.info("Function host listening on http://%s:%d (POST /functions/v1/<name>)", shown, port)
    try:
        with _clean_exit_on_signals(server):
            server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise HostError("The function host did not start: see the error logged above.")
