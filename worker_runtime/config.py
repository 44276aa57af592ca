"""Worker options: the seed's names and defaults, validated before anything touches the DB."""

from __future__ import annotations

import difflib
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

QUEUE_NAME_PATTERN = r"^[a-z_][a-z0-9_]{0,46}$"
FUNCTION_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
DB_URL_ENV = "EDGE_WORKER_DB_URL"
# The bearer secret the function host checks and the keep-alive sends (Vault: edge_worker_auth_secret).
AUTH_SECRET_ENV = "EDGE_WORKER_AUTH_SECRET"
LOG_LEVEL_ENV = "EDGE_WORKER_LOG_LEVEL"
# Where Supabase projects keep function secrets (git-ignored); every entry point reads it.
FUNCTIONS_ENV_FILE = "supabase/functions/.env"


class ConfigError(ValueError):
    """An option a user set is wrong; the message names it and says what to change."""


# How to fix each constraint, keyed by option name: the second half of the error sentence.
_FIXES: dict[str, str] = {
    "queue_name": "use lowercase letters, digits and _ (at most 47, not starting with a digit), e.g. 'tasks'",
    "function_name": "use lowercase letters, digits, - and _ as Supabase function names do",
    "max_concurrent": "set it to how many messages may run at once, 1 or more (default 10)",
    "max_pg_connections": "set it to 2 or more (default 4)",
    "max_poll_seconds": "set it to 1 or more seconds (default 5)",
    "poll_interval_ms": "set it to 1 or more milliseconds (default 200)",
    "retry_delay": "set it to 0 or more seconds (default 5)",
    "retry_limit": "set it to 0 (no retries) or more (default 5)",
    "visibility_timeout": "set it to 1 or more seconds (default 3)",
    "max_retry_delay": "set it to 1 or more seconds (default 300)",
    "batch_size": "set it between 1 and max_concurrent, or leave it unset",
    "max_lifetime_seconds": "set it to more than 0 seconds, or leave it unset for no limit",
    "shutdown_grace_seconds": "set it to 0 or more seconds (default 10)",
    "heartbeat_interval": "set it above 0 and below 6 seconds: a worker is inactive after 6 s without one",
    "retry_strategy": "use 'fixed' or 'exponential'",
    "poller": "use 'poll' (read_with_poll) or 'listen' (LISTEN/NOTIFY)",
    "log_level": "use 'debug', 'info', 'warning' or 'error'",
}


class WorkerConfig(BaseModel):
    """Everything a worker needs to know. Build it with `WorkerConfig.from_options(**kw)`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue_name: str = Field("tasks", pattern=QUEUE_NAME_PATTERN)
    function_name: str | None = Field(None, pattern=FUNCTION_NAME_PATTERN)
    max_concurrent: int = Field(10, ge=1)
    max_pg_connections: int = Field(4, ge=2)
    max_poll_seconds: int = Field(5, ge=1)
    poll_interval_ms: int = Field(200, ge=1)
    retry_delay: int = Field(5, ge=0)
    retry_limit: int = Field(5, ge=0)
    visibility_timeout: int = Field(3, ge=1)
    retry_strategy: Literal["fixed", "exponential"] = "fixed"
    max_retry_delay: int = Field(300, ge=1)
    batch_size: int | None = Field(None, ge=1)
    poller: Literal["poll", "listen"] = "poll"
    max_lifetime_seconds: float | None = Field(None, gt=0)
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    heartbeat_interval: float = Field(5.0, gt=0, lt=6)
    version: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] | None = None
    db_url: SecretStr | None = None

    @model_validator(mode="after")
    def _check_combinations(self) -> WorkerConfig:
        if self.poll_interval_ms >= self.max_poll_seconds * 1000:
            raise ValueError(
                f"poll_interval_ms ({self.poll_interval_ms}) must be below max_poll_seconds "
                f"({self.max_poll_seconds} s = {self.max_poll_seconds * 1000} ms): lower poll_interval_ms "
                "or raise max_poll_seconds"
            )
        if self.batch_size is not None and self.batch_size > self.max_concurrent:
            raise ValueError(
                f"batch_size ({self.batch_size}) must not exceed max_concurrent ({self.max_concurrent}): "
                "lower batch_size or raise max_concurrent"
            )
        if self.retry_strategy == "exponential" and self.max_retry_delay < self.retry_delay:
            raise ValueError(
                f"max_retry_delay ({self.max_retry_delay}) must be at least retry_delay ({self.retry_delay}): "
                "raise max_retry_delay"
            )
        if self.poller == "listen" and self.max_pg_connections < 3:
            raise ValueError(
                "poller='listen' holds one connection for LISTEN, so max_pg_connections must be 3 or more: "
                "raise max_pg_connections"
            )
        return self

    @classmethod
    def from_options(cls, **options: Any) -> WorkerConfig:
        """Validate options; raise ConfigError with one sentence per problem."""
        unknown = [name for name in options if name not in cls.model_fields]
        if unknown:
            raise ConfigError(" ".join(_unknown_option(name) for name in unknown))
        try:
            return cls(**options)
        except ValidationError as exc:
            raise ConfigError(" ".join(_describe(err) for err in exc.errors())) from None

    @property
    def read_batch_size(self) -> int:
        return self.batch_size or self.max_concurrent

    def resolved_db_url(self) -> str:
        """The explicit db_url, else EDGE_WORKER_DB_URL; a clear error when neither is set."""
        if self.db_url is not None:
            return self.db_url.get_secret_value()
        url = os.environ.get(DB_URL_ENV)
        if not url:
            raise ConfigError(
                f"No database URL: set {DB_URL_ENV} (for example in supabase/functions/.env) "
                "or pass db_url=... to the worker."
            )
        return url

    def retry_delay_for(self, read_ct: int) -> int:
        """Seconds before the next attempt after attempt number `read_ct` failed."""
        if self.retry_strategy == "fixed":
            return self.retry_delay
        return min(self.retry_delay * 2 ** max(read_ct - 1, 0), self.max_retry_delay)


def _unknown_option(name: str) -> str:
    close = difflib.get_close_matches(name, list(WorkerConfig.model_fields), n=1)
    hint = f" did you mean '{close[0]}'?" if close else " see the options table in the README."
    return f"Unknown option '{name}':{hint}"


def _describe(err: Any) -> str:
    field = ".".join(str(part) for part in err["loc"]) or None
    if field is None:  # a combination check: its message already names options and fix
        return str(err["msg"]).removeprefix("Value error, ") + "."
    got = err.get("input")
    shown = "***" if field == "db_url" else repr(got)
    fix = _FIXES.get(field, "see the options table in the README")
    return f"Invalid {field}={shown}: {err['msg'].lower()}; {fix}."
