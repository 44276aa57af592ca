"""Through a real transaction-mode pooler (PgBouncer), as on Supabase's Supavisor port 6543.

A transaction pooler hands every transaction to any server connection: named prepared
statements from another backend do not exist there, and LISTEN never delivers. The
worker must process messages anyway, and `poller='listen'` must fall back to polling.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from tests.pgcluster import PgCluster, free_port
from tests.waiting import wait_for
from worker_runtime import Worker, send_batch

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@pytest.fixture(scope="module")
def pooler(pg: PgCluster) -> Iterator[int]:
    """PgBouncer in transaction mode in front of the test cluster; yields its port."""
    if not os.path.exists(PGBOUNCER):
        pytest.fail("PgBouncer is missing: apt-get install pgbouncer (scripts/test.sh does)")
    folder = pg.root / "pgbouncer"  # readable by the postgres user, unlike pytest's tmp dirs
    folder.mkdir(exist_ok=True)
    port = free_port()
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={pg.root} port={pg.port}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {folder / 'users.txt'}\n"
        "pool_mode = transaction\nmax_client_conn = 200\ndefault_pool_size = 20\n"
        "ignore_startup_parameters = extra_float_digits,application_name\n"
    )
    (folder / "users.txt").write_text('"postgres" ""\n')
    cmd = [PGBOUNCER, str(folder / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        pw = pwd.getpwnam("postgres")
        for path in (folder, *folder.iterdir()):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    log = open(folder / "pgbouncer.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    yield port
    proc.terminate()
    proc.wait(10)
    log.close()


async def test_worker_runs_through_a_transaction_pooler_and_listen_falls_back(pg, pooler, db_url, conn, caplog):
    dbname = db_url.rsplit("/", 1)[1]
    pooled_url = f"postgresql://postgres:{quote(pg.password, safe='')}@127.0.0.1:{pooler}/{dbname}"
    seen: list[int] = []

    async def handler(payload, ctx):
        seen.append(payload["n"])

    async def all_archived() -> bool:
        return await conn.fetchval("select count(*) from pgmq.a_tasks") == 50

    await wait_for(lambda: _accepts(pooler), timeout=10, what="PgBouncer listening")
    async with Worker(handler, db_url=pooled_url, poller="listen", max_poll_seconds=1,
                      poll_interval_ms=50, heartbeat_interval=0.5) as worker:
        assert type(worker._poller).__name__ == "ReadWithPollPoller"
        await send_batch("tasks", [{"n": i} for i in range(50)], db_url=pooled_url)
        await wait_for(all_archived, what="50 messages archived through the pooler")
    assert sorted(seen) == list(range(50))
    assert "falling back to polling" in caplog.text


async def _accepts(port: int) -> bool:
    import asyncio

    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True
