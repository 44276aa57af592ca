"""`python scripts/deploy.py WORKER_NAME`: deploy one worker function with the Supabase CLI.

Run from the project root (the folder with `workers/` and `supabase/`). The steps, each
printed with its duration:

1. preflight   the CLI (>= 2.0.2), the worker imports and its options validate, the project
               ref, the database, the Supabase login, the worker host and its auth secret.
               Nothing is changed until all of these pass.
2. migrations  `supabase db push` (--db-url when given, else the linked project).
3. start       POST <worker-url>/functions/v1/<name>: the host (re)loads the folder and
               starts a worker of the new version beside the old one.
4. verify      wait until a worker of the new version heartbeats.
5. secrets     `supabase secrets set --env-file supabase/functions/.env`; the worker URL and
               auth secret into Vault, where pg_cron's keep-alive reads them.
6. hand-over   record the version in edge_worker.functions, then deprecate the workers of
               other versions: they finish their in-flight messages and stop.

The version is the content hash of `workers/<name>/` (worker_runtime.versioning), which
the host computes the same way. The keep-alive's URL and secret change only once they
have started a live worker, and the old version is deprecated only after the new one is
proven alive, so every failure leaves the previous version running. Exit codes: 0
deployed, 1 failed (the message names the step, the cause and the fix), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

import asyncpg
import httpx

from . import db
from . import logging as worker_logging
from .config import AUTH_SECRET_ENV, DB_URL_ENV, FUNCTION_NAME_PATTERN, FUNCTIONS_ENV_FILE
from .keepalive import AUTH_SECRET, URL_SECRET, register_function, set_vault_secret

PROG = "deploy"
MIN_CLI_VERSION = (2, 0, 2)
ENV_FILE = Path(FUNCTIONS_ENV_FILE)
PROJECT_REF_FILE = Path("supabase/.temp/project-ref")
WORKER_URL_ENV = "EDGE_WORKER_URL"
PROJECT_REF_ENV = "SUPABASE_PROJECT_REF"
ACCESS_TOKEN_ENV = "SUPABASE_ACCESS_TOKEN"
DEFAULT_TIMEOUT = 60.0
CLI_TIMEOUT = 600.0
HTTP_TIMEOUT = 15.0
LIVE_WINDOW = "6 seconds"  # the seed's active_workers window
STEPS = ("preflight", "migrations", "start", "verify", "secrets", "hand-over")
INSTALL_CLI = ("install the Supabase CLI (npm i -g supabase, brew install supabase/tap/supabase or scoop install "
               "supabase) or pass --supabase-bin /path/to/supabase")
KEEPS_RUNNING = "The previous version keeps running: no worker was deprecated."


class UsageError(Exception):
    """Bad arguments (exit 2)."""


class DeployError(Exception):
    """A step failed: what happened and what to do about it."""

    def __init__(self, cause: str, fix: str, details: str = "") -> None:
        super().__init__(cause)
        self.cause = cause
        self.fix = fix
        self.details = details


@dataclass
class Settings:
    worker_name: str
    project_ref: str | None
    db_url: str | None  # for `db push`; None: the linked project
    worker_url: str | None
    dry_run: bool
    yes: bool
    supabase_bin: str | None
    profile: str | None
    timeout: float


@dataclass
class Plan:
    """What preflight found; every later step works from it."""

    name: str
    folder: Path
    version: str
    queue_name: str
    cli: str
    cli_version: str
    project_ref: str
    db_url: str  # for asyncpg: --db-url, else EDGE_WORKER_DB_URL
    push_db_url: str | None  # for `supabase db push`: --db-url, else the linked project
    worker_url: str
    auth_secret: str
    profile: str | None
    env_file: Path | None
    live_other_versions: list[tuple[str, str | None]] = field(default_factory=list)


# -- output ------------------------------------------------------------------------------------


class Output:
    """Progress lines with durations; every line goes through the secret filter.

    It keeps its own list of secrets (the DB password, the auth secret, the access token)
    rather than worker_runtime.logging's, which also hides the Vault URL the summary shows.
    """

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out = out
        self.err = err
        self.step_name = "preflight"
        self.secrets: set[str] = set()

    def hide(self, *values: str | None) -> None:
        self.secrets.update(v for v in values if v and len(v) >= 3)

    def hide_url_password(self, url: str | None) -> None:
        password = urlsplit(url).password if url else None
        if password:
            self.hide(password, unquote(password))

    def redact(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    def command(self, command: Sequence[str]) -> str:
        """A command line to show: secrets masked in each argument, then shell-quoted."""
        return shlex.join(self.redact(part) for part in command)

    def say(self, text: str = "", *, err: bool = False) -> None:
        stream = self.err if err else self.out
        print(self.redact(text), file=stream, flush=True)

    def detail(self, text: str) -> None:
        self.say(f"      {text}")

    @contextlib.contextmanager
    def step(self, name: str, what: str) -> Iterator[None]:
        self.step_name = name
        number = STEPS.index(name) + 1
        self.say(f"[{number}/{len(STEPS)}] {name}: {what}")
        started = time.monotonic()
        yield
        self.say(f"      ok ({time.monotonic() - started:.1f} s)")

    def failed(self, exc: DeployError) -> None:
        number = STEPS.index(self.step_name) + 1
        if exc.details:
            self.say(exc.details.rstrip(), err=True)
        self.say(f"{PROG}: failed at step {number}/{len(STEPS)} ({self.step_name}): {exc.cause}", err=True)
        self.say(f"{PROG}: fix: {exc.fix}", err=True)
        self.say(f"{PROG}: {KEEPS_RUNNING}", err=True)


# -- the Supabase CLI --------------------------------------------------------------------------


def find_cli(explicit: str | None) -> str:
    if explicit:
        path = Path(explicit)
        if not path.is_file() or not os.access(path, os.X_OK):
            raise DeployError(f"--supabase-bin {explicit} is not an executable file", INSTALL_CLI)
        return str(path)
    found = shutil.which("supabase")
    if found is None:
        raise DeployError("the Supabase CLI (supabase) is not on PATH", INSTALL_CLI)
    return found


def parse_version(text: str) -> tuple[int, int, int] | None:
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


async def run_cli(command: Sequence[str], timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run the CLI from the project root; never interactive (stdin is empty)."""
    try:
        return await asyncio.to_thread(
            subprocess.run, list(command), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise DeployError(f"`{shlex.join(command[:3])} ...` did not finish within {timeout:.0f} s",
                          "check your network and the Supabase status page, then run deploy again") from None
    except OSError as exc:
        raise DeployError(f"cannot run the Supabase CLI ({exc.strerror or exc})", INSTALL_CLI) from None


def cli_output(result: subprocess.CompletedProcess[str], limit: int = 40) -> str:
    lines = [line for line in (result.stdout + "\n" + result.stderr).splitlines() if line.strip()]
    if len(lines) > limit:
        lines = ["…", *lines[-limit:]]
    return "\n".join(f"  | {line}" for line in lines)


def describe_login_failure(output: str, project_ref: str) -> tuple[str, str]:
    login_fix = (f"run `supabase login`, or set {ACCESS_TOKEN_ENV} to a personal access token "
                 "(sbp_…, Dashboard > Account > Access Tokens)")
    if "Invalid project ref" in output:
        return f"{project_ref!r} is not a project ref", "give the 20-letter ref from Dashboard > Project Settings"
    if "Access token not provided" in output:
        return "not logged in to Supabase: the CLI has no access token", login_fix
    if "Invalid access token format" in output:
        return f"{ACCESS_TOKEN_ENV} is not a personal access token (it must look like sbp_ and 40 hex digits)", login_fix
    if re.search(r"\b401\b|Unauthorized", output):
        return "the Supabase Management API rejected the access token (401)", login_fix + " that is still valid"
    if re.search(r"\b403\b|Forbidden|\b404\b|not found", output, re.IGNORECASE):
        fix = ("check the project ref (--project-ref, or `supabase link`) and that your account belongs to its "
               "organization")
        return f"the access token has no access to project {project_ref}", fix
    return "the Supabase CLI could not reach the project", "read the CLI's message above, fix it and run deploy again"


# -- the worker host ---------------------------------------------------------------------------


def auth_header(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def unreachable(url: str, exc: Exception) -> DeployError:
    return DeployError(
        f"the worker host at {url} is unreachable ({type(exc).__name__})",
        "start it (locally `worker-runtime serve`; in production the container built from the Dockerfile) and "
        f"check --worker-url / {WORKER_URL_ENV} in {ENV_FILE}: the URL must reach the host from here and from the "
        "database's pg_cron",
    )


def rejected(url: str, response: httpx.Response) -> DeployError:
    return DeployError(
        f"the worker host rejected the auth secret: {url} answered 401 ({error_of(response)})",
        f"{AUTH_SECRET_ENV} in {ENV_FILE} must equal the host's {AUTH_SECRET_ENV}: set the same value in both "
        "and restart the host",
    )


def error_of(response: httpx.Response) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        body = response.json()
        if isinstance(body, dict) and body.get("error"):
            return str(body["error"])
    return response.text.strip()[:200] or response.reason_phrase


async def check_host(client: httpx.AsyncClient, plan: Plan) -> dict[str, Any]:
    """The host answers, reaches its database, accepts our secret and serves the function."""
    base = plan.worker_url
    try:
        health = await client.get(f"{base}/health")
    except httpx.HTTPError as exc:
        raise unreachable(base, exc) from None
    if health.status_code == 503:
        raise DeployError(f"the worker host at {base} is not ready: {error_of(health)}",
                          "check the host's log; its EDGE_WORKER_DB_URL must reach the database (the host "
                          "answers /health with 'ok' once it does)")
    try:
        status = await client.get(f"{base}/functions/v1/{plan.name}/status", headers=auth_header(plan.auth_secret))
    except httpx.HTTPError as exc:
        raise unreachable(base, exc) from None
    if status.status_code == 401:
        raise rejected(base, status)
    if status.status_code == 404:
        raise DeployError(
            f"the worker host at {base} does not serve '{plan.name}'",
            f"give the host this project's workers/{plan.name}/ and restart it (in production rebuild and roll out "
            "the container from the Dockerfile): the host finds new function folders when it starts",
        )
    if status.status_code != 200:
        raise DeployError(f"the worker host at {base} answered {status.status_code}: {error_of(status)}",
                          "check the host's log")
    return status.json()


# -- steps -------------------------------------------------------------------------------------


class Deploy:
    def __init__(self, settings: Settings, output: Output) -> None:
        self.s = settings
        self.o = output

    @contextlib.asynccontextmanager
    async def connection(self, url: str) -> AsyncIterator[asyncpg.Connection]:
        try:
            conn = await db.connect(url)
        except db.DatabaseError as exc:
            raise DeployError(str(exc), f"fix --db-url or {DB_URL_ENV} in {ENV_FILE}") from None
        try:
            yield conn
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    def cli(self, plan: Plan, *args: str) -> list[str]:
        command = [plan.cli, *args]
        if plan.profile:
            command += ["--profile", plan.profile]
        return command

    # 1 ---------------------------------------------------------------------------------------

    async def preflight(self) -> Plan:
        s = self.s
        with self.o.step("preflight", "CLI, worker, project, database, login, worker host"):
            cli = find_cli(s.supabase_bin)
            result = await run_cli([cli, "--version"], timeout=120)
            version = parse_version(result.stdout + result.stderr)
            if result.returncode != 0 or version is None:
                raise DeployError(f"`{cli} --version` failed (exit {result.returncode})", INSTALL_CLI,
                                  cli_output(result))
            if version < MIN_CLI_VERSION:
                need = ".".join(map(str, MIN_CLI_VERSION))
                raise DeployError(
                    f"the Supabase CLI at {cli} is {'.'.join(map(str, version))}, too old: deploy needs {need} or later",
                    "upgrade it (npm i -g supabase@latest, brew upgrade supabase or scoop update supabase) or pass "
                    "--supabase-bin with a newer one")
            cli_version = ".".join(map(str, version))
            self.o.detail(f"Supabase CLI {cli_version} ({cli})")

            folder, queue_name, worker_version = self.load_worker()
            self.o.detail(f"workers/{s.worker_name}/worker.py imports; queue '{queue_name}'; version {worker_version}")

            env_file = ENV_FILE if ENV_FILE.is_file() else None
            if env_file is not None:
                from dotenv import load_dotenv

                load_dotenv(env_file, override=False)
            db_url = s.db_url or os.environ.get(DB_URL_ENV)
            auth_secret = os.environ.get(AUTH_SECRET_ENV)
            worker_url = (s.worker_url or os.environ.get(WORKER_URL_ENV) or "").rstrip("/")
            self.o.hide_url_password(db_url)
            self.o.hide(auth_secret, os.environ.get(ACCESS_TOKEN_ENV))
            if not db_url:
                raise DeployError("no database URL", f"pass --db-url or set {DB_URL_ENV} in {ENV_FILE}")
            if not auth_secret:
                raise DeployError(f"{AUTH_SECRET_ENV} is not set",
                                  f"set it in {ENV_FILE} to the secret the worker host checks (a long random value)")
            if not worker_url:
                raise DeployError("no worker URL", f"pass --worker-url or set {WORKER_URL_ENV} in {ENV_FILE} to the "
                                  "base URL of the worker host (where `worker-runtime serve` listens)")
            if not re.match(r"^https?://[^/\s]+", worker_url):
                raise DeployError(f"the worker URL {worker_url!r} is not an http(s) URL",
                                  "give the host's base URL, e.g. https://workers.example.com")

            project_ref = self.project_ref()
            self.o.detail(f"project {project_ref}")

            plan = Plan(
                name=s.worker_name, folder=folder, version=worker_version, queue_name=queue_name, cli=cli,
                cli_version=cli_version, project_ref=project_ref, db_url=db_url, push_db_url=s.db_url,
                worker_url=worker_url, auth_secret=auth_secret, profile=s.profile, env_file=env_file,
            )

            async with self.connection(db_url) as conn:
                if await conn.fetchval("select to_regnamespace('vault')") is None:
                    raise DeployError("Supabase Vault is not enabled in the database",
                                      "enable the supabase_vault extension (Dashboard > Database > Extensions)")
                if await conn.fetchval("select to_regclass('edge_worker.workers')") is not None:
                    rows = await conn.fetch(
                        "select worker_id::text, version from edge_worker.workers where function_name = $1 "
                        "and stopped_at is null and deprecated_at is null "
                        f"and last_heartbeat_at > now() - interval '{LIVE_WINDOW}' "
                        "and version is distinct from $2 order by started_at", s.worker_name, worker_version)
                    plan.live_other_versions = [(r["worker_id"], r["version"]) for r in rows]
            self.o.detail(f"database {db.redact_url(db_url)} reachable")

            login = self.cli(plan, "secrets", "list", "--project-ref", project_ref)
            result = await run_cli(login, timeout=120)
            if result.returncode != 0:
                cause, fix = describe_login_failure(result.stdout + result.stderr, project_ref)
                raise DeployError(cause, fix, cli_output(result))
            self.o.detail(f"logged in to Supabase, project {project_ref} reachable")

            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
                status = await check_host(client, plan)
            running = status.get("version")
            self.o.detail(f"worker host {worker_url} answers" +
                          (f" (loaded version {running})" if running else ""))
        return plan

    def load_worker(self) -> tuple[Path, str, str]:
        """Import workers/<name>/worker.py as the host does: (folder, queue, version)."""
        from .host import load_function  # Starlette and uvicorn load only here

        name = self.s.worker_name
        workers = Path("workers")
        path = workers / name / "worker.py"
        if not path.is_file():
            others = sorted(p.parent.name for p in workers.glob("*/worker.py")) if workers.is_dir() else []
            where = f"the worker functions here: {', '.join(others)}" if others else "there are none here"
            if not workers.is_dir():
                fix = "run deploy from the project root (the folder with workers/ and supabase/)"
            else:
                fix = f"check the name ({where}) or scaffold it: copier copy --trust <kit> . with worker_name={name}"
            raise DeployError(f"no worker function '{name}': {path} does not exist", fix)
        host_log = logging.getLogger("worker_runtime.FunctionHost")
        previous = host_log.disabled
        host_log.disabled = True  # the error comes back in the result; no traceback on screen
        try:
            function = load_function(name, path)
        finally:
            host_log.disabled = previous
        if function.spec is None or function.version is None:
            raise DeployError(f"{path} does not load: {function.error}",
                              f"fix it (`pytest workers/{name}` runs its tests) and run deploy again")
        return path.parent, function.spec.config.queue_name, function.version

    def project_ref(self) -> str:
        ref = self.s.project_ref or os.environ.get(PROJECT_REF_ENV)
        if not ref and PROJECT_REF_FILE.is_file():
            ref = PROJECT_REF_FILE.read_text().strip()
        if not ref:
            raise DeployError("the Supabase project is unknown",
                              f"pass --project-ref <ref> (Dashboard > Project Settings), set {PROJECT_REF_ENV}, "
                              "or run `supabase link --project-ref <ref>`")
        return ref

    # 2 ---------------------------------------------------------------------------------------

    def push_command(self, plan: Plan) -> list[str]:
        target = ["--db-url", plan.push_db_url] if plan.push_db_url else ["--linked"]
        return self.cli(plan, "db", "push", *target, "--yes")

    async def migrations(self, plan: Plan) -> None:
        command = self.push_command(plan)
        with self.o.step("migrations", self.o.command(command)):
            result = await run_cli(command)
            if result.returncode != 0:
                repair = "migration repair" in result.stdout + result.stderr
                raise DeployError(
                    "the database refused a migration (supabase db push failed; its message is above)",
                    "fix the migration the CLI names and run deploy again; "
                    + ("if the migration history is out of step, run the `supabase migration repair` command the "
                       "CLI suggests above" if repair else
                       "if the remote's migration history and supabase/migrations disagree, `supabase migration "
                       "list` shows how and `supabase migration repair` fixes the history"),
                    cli_output(result),
                )
            applied = [line.strip() for line in (result.stdout + result.stderr).splitlines()
                       if line.strip().startswith("Applying migration")]
            self.o.detail("; ".join(applied) if applied else "the database is up to date")

    # 5 ---------------------------------------------------------------------------------------

    def secrets_command(self, plan: Plan, env_file: Path) -> list[str]:
        return self.cli(plan, "secrets", "set", "--env-file", str(env_file), "--project-ref", plan.project_ref)

    async def secrets(self, plan: Plan) -> None:
        with self.o.step("secrets", f"Vault {URL_SECRET}, {AUTH_SECRET}; function secrets of {plan.project_ref}"):
            with self.env_file(plan) as env_file:
                command = self.secrets_command(plan, env_file)
                result = await run_cli(command)
            if result.returncode != 0:
                cause, fix = describe_login_failure(result.stdout + result.stderr, plan.project_ref)
                raise DeployError(f"`supabase secrets set` failed: {cause}", fix, cli_output(result))
            self.o.detail(f"{self.o.command(command)}: set {', '.join(self.secret_names(plan))}")
            async with self.connection(plan.db_url) as conn, conn.transaction():
                await set_vault_secret(conn, URL_SECRET, plan.worker_url, "Base URL of the worker function host")
                await set_vault_secret(conn, AUTH_SECRET, plan.auth_secret, "Bearer secret for the worker function host")
            self.o.detail(f"Vault: {URL_SECRET} = {plan.worker_url}, {AUTH_SECRET} = ***")

    @contextlib.contextmanager
    def env_file(self, plan: Plan) -> Iterator[Path]:
        """The project's supabase/functions/.env, or (values only in the environment) a private temp copy."""
        if plan.env_file is not None:
            yield plan.env_file
            return
        import tempfile

        fd, name = tempfile.mkstemp(prefix="deploy-", suffix=".env")
        try:
            with os.fdopen(fd, "w") as f:
                for key, value in self.secret_values(plan).items():
                    f.write(f"{key}={value}\n")
            yield Path(name)
        finally:
            os.unlink(name)

    def secret_values(self, plan: Plan) -> dict[str, str]:
        values = {DB_URL_ENV: os.environ.get(DB_URL_ENV) or plan.db_url, AUTH_SECRET_ENV: plan.auth_secret,
                  WORKER_URL_ENV: plan.worker_url}
        return {k: v for k, v in values.items() if v}

    def secret_names(self, plan: Plan) -> list[str]:
        if plan.env_file is None:
            return sorted(self.secret_values(plan))
        from dotenv import dotenv_values

        return sorted(k for k in dotenv_values(plan.env_file) if not k.startswith("SUPABASE_"))

    # 3, 4 ------------------------------------------------------------------------------------

    async def start(self, plan: Plan) -> tuple[str, Any]:
        url = f"{plan.worker_url}/functions/v1/{plan.name}"
        with self.o.step("start", f"POST {url}"):
            async with self.connection(plan.db_url) as conn:
                since = await conn.fetchval("select now()")
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
                try:
                    response = await client.post(url, headers=auth_header(plan.auth_secret),
                                                 json={"source": "deploy", "version": plan.version})
                except httpx.HTTPError as exc:
                    raise unreachable(plan.worker_url, exc) from None
            if response.status_code == 401:
                raise rejected(plan.worker_url, response)
            if response.status_code == 500:
                raise DeployError(f"the worker host could not load '{plan.name}': {error_of(response)}",
                                  f"the host's copy of workers/{plan.name}/ differs from this one or lacks a "
                                  "dependency: roll this code out to the host (requirements.txt too) and deploy again")
            if response.status_code != 200:
                raise DeployError(f"the worker host answered {response.status_code}: {error_of(response)}",
                                  "check the host's log and run deploy again")
            body = response.json()
            worker_id = str(body.get("worker_id"))
            self.o.detail(f"worker {worker_id} {body.get('status')}")
        return worker_id, since

    async def verify(self, plan: Plan, worker_id: str, since: Any) -> str:
        with self.o.step("verify", f"a worker of version {plan.version} heartbeats (up to {self.s.timeout:g} s)"):
            deadline = time.monotonic() + self.s.timeout
            async with self.connection(plan.db_url) as conn:
                while True:
                    row = await conn.fetchrow(
                        "select version from edge_worker.workers where worker_id = $1", _uuid(worker_id))
                    if row is not None and row["version"] != plan.version:
                        raise DeployError(
                            f"the worker host at {plan.worker_url} runs version {row['version']} of '{plan.name}', "
                            f"this folder is version {plan.version}",
                            "the host serves its own copy of workers/: roll this code out to it (rebuild and restart "
                            "the container built from the Dockerfile; locally run `worker-runtime serve` in this "
                            "project) and deploy again")
                    found = await conn.fetchval(
                        "select worker_id::text from edge_worker.workers where function_name = $1 and version = $2 "
                        "and stopped_at is null and deprecated_at is null "
                        "and last_heartbeat_at > greatest(started_at, $3) "
                        "order by (worker_id::text = $4) desc, started_at desc limit 1",
                        plan.name, plan.version, since, worker_id)
                    if found:
                        self.o.detail(f"worker {found} (version {plan.version}) heartbeats")
                        return str(found)
                    if time.monotonic() > deadline:
                        raise await self.no_heartbeat(plan, worker_id, registered=row is not None)
                    await asyncio.sleep(0.25)
        raise AssertionError("unreachable")  # pragma: no cover

    async def no_heartbeat(self, plan: Plan, worker_id: str, *, registered: bool) -> DeployError:
        host_says = ""
        with contextlib.suppress(Exception):
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
                status = (await client.get(f"{plan.worker_url}/functions/v1/{plan.name}/status",
                                           headers=auth_header(plan.auth_secret))).json()
            if status.get("last_start_error"):
                host_says = f"; the host reports: {status['last_start_error']}"
        where = "" if registered else f"; worker {worker_id} never registered in {db.redact_url(plan.db_url)}"
        return DeployError(
            f"no worker of version {plan.version} heartbeated within {self.s.timeout:g} s{where}{host_says}",
            "check the worker host's log: it must use the same database as this deploy (its EDGE_WORKER_DB_URL) "
            "and be able to reach it; raise --timeout if the worker starts slowly",
        )

    # 6 ---------------------------------------------------------------------------------------

    async def hand_over(self, plan: Plan) -> tuple[list[str], list[str]]:
        """(deprecated worker ids, those still finishing their messages)."""
        with self.o.step("hand-over", f"record version {plan.version}; deprecate other versions"):
            async with self.connection(plan.db_url) as conn:
                async with conn.transaction():
                    row = await conn.fetchrow(
                        "select url, min_workers, extract(epoch from debounce)::float8 as debounce "
                        "from edge_worker.functions where function_name = $1 for update", plan.name)
                    await register_function(
                        conn, plan.name, plan.queue_name, url=row["url"] if row else None,
                        min_workers=row["min_workers"] if row else 1,
                        debounce_seconds=row["debounce"] if row else 10, version=plan.version, enabled=True)
                    old = [r["worker_id"] for r in await conn.fetch(
                        "select worker_id::text from edge_worker.workers where function_name = $1 "
                        "and stopped_at is null and deprecated_at is null and version is distinct from $2",
                        plan.name, plan.version)]
                    count = await conn.fetchval("select edge_worker.deprecate_workers($1, $2)", plan.name, plan.version)
                self.o.detail(f"edge_worker.functions: '{plan.name}' version {plan.version}, enabled")
                if not count:
                    self.o.detail("no worker of another version was running")
                    return [], []
                self.o.detail(f"deprecated {count} worker(s) of other versions: {', '.join(old)}")
                deadline = time.monotonic() + self.s.timeout
                while True:
                    running = [r["worker_id"] for r in await conn.fetch(
                        "select worker_id::text from edge_worker.workers where worker_id = any($1::uuid[]) "
                        f"and stopped_at is null and last_heartbeat_at > now() - interval '{LIVE_WINDOW}'",
                        old)]
                    if not running or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.25)
                if running:
                    self.o.detail(f"still finishing their messages: {', '.join(running)} (they stop on their own)")
                else:
                    self.o.detail("the old workers finished their messages and stopped")
                return old, running

    # the whole run ---------------------------------------------------------------------------

    async def run(self) -> int:
        started = time.monotonic()
        plan = await self.preflight()
        if self.s.dry_run:
            self.print_plan(plan)
            return 0
        if not self.s.yes and sys.stdin.isatty():
            answer = input(f"Deploy '{plan.name}' version {plan.version} to project {plan.project_ref}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                self.o.say(f"{PROG}: cancelled; nothing was changed.")
                return 1
        await self.migrations(plan)
        worker_id, since = await self.start(plan)
        worker_id = await self.verify(plan, worker_id, since)
        await self.secrets(plan)
        old, running = await self.hand_over(plan)
        self.summary(plan, worker_id, old, running, time.monotonic() - started)
        return 0

    def print_plan(self, plan: Plan) -> None:
        o = self.o
        o.say("")
        o.say(f"Dry run: nothing was changed. Deploying '{plan.name}' version {plan.version} would run:")
        o.say(f"  [2/6] migrations: {self.o.command(self.push_command(plan))}")
        o.say(f"  [3/6] start:      POST {plan.worker_url}/functions/v1/{plan.name} "
              "(Authorization: Bearer ***)")
        o.say(f"  [4/6] verify:     wait up to {self.s.timeout:g} s for a worker of version {plan.version} to heartbeat")
        env_file = plan.env_file or Path("<temp file with " + ", ".join(sorted(self.secret_values(plan))) + ">")
        o.say(f"  [5/6] secrets:    {self.o.command(self.secrets_command(plan, env_file))}")
        o.say(f"                    Vault {URL_SECRET} = {plan.worker_url}, {AUTH_SECRET} = *** "
              f"(in {db.redact_url(plan.db_url)})")
        others = ", ".join(f"{w} ({v or 'no version'})" for w, v in plan.live_other_versions) or "none running now"
        o.say(f"  [6/6] hand-over:  record version {plan.version} in edge_worker.functions; deprecate the workers "
              f"of other versions ({others})")

    def summary(self, plan: Plan, worker_id: str, old: list[str], running: list[str], seconds: float) -> None:
        o = self.o
        target = db.redact_url(plan.push_db_url) if plan.push_db_url else f"linked project {plan.project_ref}"
        o.say("")
        o.say(f"Deployed '{plan.name}' version {plan.version} in {seconds:.1f} s.")
        o.say(f"  migrations: supabase/migrations pushed to {target}")
        o.say(f"  secrets:    Vault {URL_SECRET} ({plan.worker_url}) and {AUTH_SECRET}; function secrets "
              f"{', '.join(self.secret_names(plan))} on project {plan.project_ref}")
        o.say(f"  worker:     {worker_id} runs in the worker host at {plan.worker_url} (queue '{plan.queue_name}')")
        if old:
            state = f"{len(running)} still finishing their messages" if running else "stopped"
            o.say(f"  hand-over:  {len(old)} worker(s) of the previous version deprecated, {state}")
        o.say(f"  keep-alive: pg_cron's edge_worker.ensure_workers() restarts it through {plan.worker_url}")
        o.say("  watch:      worker-runtime status   (queues, live workers and their versions)")


def _uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


# -- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deploy.py", description="Deploy one worker function with the Supabase CLI (run from the project root).")
    parser.add_argument("worker_name", metavar="WORKER_NAME", help="the folder name under workers/")
    parser.add_argument("--project-ref", help=f"Supabase project ref (default: {PROJECT_REF_ENV}, else the project "
                                              "`supabase link` linked)")
    parser.add_argument("--db-url", help=f"database URL for the migrations and the hand-over (default: the linked "
                                         f"project for `db push`, {DB_URL_ENV} for the rest)")
    parser.add_argument("--worker-url", help=f"base URL of the worker host (default: {WORKER_URL_ENV})")
    parser.add_argument("--dry-run", action="store_true", help="run the checks, print the plan, change nothing")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--supabase-bin", help="path of the Supabase CLI (default: supabase on PATH)")
    parser.add_argument("--profile", help="Supabase CLI profile (name or YAML file), passed to every CLI command")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds to wait for the new worker's heartbeat (default {DEFAULT_TIMEOUT:g})")
    return parser


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        raise UsageError("") from None
    if not re.fullmatch(FUNCTION_NAME_PATTERN, args.worker_name):
        raise UsageError(f"invalid worker name {args.worker_name!r}: use the folder name under workers/ "
                         "(lowercase letters, digits, - and _)")
    if args.timeout <= 0:
        raise UsageError(f"invalid --timeout {args.timeout:g}: give a number of seconds above 0")
    return Settings(
        worker_name=args.worker_name, project_ref=args.project_ref, db_url=args.db_url, worker_url=args.worker_url,
        dry_run=args.dry_run, yes=args.yes, supabase_bin=args.supabase_bin, profile=args.profile,
        timeout=args.timeout,
    )


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    output = Output(stdout or sys.stdout, stderr or sys.stderr)
    try:
        settings = parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except UsageError as exc:
        if str(exc):
            output.say(f"{PROG}: {exc}", err=True)
        return 2
    output.hide_url_password(settings.db_url)
    output.hide(os.environ.get(ACCESS_TOKEN_ENV))
    # Our own lines say what happens; the library's info logs (Vault, registration) stay quiet.
    logging.getLogger(worker_logging.ROOT).addHandler(logging.NullHandler())
    logging.getLogger(worker_logging.ROOT).propagate = False
    try:
        return asyncio.run(Deploy(settings, output).run())
    except DeployError as exc:
        output.failed(exc)
        return 1
    except KeyboardInterrupt:
        output.say(f"{PROG}: interrupted. {KEEPS_RUNNING}", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - an error we did not foresee: still one line, still no secret
        output.failed(DeployError(f"unexpected error: {type(exc).__name__}: {exc}",
                                  "run deploy again; if it persists, report it with this message"))
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
