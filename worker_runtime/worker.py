"""One worker: created -> starting -> running -> stopping -> stopped.

The data path, top to bottom: the poll loop reads at most as many messages as there are
free slots, each message runs in its own task (`_process`), success queues it for a
batched archive, failure goes to edge_worker.fail (retry later or dead letter). Beside
it run the heartbeat (its own task, so a slow handler never delays it) and the keeper
that extends the visibility timeout of every message still in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from . import db
from .config import WorkerConfig
from .executor import Executor, Handler, Outcome
from .logging import get_logger
from .pollers import ListenPoller, Poller, ReadWithPollPoller
from .queue import Message, Queue


class State(str, enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class Stats:
    processed: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0


class Backoff:
    """Delays for retrying a database call: 0.1 s doubling up to 5 s."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    async def wait(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.cap)

    def reset(self) -> None:
        self.delay = self.first


StopCallback = Callable[["Worker", str], Awaitable[None] | None]


class Worker:
    """Takes messages from one PGMQ queue and runs `handler(payload, ctx)` for each."""

    def __init__(
        self,
        handler: Handler,
        config: WorkerConfig | None = None,
        *,
        pool: asyncpg.Pool | None = None,
        on_stopped: StopCallback | None = None,
        **options: Any,
    ) -> None:
        self.config = config if config is not None else WorkerConfig.from_options(**options)
        self.handler = handler
        self.worker_id = str(uuid.uuid4())
        self.function_name = self.config.function_name or self.config.queue_name.replace("_", "-")
        self.state = State.CREATED
        self.stats = Stats()
        self.stop_reason: str | None = None
        self._given_pool = pool
        self._pool: asyncpg.Pool | None = None
        self._on_stopped = on_stopped
        self._log = get_logger("WorkerLifecycle", self.worker_id)
        self._exec_log = get_logger("ExecutionController", self.worker_id)
        self._executor = Executor(handler, self.config, self.worker_id, get_logger("Handler", self.worker_id))
        self._tasks: set[asyncio.Task[None]] = set()  # one per message being handled
        self._in_flight: dict[int, Message] = {}  # read and not yet archived/failed
        self._acks: list[int] = []
        self._ack_wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._vt_lock = asyncio.Lock()
        self._background: list[asyncio.Task[None]] = []
        self._poll_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._start_done = asyncio.Event()  # start() returned or raised
        self._stop_task: asyncio.Task[None] | None = None
        self._poller: Poller | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "worker not started"
        return self._pool

    async def start(self) -> None:
        if self.state is not State.CREATED:
            raise RuntimeError(f"a worker starts once; this one is {self.state.value}")
        self.state = State.STARTING
        c = self.config
        self._log.info("Starting worker for queue '%s' (function %s)", c.queue_name, self.function_name)
        try:
            self._pool = self._given_pool or await db.create_pool(c.resolved_db_url(), c.max_pg_connections)
            queue = Queue(self._pool, c.queue_name)
            self._log.info("Ensuring queue '%s' exists...", c.queue_name)
            await queue.ensure()
            await self._pool.execute(
                "select edge_worker.register_worker($1, $2, $3, $4, $5, $6)",
                uuid.UUID(self.worker_id), c.queue_name, self.function_name, c.version,
                socket.gethostname(), os.getpid(),
            )
            self._poller = await self._make_poller(queue)
        except BaseException:
            self.state = State.STOPPED
            self._stopped.set()
            self._start_done.set()
            await self._close_pool()
            raise
        self.queue = queue
        self.state = State.RUNNING
        spawn = asyncio.get_running_loop().create_task
        self._poll_task = spawn(self._poll_loop(), name=f"poll-{self.worker_id}")
        self._background = [
            spawn(self._heartbeat_loop(), name=f"heartbeat-{self.worker_id}"),
            spawn(self._keep_visible_loop(), name=f"vt-{self.worker_id}"),
            spawn(self._ack_loop(), name=f"ack-{self.worker_id}"),
        ]
        if c.max_lifetime_seconds is not None:
            self._background.append(spawn(self._lifetime_limit(c.max_lifetime_seconds)))
        self._start_done.set()
        self._log.info("Worker started, polling queue '%s' (%s)", c.queue_name, c.poller)

    async def _make_poller(self, queue: Queue) -> Poller:
        if self.config.poller == "listen":
            poller = ListenPoller(queue, self.pool, self.config, self.worker_id)
            if await poller.open():
                return poller
        return ReadWithPollPoller(queue, self.config)

    def request_stop(self, reason: str) -> None:
        """Begin a graceful stop from sync code (signal handlers, heartbeat)."""
        if self._stop_task is None and self.state in (State.RUNNING, State.STARTING):
            self._stop_task = asyncio.get_running_loop().create_task(self._stop(reason))

    async def stop(self, reason: str = "stop() called") -> None:
        """Stop gracefully and wait until stopped. Safe to call more than once."""
        if self.state is State.CREATED:
            self.state = State.STOPPED
            self._stopped.set()
            return
        self.request_stop(reason)
        await self._stopped.wait()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def run(self) -> None:
        """Start, run until SIGTERM/SIGINT (or another stop), then stop gracefully."""
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop, f"received {sig.name}")
        try:
            await self._stopped.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop("context exited")

    async def _stop(self, reason: str) -> None:
        await self._start_done.wait()  # a stop asked for during start waits for it to finish
        if self.state is not State.RUNNING:
            return
        self.state = State.STOPPING
        self.stop_reason = reason
        self._log.info("Stopping worker: %s", reason)
        try:
            await self._drain()
        finally:
            await self._finish()

    async def _drain(self) -> None:
        # 1. No new messages.
        if self._poll_task is not None:
            self._poll_task.cancel()
            await asyncio.gather(self._poll_task, return_exceptions=True)
        # 2. Running handlers get the grace period, then the abort signal and cancellation;
        #    their messages are left in the queue and reappear after the visibility timeout.
        if self._tasks:
            grace = self.config.shutdown_grace_seconds
            self._log.info("Waiting up to %ss for %d running handler(s)", grace, len(self._tasks))
            await asyncio.wait(set(self._tasks), timeout=grace)
        if self._tasks:
            self._log.warning("Aborting %d handler(s) still running after the grace period", len(self._tasks))
            self._executor.abort.set()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # 3. Archive what succeeded.
        await self._flush_acks(deadline=self.config.shutdown_grace_seconds + 5)

    async def _finish(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._poller is not None:
            await self._poller.close()
        with contextlib.suppress(*db.CONNECTION_ERRORS, asyncpg.PostgresError):
            if self._pool is not None:
                await self._pool.execute("select edge_worker.mark_worker_stopped($1)", uuid.UUID(self.worker_id))
        self._executor.close()
        await self._close_pool()
        self.state = State.STOPPED
        self._log.info(
            "Worker stopped (%s): %d processed, %d failed, %d dead-lettered",
            self.stop_reason, self.stats.processed, self.stats.failed, self.stats.dead_lettered,
        )
        self._stopped.set()
        if self._on_stopped is not None:
            result = self._on_stopped(self, self.stop_reason or "")
            if asyncio.iscoroutine(result):
                await result

    async def _close_pool(self) -> None:
        if self._pool is not None and self._given_pool is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 10)
            if not self._pool._closed:  # type: ignore[attr-defined]
                self._pool.terminate()

    # -- the data path ---------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        assert self._poller is not None
        backoff = Backoff()
        size = self.config.read_batch_size
        while True:
            free = self.config.max_concurrent - len(self._tasks)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                messages = await self._poller.next_batch(min(free, size))
            except db.CONNECTION_ERRORS as exc:
                self._log.warning("Polling failed (%s), retrying in %.1fs", type(exc).__name__, backoff.delay)
                await backoff.wait()
                continue
            except asyncpg.PostgresError as exc:  # e.g. the queue was dropped: keep trying, loudly
                self._log.error("Polling failed: %s; retrying in %.1fs", exc, backoff.delay)
                await backoff.wait()
                continue
            backoff.reset()
            for message in messages:
                self._in_flight[message.msg_id] = message
                self._exec_log.debug("Scheduling execution of task %s", message.msg_id)
                task = asyncio.get_running_loop().create_task(self._process(message))
                self._tasks.add(task)
                task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            self._exec_log.error("Internal error while processing a message", exc_info=task.exception())

    async def _process(self, message: Message) -> None:
        try:
            outcome = await self._executor.execute(message)
        except asyncio.CancelledError:
            # Aborted at stop: leave the message to reappear after its visibility timeout.
            self._in_flight.pop(message.msg_id, None)
            raise
        if outcome.ok:
            self._acks.append(message.msg_id)
            self._ack_wake.set()
        else:
            await self._record_failure(outcome)

    async def _record_failure(self, outcome: Outcome) -> None:
        message, error = outcome.message, outcome.error or {}
        self.stats.failed += 1
        self._exec_log.warning("Task %s failed (attempt %d): %s: %s", message.msg_id, message.read_ct,
                               error.get("type"), error.get("message"))
        # Stop extending its visibility first, so the retry delay set below is not overwritten.
        self._in_flight.pop(message.msg_id, None)
        async with self._vt_lock:
            pass
        delay = self.config.retry_delay_for(message.read_ct)
        backoff = Backoff()
        while True:
            try:
                result = await self.queue.fail(
                    message.msg_id, error, retry_limit=self.config.retry_limit, retry_delay=delay,
                    worker_id=uuid.UUID(self.worker_id), function_name=self.function_name,
                )
                break
            except db.CONNECTION_ERRORS:
                await backoff.wait()
        if result == "dead_letter":
            self.stats.dead_lettered += 1
            self._exec_log.error("Task %s moved to edge_worker.dead_letters after %d attempts",
                                 message.msg_id, message.read_ct)
        elif result == "retry":
            self.stats.retried += 1
            self._exec_log.info("Task %s will be retried in %ds", message.msg_id, delay)

    # -- beside the data path -----------------------------------------------------------------

    async def _ack_loop(self) -> None:
        """Archive succeeded messages in batches: one round trip for all that piled up."""
        backoff = Backoff()
        while True:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            while self._acks:
                batch = self._acks[: 1000]
                try:
                    await self.queue.archive(batch)
                except (*db.CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                    self._log.warning("Archiving failed (%s), retrying", type(exc).__name__)
                    await backoff.wait()
                    continue
                backoff.reset()
                del self._acks[: len(batch)]
                for msg_id in batch:
                    self._in_flight.pop(msg_id, None)
                self.stats.processed += len(batch)

    async def _flush_acks(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        self._ack_wake.set()
        while self._acks and loop.time() < end:
            await asyncio.sleep(0.01)
        if self._acks:
            self._log.error("Could not archive %d succeeded message(s); they will run again", len(self._acks))

    async def _heartbeat_loop(self) -> None:
        log = get_logger("Heartbeat", self.worker_id)
        worker_id = uuid.UUID(self.worker_id)
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            try:
                keep_going = await self.pool.fetchval("select edge_worker.heartbeat($1)", worker_id)
            except (*db.CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("Heartbeat failed (%s); will retry", type(exc).__name__)
                continue
            log.debug("Heartbeat sent")
            if not keep_going:
                self.request_stop("deprecated: a newer version took over or the function was stopped")
                return

    async def _keep_visible_loop(self) -> None:
        """Extend the visibility timeout of in-flight messages so no other worker takes them."""
        vt = self.config.visibility_timeout
        while True:
            await asyncio.sleep(vt / 3)
            if not self._in_flight:
                continue
            async with self._vt_lock:
                try:
                    await self.queue.extend_vt(list(self._in_flight), vt)
                except (*db.CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                    self._log.warning("Extending visibility failed (%s)", type(exc).__name__)

    async def _lifetime_limit(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.request_stop(f"reached max_lifetime_seconds={seconds:g}")
