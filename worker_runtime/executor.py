"""Run one message through the handler and say how it went.

The executor only runs the handler; the worker decides what happens to the message
(archive on success, edge_worker.fail on failure), so that path reads in one place.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import traceback
import typing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from .config import WorkerConfig
from .logging import redact
from .queue import Message

Handler = Callable[..., Any]


@dataclass(frozen=True)
class Context:
    """What a handler knows about the message it runs and the worker running it."""

    msg_id: int
    read_ct: int
    enqueued_at: datetime
    headers: dict[str, Any] | None
    queue_name: str
    worker_id: str
    config: WorkerConfig
    logger: logging.LoggerAdapter[logging.Logger]
    # Set when the worker must stop: long handlers should check it and return early.
    abort: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def aborted(self) -> bool:
        return self.abort.is_set()


@dataclass(frozen=True)
class Outcome:
    message: Message
    error: dict[str, str] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def error_record(exc: BaseException) -> dict[str, str]:
    """The error as stored with a retry or a dead letter: type, message, traceback."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return {
        "type": name,
        "message": redact(str(exc)),
        "traceback": redact("".join(traceback.format_exception(exc))),
    }


def _payload_model(handler: Handler) -> type[BaseModel] | None:
    """A pydantic model the handler declares for its payload (first parameter), if any."""
    try:
        hints = typing.get_type_hints(handler)
        first = next(iter(inspect.signature(handler).parameters))
    except Exception:
        return None
    hint = hints.get(first)
    return hint if isinstance(hint, type) and issubclass(hint, BaseModel) else None


class Executor:
    """Calls `handler(payload, ctx)`; sync handlers run in threads, off the event loop."""

    def __init__(self, handler: Handler, config: WorkerConfig, worker_id: str, logger: logging.LoggerAdapter[logging.Logger]) -> None:
        self.handler = handler
        self.config = config
        self.worker_id = worker_id
        self.logger = logger
        self.abort = asyncio.Event()
        self.is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)
        )
        self.model = _payload_model(handler)
        # Own pool sized to max_concurrent: the default executor has only cpu+4 threads.
        self._threads = None if self.is_async else ThreadPoolExecutor(
            max_workers=config.max_concurrent, thread_name_prefix="edge-worker-handler"
        )

    def context(self, message: Message) -> Context:
        return Context(
            msg_id=message.msg_id, read_ct=message.read_ct, enqueued_at=message.enqueued_at,
            headers=message.headers, queue_name=self.config.queue_name, worker_id=self.worker_id,
            config=self.config, logger=self.logger, abort=self.abort,
        )

    async def execute(self, message: Message) -> Outcome:
        ctx = self.context(message)
        try:
            payload = message.message if self.model is None else self.model.model_validate(message.message)
            if self.is_async:
                await self.handler(payload, ctx)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._threads, self.handler, payload, ctx)
                if inspect.isawaitable(result):
                    await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return Outcome(message, error_record(exc))
        return Outcome(message)

    def close(self) -> None:
        if self._threads is not None:
            # Threads cannot be killed: ones still running finish on their own.
            self._threads.shutdown(wait=False, cancel_futures=True)
