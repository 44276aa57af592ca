"""`worker-runtime demo`: a worker processing real messages on the embedded default.

It starts PostgreSQL from a wheel (embedded.py), runs the function host with an example
worker function (workers/demo-worker/worker.py in a temp folder), starts its worker with
`POST /functions/v1/demo-worker` as the pg_cron keep-alive would, sends N messages of
which a few fail for good and a few fail once, shows the progress, and checks that every
message ended where it should: archived, or (the ones that always fail) in
edge_worker.dead_letters with their error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import asyncpg

import httpx
import uvicorn

from . import db
from . import logging as worker_logging
from .embedded import EmbeddedError, embedded_server, prepare
from .executor import Context
from .producer import send_batch

QUEUE = "demo"
FUNCTION = "demo-worker"
RETRY_LIMIT = 2
RETRY_DELAY = 1


class PaymentRejected(ValueError):
    """Raised for payloads marked "fail": "always"; they end in the dead letters."""


async def demo_handler(payload: dict[str, Any], ctx: Context) -> None:
    """The example worker: a few ms of "work"; fails as the payload asks."""
    await asyncio.sleep(random.uniform(0.002, 0.01))
    if payload.get("fail") == "always":
        raise PaymentRejected(f"order {payload['order']} was rejected by the (pretend) payment API")
    if payload.get("fail") == "once" and ctx.read_ct == 1:
        raise TimeoutError(f"order {payload['order']}: the (pretend) upstream timed out on attempt 1")


def make_payloads(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """`count` orders: about 5 % fail always, about 10 % fail once (at least one of each)."""
    always = max(round(count * 0.05), 1 if count >= 2 else 0)
    once = max(round(count * 0.10), 1 if count >= 3 else 0)
    picked = random.Random(seed).sample(range(count), always + once)
    fail = {i: "always" for i in picked[:always]} | {i: "once" for i in picked[always:]}
    return [{"order": i + 1, **({"fail": fail[i]} if i in fail else {})} for i in range(count)]


class Progress:
    """A one-line `\\r` bar on a terminal; a line per second otherwise (logs, CI)."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream = total, stream
        self.tty = stream.isatty()
        self._last = 0.0

    def update(self, done: int, retried: int, dead: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < (0.1 if self.tty else 1.0):
            return
        self._last = now
        text = f"{done}/{self.total} done, {retried} retried, {dead} dead-lettered"
        if self.tty:
            width = 30
            filled = width * done // max(self.total, 1)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}")
            if final:
                self.stream.write("\n")
        else:
            self.stream.write(f"demo: {text}\n")
        self.stream.flush()


@dataclass
class Snapshot:
    archived: int = 0
    dead: int = 0
    heartbeat_at: Any = None


@dataclass
class Result:
    """What the database says happened, and whether it is what should have happened."""

    total: int
    seconds: float
    archived: int
    retried: int
    dead_letters: list[asyncpg.Record]
    heartbeats: int
    heartbeat_age: float | None
    left_in_queue: int
    second_try: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def _snapshot(conn: asyncpg.Connection, worker_id: str) -> Snapshot:
    row = await conn.fetchrow(
        f"""select (select count(*) from pgmq.a_{QUEUE}) as archived,
                   (select count(*) from edge_worker.dead_letters where queue_name = $1) as dead,
                   (select last_heartbeat_at from edge_worker.workers where worker_id = $2) as heartbeat_at""",
        QUEUE, uuid.UUID(worker_id),
    )
    return Snapshot(row["archived"], row["dead"], row["heartbeat_at"])


async def run_demo(messages: int, *, out: TextIO, err: TextIO, verbose: bool = False) -> bool:
    """Run the whole demo; print the summary to `out`; return whether all messages ended right."""
    if not verbose:
        # The summary tells the story; the worker's per-message log lines would drown the bar.
        logging.getLogger(worker_logging.ROOT).setLevel(logging.CRITICAL)
    else:
        worker_logging.configure("info", err)
    started = time.monotonic()
    err.write("demo: starting an embedded PostgreSQL (no Docker, no Supabase account)...\n")
    err.flush()
    with embedded_server() as url:
        await prepare(url)
        conn = await db.connect(url)
        try:
            version = await conn.fetchval("show server_version")
            err.write(f"demo: PostgreSQL {version} with PGMQ and the edge_worker schema ready "
                      f"in {time.monotonic() - started:.1f} s\n")
            return await _run_on(url, conn, messages, out, err)
        finally:
            await conn.close()


# The example worker function, as a user writes it in workers/<name>/worker.py.
WORKER_OPTIONS: dict[str, Any] = {
    "queue_name": QUEUE, "retry_limit": RETRY_LIMIT, "retry_delay": RETRY_DELAY, "heartbeat_interval": 0.5,
    "max_concurrent": 10, "poll_interval_ms": 50, "max_poll_seconds": 1, "visibility_timeout": 3,
    "shutdown_grace_seconds": 2,
}
WORKER_MODULE = """\
from worker_runtime import EdgeWorker
from worker_runtime.demo import WORKER_OPTIONS, demo_handler

EdgeWorker.start(demo_handler, **WORKER_OPTIONS)
"""


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: Ctrl-C/SIGTERM cancel the demo, which cleans up."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()


@contextlib.asynccontextmanager
async def function_host(url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The function host (as `worker-runtime serve` runs it) on a free localhost port, serving
    workers/demo-worker/worker.py from a temporary folder; yields a client that sends the secret."""
    from . import host

    secret = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="wr-demo-fn-") as root:
        folder = Path(root) / "workers" / FUNCTION
        folder.mkdir(parents=True)
        (folder / "worker.py").write_text(WORKER_MODULE, encoding="utf-8")
        app = host.create_app(Path(root) / "workers", db_url=url, auth_secret=secret)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = _Server(uvicorn.Config(app, lifespan="on", log_config=None, log_level="warning",
                                        access_log=False))
        serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:
                if serving.done():
                    raise EmbeddedError("The demo's function host did not start: rerun with --verbose to see why.")
                await asyncio.sleep(0.01)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10,
                                         headers={"Authorization": f"Bearer {secret}"}) as client:
                yield client
        finally:
            server.should_exit = True  # the host's shutdown stops its workers gracefully
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(serving), 30)
            if not serving.done():
                serving.cancel()
            sock.close()


async def _retried(client: httpx.AsyncClient) -> int:
    """Retries the host's workers decided so far, from GET /functions/v1/<name>/status."""
    status = (await client.get(f"/functions/v1/{FUNCTION}/status")).json()
    return sum(w["stats"]["retried"] for w in status["workers"])


async def _start_worker(client: httpx.AsyncClient, conn: asyncpg.Connection) -> str:
    """POST /functions/v1/<name> as pg_cron's keep-alive would; wait until the worker registered."""
    answer = await client.post(f"/functions/v1/{FUNCTION}", json={"source": "worker-runtime demo"})
    answer.raise_for_status()
    worker_id = answer.json()["worker_id"]
    deadline = time.monotonic() + 15
    while not await conn.fetchval("select exists (select 1 from edge_worker.workers where worker_id = $1)",
                                  uuid.UUID(worker_id)):
        if time.monotonic() > deadline:
            status = (await client.get(f"/functions/v1/{FUNCTION}/status")).json()
            raise EmbeddedError(f"The demo worker did not start: {status.get('last_start_error') or 'no reason given'}.")
        await asyncio.sleep(0.02)
    return worker_id


async def _run_on(url: str, conn: asyncpg.Connection, messages: int, out: TextIO, err: TextIO) -> bool:
    async with function_host(url) as client:
        worker_id = await _start_worker(client, conn)
        payloads = make_payloads(messages)
        err.write(f"demo: function host started worker {worker_id} (POST /functions/v1/{FUNCTION}); "
                  f"sending {messages} messages to queue '{QUEUE}' (retry_limit={RETRY_LIMIT}, "
                  f"retry_delay={RETRY_DELAY}s)\n")
        err.flush()
        sent_at = time.monotonic()
        msg_ids = await send_batch(QUEUE, payloads, db_url=url)
        expected = dict(zip(msg_ids, payloads, strict=True))
        progress = Progress(messages, err)
        heartbeats: set[Any] = set()
        deadline = sent_at + 30 + messages * 0.05
        snap, retried = Snapshot(), 0
        while time.monotonic() < deadline:
            snap = await _snapshot(conn, worker_id)
            retried = await _retried(client)
            if snap.heartbeat_at is not None:
                heartbeats.add(snap.heartbeat_at)
            done = snap.archived + snap.dead
            progress.update(done, retried, snap.dead, final=done >= messages)
            if done >= messages:
                break
            await asyncio.sleep(0.05)
        else:
            progress.update(snap.archived + snap.dead, retried, snap.dead, final=True)
        seconds = time.monotonic() - sent_at
    result = await _check(conn, expected, seconds, len(heartbeats) - 1, worker_id)
    print_summary(result, worker_id, out)
    return result.ok


async def _check(conn: asyncpg.Connection, expected: dict[int, dict[str, Any]], seconds: float,
                 heartbeats: int, worker_id: str) -> Result:
    archived = {r["msg_id"]: r["read_ct"] for r in await conn.fetch(f"select msg_id, read_ct from pgmq.a_{QUEUE}")}
    dead = await conn.fetch(
        "select msg_id, read_ct, error from edge_worker.dead_letters where queue_name = $1 order by msg_id", QUEUE
    )
    left = await conn.fetchval(f"select count(*) from pgmq.q_{QUEUE}")
    age = await conn.fetchval(
        "select extract(epoch from stopped_at - last_heartbeat_at)::float8 from edge_worker.workers where worker_id = $1",
        uuid.UUID(worker_id),
    )
    retried = sum(ct - 1 for ct in archived.values()) + sum(r["read_ct"] - 1 for r in dead)
    result = Result(len(expected), seconds, len(archived), retried, list(dead), max(heartbeats, 0), age, left,
                    second_try=sum(1 for ct in archived.values() if ct == 2))

    should_die = {i for i, p in expected.items() if p.get("fail") == "always"}
    dead_ids = {r["msg_id"] for r in dead}
    if dead_ids != should_die:
        result.problems.append(f"dead letters {sorted(dead_ids)} != always-failing messages {sorted(should_die)}")
    if set(archived) != set(expected) - should_die:
        missing = sorted(set(expected) - should_die - set(archived))
        result.problems.append(f"not archived: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    for msg_id, read_ct in archived.items():
        want = 2 if expected.get(msg_id, {}).get("fail") == "once" else 1
        if read_ct != want:
            result.problems.append(f"message {msg_id} was read {read_ct} times, expected {want}")
    for r in dead:
        if r["read_ct"] != RETRY_LIMIT + 1:
            result.problems.append(f"dead letter {r['msg_id']} after {r['read_ct']} attempts, expected {RETRY_LIMIT + 1}")
    if left:
        result.problems.append(f"{left} message(s) still in the queue")
    return result


def print_summary(result: Result, worker_id: str, out: TextIO) -> None:
    rate = result.total / result.seconds if result.seconds > 0 else float("inf")
    lines = [
        "",
        f"Summary ({result.total} messages on queue '{QUEUE}')",
        f"  processed      {result.archived}  (archived in pgmq.a_{QUEUE}; {result.second_try} on their second attempt)",
        f"  retried        {result.retried}  (attempts after a failure, {RETRY_DELAY}s apart)",
        f"  dead-lettered  {len(result.dead_letters)}  (in edge_worker.dead_letters after "
        f"{RETRY_LIMIT + 1} attempts)",
    ]
    for r in result.dead_letters[:5]:
        error = r["error"] or {}
        lines.append(f"    msg {r['msg_id']}: {error.get('type')}: {error.get('message')}")
    if len(result.dead_letters) > 5:
        lines.append(f"    ... and {len(result.dead_letters) - 5} more like these")
    lines.append(f"  throughput     {rate:.1f} messages/s  ({result.total} in {result.seconds:.2f} s, "
                 f"including {RETRY_DELAY}s retry delays)")
    age = f", last {result.heartbeat_age:.2f} s before it stopped" if result.heartbeat_age is not None else ""
    lines.append(f"  heartbeats     {result.heartbeats} from worker {worker_id}{age}")
    lines.append(f"  left in queue  {result.left_in_queue}")
    if result.ok:
        lines.append("OK: every message ended where it should (archived, or dead-lettered with its error).")
    else:
        lines.append("FAILED: " + "; ".join(result.problems))
    out.write("\n".join(lines) + "\n")
    out.flush()


async def _run_cancellable(messages: int, verbose: bool) -> bool:
    """run_demo, cancelled by SIGTERM as by Ctrl-C, so the server and temp folder are cleaned up."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    return await run_demo(messages, out=sys.stdout, err=sys.stderr, verbose=verbose)


def main(messages: int, verbose: bool = False) -> int:
    """Entry point for the CLI: exit code 0 only when every message ended where it should."""
    try:
        ok = asyncio.run(_run_cancellable(messages, verbose))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.stderr.write("\ndemo: interrupted; the embedded server was stopped and its folder deleted.\n")
        return 130
    return 0 if ok else 1
