"""Run the function host for tests: in a thread (uvicorn on a free port) or as a process.

Both serve real HTTP on 127.0.0.1; tests talk to them with httpx like pg_cron's
net.http_post does, and wait on conditions with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

from tests.pgcluster import free_port
from worker_runtime.host import FunctionHost

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-auth-secret-0123456789abcdef"
FAST = {"heartbeat_interval": 0.5, "max_poll_seconds": 1, "poll_interval_ms": 50}


def write_worker(workers_dir: Path, name: str, source: str) -> Path:
    """`workers/<name>/worker.py` with the given (dedented) source."""
    folder = workers_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "worker.py"
    path.write_text(textwrap.dedent(source))
    return path


def simple_worker(queue: str, **options: Any) -> str:
    """A worker module that records every payload it handles; payload {"fail": true} raises."""
    opts = {**FAST, "queue_name": queue, **options}
    return f"""
        from worker_runtime import EdgeWorker

        handled = []

        async def handler(payload, ctx):
            if payload.get("fail"):
                raise RuntimeError("asked to fail")
            handled.append(payload)

        EdgeWorker.start(handler, **{opts!r})
    """


def auth(secret: str = SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


class ThreadedHost:
    """The app under uvicorn in a background thread with its own event loop."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, lifespan="on", log_level="warning")
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=f"host-{self.port}", daemon=True)

    @property
    def host(self) -> FunctionHost:
        return self.app.state.host

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.serve())
        finally:
            self.loop.close()

    def on_loop(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        """Run a coroutine on the host's loop (the host's objects live there)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> ThreadedHost:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError(f"the host on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "the host did not shut down within 60 s"


class HostProcess:
    """`serve(...)` in a child process, as `worker-runtime serve` runs it."""

    def __init__(self, cwd: Path, *, port: int | None = None, env: dict[str, str] | None = None,
                 env_file: str | None = None, **serve_kwargs: Any) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = cwd / f"host-{self.port}-{time.monotonic_ns()}.log"
        kwargs = {"workers_dir": str(cwd / "workers"), "host": "127.0.0.1", "port": self.port,
                  "env_file": env_file, **serve_kwargs}
        self.code = f"from worker_runtime.host import serve; serve(**{kwargs!r})"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_WORKER_")}
        self.env = {**clean, **(env or {}), "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> HostProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", self.code], cwd=self.cwd, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the host exited with {self.proc.returncode}:\n{self.log()}")
            try:
                httpx.get(f"{self.url}/health", timeout=2)
                return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError(f"the host did not answer within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the host did not exit within {timeout}s:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
