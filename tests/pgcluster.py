"""A throwaway PostgreSQL cluster for the test session: real server, PGMQ, pg_cron.

Server binaries come from PG_BIN or `pg_config --bindir`. As root, the server runs as the
`postgres` system user (initdb refuses root). Each test gets a fresh database cloned from
a template that already has the stand-ins, PGMQ and the migration, so a clone is fast.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from worker_runtime.migrate import apply_migration, install_pgmq_sql

STAND_INS = Path(__file__).with_name("stand_ins.sql")
TEMPLATE_DB = "edge_worker_template"
MISSING_SERVER = (
    "PostgreSQL server binaries not found: install postgresql-15 (apt-get install postgresql-15) "
    "or set PG_BIN to the folder that has initdb and pg_ctl."
)


def find_bindir() -> Path:
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
        if (Path(out.stdout.strip()) / "initdb").exists():
            return Path(out.stdout.strip())
    raise RuntimeError(MISSING_SERVER)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgCluster:
    bindir: Path
    root: Path
    port: int = field(default_factory=free_port)
    user: str = "postgres"
    password: str = "test-pass: @/?#%&"  # exercises URL encoding; trust auth ignores it

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    def url(self, dbname: str = "postgres", password: str | None = None) -> str:
        from urllib.parse import quote

        secret = quote(self.password if password is None else password, safe="")
        return f"postgresql://{self.user}:{secret}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=True)

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.datadir), "-U", self.user, "--auth-host=scram-sha-256",
                  "--auth-local=trust", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync")
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\n"
                "shared_preload_libraries = 'pg_cron'\ncron.database_name = 'postgres'\n"
                # pg_cron runs each job over a libpq connection; through the socket (trust)
                # it needs no password, over TCP (scram) every job would fail to connect.
                f"cron.host = '{self.root}'\n"
                "max_connections = 300\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.root / "server.log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Crash-stop and start again (start, not `pg_ctl restart`, so the server logs to a file)."""
        self.stop("immediate")
        self.start()

    async def prepare(self) -> None:
        """Cluster-wide roles, pg_cron in `postgres`, and the template database."""
        conn = await asyncpg.connect(self.url())
        try:
            for role in ("anon", "authenticated", "service_role"):
                await conn.execute(
                    f"do $$ begin if not exists (select 1 from pg_roles where rolname = '{role}') "
                    f"then create role {role} nologin; end if; end $$"
                )
            try:
                await conn.execute("create extension if not exists pg_cron")
            except asyncpg.PostgresError as exc:
                raise RuntimeError(
                    f"pg_cron is not available ({exc}): apt-get install postgresql-15-cron"
                ) from exc
            await conn.execute(f"create database {TEMPLATE_DB}")
            await self._install(conn)  # the keep-alive tests run in `postgres`, where pg_cron is
        finally:
            await conn.close()
        conn = await asyncpg.connect(self.url(TEMPLATE_DB))
        try:
            await self._install(conn)
        finally:
            await conn.close()

    async def _install(self, conn: asyncpg.Connection) -> None:
        try:
            await conn.execute(STAND_INS.read_text())
        except asyncpg.PostgresError as exc:
            raise RuntimeError(
                f"the pg_net/Vault stand-ins need PL/Python ({exc}): apt-get install postgresql-plpython3-15"
            ) from exc
        await install_pgmq_sql(conn)
        await apply_migration(conn)

    async def create_database(self, name: str, template: str = TEMPLATE_DB) -> str:
        """A new database cloned from `template` (template0: a bare one); returns its URL."""
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(f'create database "{name}" template {template}')
        finally:
            await conn.close()
        return self.url(name)

    async def drop_database(self, name: str) -> None:
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(f'drop database if exists "{name}" with (force)')
        finally:
            await conn.close()


def start_cluster() -> PgCluster:
    root = Path(tempfile.mkdtemp(prefix="edge-worker-pg-"))
    os.chmod(root, 0o755)
    cluster = PgCluster(bindir=find_bindir(), root=root)
    cluster.init()
    cluster.start()
    try:
        asyncio.run(cluster.prepare())
    except BaseException:
        cluster.stop("immediate")
        raise
    return cluster
