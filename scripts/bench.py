#!/usr/bin/env python3
"""Benchmark the worker against a raw PGMQ loop (issue 3, "Benchmark (not a test)").

    python scripts/bench.py                      # 20,000 messages, table on stdout
    python scripts/bench.py --messages 5000 --json

What it does, on a throwaway PostgreSQL 15 cluster (tests/pgcluster.py's PgCluster: initdb
as the `postgres` user, PGMQ from the `pgmq` package's SQL, the packaged migration):

1. Throughput, no-op handler, N messages preloaded with pgmq.send_batch before each run:
   (a) raw loop: `pgmq.read(q, vt, 100)` + `pgmq.archive(q, ids)` on one asyncpg
       connection (asyncpg defaults; the ratios are to this one). For reference also with
       the worker's connection settings (statement_cache_size=0) and with read 1000;
   (b) worker_runtime.Worker with the seed defaults (max_concurrent=10, ...);
   (c) the worker with a few tuned settings; the best one is reported as "tuned".
   A run is timed from worker.start() returning until worker.stats.processed == N (all
   archived), and each is checked afterwards: queue empty, N rows in the archive.
2. Latency from send to handler start, poller='poll' and poller='listen': messages sent
   one at a time (default 200, 20 ms apart) on their own connection with the wall-clock
   send time in the payload; the handler records time.time() minus it (same process,
   same clock).
3. Peak RSS of this process (resource.getrusage), and its CPU use during each run.

The cluster runs with fsync=off and synchronous_commit=off (tests/pgcluster.py's settings):
figures are about the worker's overhead, not about disk. The cluster and its folder are
removed at exit, also after an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import asyncpg

from tests.pgcluster import PgCluster, find_bindir
from worker_runtime import Worker
from worker_runtime import db as wr_db
from worker_runtime.migrate import apply_migration, install_pgmq_sql

RAW_BATCH = 100
RAW_VT = 30
PRELOAD_CHUNK = 1000
# Tuned candidates, each run like the others; the fastest (median) is reported as "tuned".
# 100/100 reads what the raw loop reads; 200/100 lets the next read overlap the running
# batch; the larger ones trade memory and visibility-timeout exposure for fewer round trips.
# Connections barely matter: only the poll loop and the ack loop query concurrently.
TUNED_CANDIDATES: list[dict[str, Any]] = [
    {"max_concurrent": 100, "batch_size": 100, "max_pg_connections": 4},
    {"max_concurrent": 200, "batch_size": 100, "max_pg_connections": 4},
    {"max_concurrent": 1000, "batch_size": 500, "max_pg_connections": 4},
    {"max_concurrent": 1000, "batch_size": 1000, "max_pg_connections": 4},
    {"max_concurrent": 1000, "batch_size": 1000, "max_pg_connections": 8},
]


# -- measurements ---------------------------------------------------------------------------


@dataclass
class Throughput:
    name: str
    settings: dict[str, Any]
    messages: int
    seconds: float
    cpu_seconds: float  # this process (user+sys) during the run
    server_cpu_seconds: float  # all PostgreSQL processes during the run
    runs: list[float] = field(default_factory=list)  # msg/s of each repetition

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def cpu_percent(self) -> float:
        return 100 * self.cpu_seconds / self.seconds

    @property
    def server_cpu_percent(self) -> float:
        return 100 * self.server_cpu_seconds / self.seconds

    def summary(self, raw: Throughput | None = None) -> dict[str, Any]:
        extra = {"rate": self.rate, "cpu_percent": self.cpu_percent, "server_cpu_percent": self.server_cpu_percent}
        if raw is not None:
            extra["ratio_to_raw"] = self.rate / raw.rate
        return asdict(self) | extra


@dataclass
class Latency:
    poller: str
    messages: int
    interval_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    poller_used: str


def cpu_time() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on


def server_cpu_time(postmaster: int | None) -> float:
    """CPU seconds of the whole PostgreSQL server: postmaster, its reaped children
    (cutime/cstime: closed backends) and the live ones. 0 where /proc is missing."""
    if postmaster is None:
        return 0.0
    head = _proc_stat(postmaster)
    if head is None:
        return 0.0
    total = sum(int(x) for x in head[11:15])  # utime stime cutime cstime
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None and fields[1] == str(postmaster):
                total += int(fields[11]) + int(fields[12])
    return total / _TICK


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 1024 / 1024


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def noop(payload: Any, ctx: Any) -> None:
    return None


class Bench:
    def __init__(self, url: str, messages: int, verbose: bool, postmaster: int | None) -> None:
        self.url = url
        self.postmaster = postmaster
        self.n = messages
        self.verbose = verbose
        self._queue_seq = 0
        self.admin: asyncpg.Connection | None = None

    def say(self, text: str) -> None:
        if self.verbose:
            print(text, file=sys.stderr, flush=True)

    async def open(self) -> None:
        self.admin = await wr_db.connect(self.url)

    async def close(self) -> None:
        if self.admin is not None:
            await self.admin.close()

    async def new_queue(self, prefix: str) -> str:
        self._queue_seq += 1
        name = f"{prefix}_{self._queue_seq}"
        await self.admin.execute("select pgmq.create($1::text)", name)
        return name

    async def preload(self, queue: str) -> None:
        for start in range(0, self.n, PRELOAD_CHUNK):
            batch = [{"i": i} for i in range(start, min(start + PRELOAD_CHUNK, self.n))]
            await self.admin.execute("select pgmq.send_batch($1::text, $2::jsonb[])", queue, batch)
        # Start every run from the same state: fresh statistics, no autovacuum surprise mid-run.
        await self.admin.execute(f"vacuum analyze pgmq.q_{queue}")

    async def check_drained(self, queue: str) -> None:
        left = await self.admin.fetchval(f"select count(*) from pgmq.q_{queue}")
        archived = await self.admin.fetchval(f"select count(*) from pgmq.a_{queue}")
        if left != 0 or archived != self.n:
            raise RuntimeError(f"queue {queue}: {left} left, {archived} archived, expected 0 and {self.n}")

    async def drop(self, queue: str) -> None:
        await self.admin.execute("select pgmq.drop_queue($1::text)", queue)

    # (a) ----------------------------------------------------------------------------------

    def clocks(self) -> tuple[float, float, float]:
        return time.perf_counter(), cpu_time(), server_cpu_time(self.postmaster)

    def elapsed(self, start: tuple[float, float, float]) -> tuple[float, float, float]:
        now = self.clocks()
        return now[0] - start[0], now[1] - start[1], now[2] - start[2]

    async def raw(self, *, worker_settings: bool, qty: int = RAW_BATCH) -> tuple[float, float, float]:
        """read 100 + archive the ids, one connection. Returns (seconds, cpu, server cpu)."""
        queue = await self.new_queue("raw")
        await self.preload(queue)
        if worker_settings:  # statement_cache_size=0 and the json codec, as the worker's pool
            conn = await wr_db.connect(self.url)
        else:  # asyncpg defaults (prepared-statement cache on), json decoded like the worker's
            conn = await asyncpg.connect(self.url)
            await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
        try:
            done = 0
            start = self.clocks()
            while True:
                rows = await conn.fetch("select * from pgmq.read($1::text, $2::integer, $3::integer)",
                                        queue, RAW_VT, qty)
                if not rows:
                    break
                for row in rows:
                    await noop(row["message"], None)
                await conn.execute("select pgmq.archive($1::text, $2::bigint[])", queue, [r["msg_id"] for r in rows])
                done += len(rows)
            spent = self.elapsed(start)
        finally:
            await conn.close()
        if done != self.n:
            raise RuntimeError(f"raw loop read {done} messages, expected {self.n}")
        await self.check_drained(queue)
        await self.drop(queue)
        return spent

    # (b), (c) -----------------------------------------------------------------------------

    async def worker(self, settings: dict[str, Any]) -> tuple[float, float, float]:
        queue = await self.new_queue("wrk")
        await self.preload(queue)
        worker = Worker(noop, queue_name=queue, db_url=self.url, **settings)
        await worker.start()
        start = self.clocks()
        try:
            deadline = start[0] + max(120.0, self.n / 50)
            while worker.stats.processed < self.n:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"worker stalled at {worker.stats.processed}/{self.n} with {settings}")
                await asyncio.sleep(0.002)
            spent = self.elapsed(start)
        finally:
            await worker.stop("benchmark run done")
        if worker.stats.failed:
            raise RuntimeError(f"{worker.stats.failed} handler failures")
        await self.check_drained(queue)
        await self.drop(queue)
        return spent

    # latency ------------------------------------------------------------------------------

    async def latency(self, poller: str, count: int, interval_ms: float) -> Latency:
        queue = await self.new_queue(f"lat_{poller}")
        seen: list[float] = []
        done = asyncio.Event()

        async def handler(payload: dict[str, Any], ctx: Any) -> None:
            seen.append(time.time() - payload["t"])
            if len(seen) >= count:
                done.set()

        settings: dict[str, Any] = {"poller": poller}
        worker = Worker(handler, queue_name=queue, db_url=self.url, **settings)
        producer = await wr_db.connect(self.url)
        try:
            await worker.start()
            used = type(worker._poller).__name__  # ListenPoller unless it fell back
            await asyncio.sleep(0.3)  # let the poller reach its wait
            for i in range(count):
                await producer.execute("select pgmq.send($1::text, $2::jsonb)", queue, {"i": i, "t": time.time()})
                await asyncio.sleep(interval_ms / 1000)
            await asyncio.wait_for(done.wait(), 30)
        finally:
            await worker.stop("benchmark run done")
            await producer.close()
        await self.drop(queue)
        ms = [s * 1000 for s in seen]
        return Latency(poller, count, interval_ms, percentile(ms, 0.5), percentile(ms, 0.9),
                       percentile(ms, 0.99), max(ms), used)


# -- the run --------------------------------------------------------------------------------


def median_run(name: str, settings: dict[str, Any], n: int, results: list[tuple[float, float, float]]) -> Throughput:
    """The repetition with the median rate (its seconds and cpu), all rates kept."""
    rates = [n / r[0] for r in results]
    order = sorted(range(len(results)), key=lambda i: rates[i])
    seconds, cpu, server_cpu = results[order[len(order) // 2]]
    return Throughput(name, settings, n, seconds, cpu, server_cpu, [round(r) for r in rates])


async def run_all(url: str, args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(url, args.messages, verbose=not args.json or args.verbose, postmaster=args.postmaster)
    await bench.open()
    rss_before = peak_rss_mib()
    try:
        # Warm-up: first connections, plan caches, catalog caches on the server side.
        saved_n, bench.n = bench.n, min(2000, bench.n)
        await bench.raw(worker_settings=False)
        await bench.worker({})
        bench.n = saved_n

        reps = args.repeat
        raw_runs, raw_ws_runs, raw_1000_runs, default_runs = [], [], [], []
        tuned_runs: list[list[tuple[float, float, float]]] = [[] for _ in args.tuned]
        # Interleave the kinds in each repetition, so a drift (autovacuum, page cache,
        # thermal) hits all of them alike rather than whichever ran last.
        for rep in range(reps):
            bench.say(f"repetition {rep + 1}/{reps}")
            raw_runs.append(await bench.raw(worker_settings=False))
            bench.say(f"  raw loop (asyncpg defaults):     {args.messages / raw_runs[-1][0]:8.0f} msg/s")
            raw_ws_runs.append(await bench.raw(worker_settings=True))
            bench.say(f"  raw loop (worker's conn settings):{args.messages / raw_ws_runs[-1][0]:7.0f} msg/s")
            raw_1000_runs.append(await bench.raw(worker_settings=False, qty=1000))
            bench.say(f"  raw loop, read 1000:             {args.messages / raw_1000_runs[-1][0]:8.0f} msg/s")
            default_runs.append(await bench.worker({}))
            bench.say(f"  worker, seed defaults:           {args.messages / default_runs[-1][0]:8.0f} msg/s")
            for i, settings in enumerate(args.tuned):
                tuned_runs[i].append(await bench.worker(settings))
                bench.say(f"  worker, {fmt_settings(settings)}: {args.messages / tuned_runs[i][-1][0]:.0f} msg/s")

        n = args.messages
        raw = median_run("raw loop (asyncpg defaults)", {"read_qty": RAW_BATCH, "connections": 1}, n, raw_runs)
        raw_ws = median_run("raw loop (statement_cache_size=0)", {"read_qty": RAW_BATCH, "connections": 1,
                                                                  "statement_cache_size": 0}, n, raw_ws_runs)
        raw_1000 = median_run("raw loop, read 1000", {"read_qty": 1000, "connections": 1}, n, raw_1000_runs)
        default = median_run("worker, seed defaults", {"max_concurrent": 10, "batch_size": None,
                                                        "max_pg_connections": 4}, n, default_runs)
        tuned = [median_run("worker, tuned", s, n, r) for s, r in zip(args.tuned, tuned_runs)]
        best = max(tuned, key=lambda t: t.rate) if tuned else None

        latencies = []
        if args.latency_messages > 0:
            for poller in ("poll", "listen"):
                bench.say(f"latency, poller={poller}: {args.latency_messages} messages, {args.interval_ms:g} ms apart")
                latencies.append(await bench.latency(poller, args.latency_messages, args.interval_ms))
    finally:
        await bench.close()

    out = {
        "messages": args.messages,
        "repetitions": args.repeat,
        "raw": raw.summary(raw),
        "raw_worker_conn_settings": raw_ws.summary(raw),
        "raw_read_1000": raw_1000.summary(raw),
        "worker_default": default.summary(raw),
        "worker_tuned_candidates": [t.summary(raw) for t in tuned],
        "worker_tuned": None if best is None else best.summary(raw),
        "latency": [asdict(lat) for lat in latencies],
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_runs_mib": rss_before,
        "environment": {
            "python": platform.python_version(),
            "asyncpg": asyncpg.__version__,
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "postgres": args.server_version,
            "server": "tests/pgcluster.py PgCluster (initdb, fsync=off, synchronous_commit=off)",
        },
    }
    tuned_ratio = out["worker_tuned"]["ratio_to_raw"] if best else None
    listen = next((lat for lat in latencies if lat.poller == "listen"), None)
    out["targets"] = {
        "tuned_ratio_at_least_0.5": None if tuned_ratio is None else tuned_ratio >= 0.5,
        "listen_p50_below_10ms": None if listen is None else listen.p50_ms < 10,
    }
    return out


def fmt_settings(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"


def print_table(res: dict[str, Any]) -> None:
    n = res["messages"]
    print()
    print(f"Throughput: {n:,} messages, no-op handler, median of {res['repetitions']} run(s)")
    print()
    rows = [("", "msg/s", "vs raw", "py CPU", "pg CPU", "runs (msg/s)", "settings")]

    def add(label: str, r: dict[str, Any], ratio: float | None) -> None:
        rows.append((label, f"{r['rate']:,.0f}", "" if ratio is None else f"{ratio:.2f}",
                     f"{r['cpu_percent']:.0f}%", f"{r['server_cpu_percent']:.0f}%",
                     " ".join(str(x) for x in r["runs"]), fmt_settings(r["settings"])))

    raw = res["raw"]["rate"]
    add("(a) raw PGMQ loop", res["raw"], 1.0)
    add("    raw, no stmt cache", res["raw_worker_conn_settings"], res["raw_worker_conn_settings"]["rate"] / raw)
    add("    raw, read 1000", res["raw_read_1000"], res["raw_read_1000"]["rate"] / raw)
    add("(b) worker, seed defaults", res["worker_default"], res["worker_default"]["ratio_to_raw"])
    best = res["worker_tuned"]
    for cand in res["worker_tuned_candidates"]:
        mark = "(c) worker, tuned (best)" if cand is not None and best and cand["settings"] == best["settings"] else "    worker, tuned"
        add(mark, cand, cand["ratio_to_raw"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in (1, 2, 3, 4)] + [r[5].ljust(widths[5]), r[6]]
        print("  " + "  ".join(cells).rstrip())
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))
    if res["latency"]:
        print()
        print("Latency, send -> handler start (worker with seed defaults otherwise)")
        print()
        lrows = [("poller", "p50 ms", "p90 ms", "p99 ms", "max ms", "messages")]
        for lat in res["latency"]:
            used = "" if lat["poller_used"] != "ReadWithPollPoller" or lat["poller"] == "poll" else " (fell back to poll!)"
            lrows.append((lat["poller"] + used, f"{lat['p50_ms']:.1f}", f"{lat['p90_ms']:.1f}", f"{lat['p99_ms']:.1f}",
                          f"{lat['max_ms']:.1f}", f"{lat['messages']} x {lat['interval_ms']:g} ms apart"))
        widths = [max(len(r[i]) for r in lrows) for i in range(len(lrows[0]))]
        for j, r in enumerate(lrows):
            print("  " + "  ".join([r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, 5)] + [r[5]]))
            if j == 0:
                print("  " + "  ".join("-" * w for w in widths))
    print()
    print("py CPU: this process (worker + bench), pg CPU: all PostgreSQL processes; 100% = one core.")
    print(f"Peak RSS of this process: {res['peak_rss_mib']:.0f} MiB "
          f"({res['rss_before_runs_mib']:.0f} MiB before the first run; the rest includes the bench's own payloads)")
    env = res["environment"]
    print(f"Python {env['python']}, asyncpg {env['asyncpg']}, PostgreSQL {env['postgres']}, {env['cpus']} CPUs; "
          f"{env['server']}")
    if env["load_average_at_end"]:
        print("Load average at the end: " + " ".join(f"{x:.2f}" for x in env["load_average_at_end"])
              + " (other work on the machine makes the runs noisy: compare the runs column)")
    t = res["targets"]
    print()
    if best:
        print(f"Target tuned worker >= 0.5 x raw: {'met' if t['tuned_ratio_at_least_0.5'] else 'NOT met'} "
              f"({best['ratio_to_raw']:.2f}, {fmt_settings(best['settings'])})")
    listen = next((lat for lat in res["latency"] if lat["poller"] == "listen"), None)
    if listen:
        print(f"Target listen p50 < 10 ms:        {'met' if t['listen_p50_below_10ms'] else 'NOT met'} "
              f"({listen['p50_ms']:.1f} ms)")


# -- the throwaway server ----------------------------------------------------------------------


class Server:
    """tests/pgcluster.py's cluster without the test-only parts (pg_cron, stand-ins)."""

    def __init__(self) -> None:
        self.cluster: PgCluster | None = None
        self.root: Path | None = None
        self.started = False

    def start(self) -> str:
        self.root = Path(tempfile.mkdtemp(prefix="edge-worker-bench-"))
        os.chmod(self.root, 0o755)
        self.cluster = PgCluster(bindir=find_bindir(), root=self.root)
        self.cluster.init()
        with open(self.cluster.datadir / "postgresql.conf", "a") as conf:
            # The benchmark needs no pg_cron: later lines win, so only postgresql-15 is required.
            conf.write("shared_preload_libraries = ''\nautovacuum_naptime = 1min\n")
        self.cluster.start()
        self.started = True
        return self.cluster.url()

    @property
    def postmaster(self) -> int | None:
        try:
            return int((self.cluster.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    def stop(self) -> None:
        # Also when interrupted inside `pg_ctl start`: a pid file means a server may be up.
        if self.cluster is not None and (self.started or (self.cluster.datadir / "postmaster.pid").exists()):
            with contextlib.suppress(Exception):
                self.cluster.stop("immediate")
            self.started = False
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


async def prepare(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        await install_pgmq_sql(conn)
        await apply_migration(conn)
        return await conn.fetchval("show server_version")
    finally:
        await conn.close()


def parse_settings(text: str) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        settings[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000, help="messages per throughput run (default 20000)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of each throughput run; median shown (default 5)")
    parser.add_argument("--tuned", action="append", type=parse_settings, metavar="K=V,...",
                        help="a tuned worker setting to try, e.g. max_concurrent=100,batch_size=100 "
                             "(repeatable; default: a built-in list of candidates)")
    parser.add_argument("--latency-messages", type=int, default=200, help="messages per latency run (0 skips it)")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="spacing of latency messages (default 20)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    parser.add_argument("--verbose", action="store_true", help="progress on stderr also with --json")
    args = parser.parse_args(argv)
    if args.tuned is None:
        args.tuned = TUNED_CANDIDATES
    if args.messages < 1 or args.repeat < 1:
        parser.error("--messages and --repeat must be 1 or more")

    server = Server()
    # Ctrl-C: asyncio.run cancels the running benchmark (workers stop in their `finally`),
    # then raises KeyboardInterrupt here. SIGTERM takes the same path. SIGINT is set
    # explicitly because a shell starts background jobs with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
    try:
        url = server.start()
        args.postmaster = server.postmaster
        args.server_version = asyncio.run(prepare(url))
        result = asyncio.run(run_all(url, args))
    except KeyboardInterrupt:
        print("\ninterrupted: removing the benchmark cluster", file=sys.stderr)
        return 130
    finally:
        server.stop()
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
