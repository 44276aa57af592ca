"""Options: seed defaults, and one clear sentence per mistake, before any DB access."""

from __future__ import annotations

import pytest

from worker_runtime import ConfigError, EdgeWorker, Worker, WorkerConfig


def test_seed_defaults():
    c = WorkerConfig()
    assert (c.queue_name, c.max_concurrent, c.max_pg_connections, c.max_poll_seconds) == ("tasks", 10, 4, 5)
    assert (c.poll_interval_ms, c.retry_delay, c.retry_limit, c.visibility_timeout) == (200, 5, 5, 3)
    assert c.retry_strategy == "fixed" and c.poller == "poll" and c.max_lifetime_seconds is None


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"max_concurrent": 0}, "Invalid max_concurrent=0"),
        ({"max_pg_connections": 1}, "Invalid max_pg_connections=1"),
        ({"max_poll_seconds": 0}, "Invalid max_poll_seconds=0"),
        ({"poll_interval_ms": -5}, "Invalid poll_interval_ms=-5"),
        ({"retry_limit": -1}, "Invalid retry_limit=-1"),
        ({"retry_delay": -1}, "Invalid retry_delay=-1"),
        ({"visibility_timeout": 0}, "Invalid visibility_timeout=0"),
        ({"queue_name": "Bad-Name"}, "Invalid queue_name='Bad-Name'"),
        ({"function_name": "My Func"}, "Invalid function_name='My Func'"),
        ({"retry_strategy": "random"}, "use 'fixed' or 'exponential'"),
        ({"poller": "push"}, "use 'poll' (read_with_poll) or 'listen'"),
        ({"max_lifetime_seconds": 0}, "Invalid max_lifetime_seconds=0"),
        ({"poll_interval_ms": 5000, "max_poll_seconds": 5}, "poll_interval_ms (5000) must be below max_poll_seconds"),
        ({"batch_size": 20, "max_concurrent": 10}, "batch_size (20) must not exceed max_concurrent (10)"),
        ({"retry_strategy": "exponential", "retry_delay": 60, "max_retry_delay": 10},
         "max_retry_delay (10) must be at least retry_delay (60)"),
        ({"poller": "listen", "max_pg_connections": 2}, "max_pg_connections must be 3 or more"),
        ({"max_concurency": 5}, "Unknown option 'max_concurency': did you mean 'max_concurrent'?"),
    ],
)
def test_invalid_options_give_one_clear_sentence(options, expected):
    with pytest.raises(ConfigError) as info:
        WorkerConfig.from_options(**options)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    # The same check guards every entry point, before any database is touched.
    with pytest.raises(ConfigError):
        Worker(lambda p, c: None, **options)
    with pytest.raises(ConfigError):
        EdgeWorker.start(lambda p, c: None, **options)


def test_db_url_is_never_shown_in_errors():
    with pytest.raises(ConfigError) as info:
        WorkerConfig.from_options(db_url=123456789, max_concurrent=0)
    assert "123456789" not in str(info.value)


def test_missing_db_url_says_what_to_set(monkeypatch):
    monkeypatch.delenv("EDGE_WORKER_DB_URL", raising=False)
    with pytest.raises(ConfigError, match="set EDGE_WORKER_DB_URL"):
        WorkerConfig().resolved_db_url()


def test_retry_delays():
    fixed = WorkerConfig(retry_delay=5)
    assert [fixed.retry_delay_for(n) for n in (1, 2, 3)] == [5, 5, 5]
    exp = WorkerConfig(retry_strategy="exponential", retry_delay=2, max_retry_delay=10)
    assert [exp.retry_delay_for(n) for n in (1, 2, 3, 4, 5)] == [2, 4, 8, 10, 10]
